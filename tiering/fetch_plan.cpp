#include "tiering/fetch_plan.h"

namespace pqkv::tiering {

const char* row_source_name(RowSource source) {
  switch (source) {
    case RowSource::kDram:
      return "dram";
  }
  return "unknown";
}

int64_t FetchPlan::rows_from(RowSource source) const {
  int64_t n = 0;
  for (int i = 0; i < num_ranges; ++i) {
    if (ranges[i].source == source) n += ranges[i].size();
  }
  return n;
}

FetchPlan FetchPlanner::plan(int64_t rows_per_head) const {
  FetchPlan p;
  p.rows_per_head = rows_per_head;
  if (rows_per_head > 0) {
    p.ranges[0] = {RowSource::kDram, 0, rows_per_head};
    p.num_ranges = 1;
  }
  return p;
}

}  // namespace pqkv::tiering
