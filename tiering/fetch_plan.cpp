#include "tiering/fetch_plan.h"

#include <algorithm>
#include <cassert>

namespace pqkv::tiering {
namespace {

// Appends entries [begin, end) from `source`, merging with the last range.
void add_range(FetchPlan& p, RowSource source, int64_t begin, int64_t end) {
  if (end <= begin) return;
  if (p.num_ranges > 0) {
    FetchRange& last = p.ranges[p.num_ranges - 1];
    if (last.source == source && last.end == begin) {
      last.end = end;
      return;
    }
  }
  assert(p.num_ranges < FetchPlan::kMaxRanges);
  p.ranges[p.num_ranges++] = {source, begin, end};
}

}  // namespace

const char* row_source_name(RowSource source) {
  switch (source) {
    case RowSource::kDram:
      return "dram";
    case RowSource::kResident:
      return "resident";
    case RowSource::kCache:
      return "cache";
    case RowSource::kSsd:
      return "ssd";
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

FetchPlan FetchPlanner::plan(const StepRows& step, const ResidentShape& resident) const {
  FetchPlan p;
  p.rows_per_head = step.rows_per_head();
  // Tokens below sink_slots and from ring_first on are resident; between
  // them they are gathered.
  const int64_t ring_first =
      resident.window_slots > 0 ? std::max(resident.sink_slots, step.length - resident.window_slots)
                                : step.length;
  // Entries [entry, entry + n) holding tokens first, first + 1, ...
  const auto add_consecutive = [&](int64_t entry, int64_t first, int64_t n) {
    const int64_t in_sink = std::clamp(resident.sink_slots - first, int64_t{0}, n);
    const int64_t before_ring = std::clamp(ring_first - first, in_sink, n);
    add_range(p, RowSource::kResident, entry, entry + in_sink);
    add_range(p, RowSource::kDram, entry + in_sink, entry + before_ring);
    add_range(p, RowSource::kResident, entry + before_ring, entry + n);
  };
  add_consecutive(0, 0, step.sink);
  add_range(p, RowSource::kDram, step.sink, step.sink + step.middle);
  add_consecutive(step.sink + step.middle, step.length - step.window, step.window);
  return p;
}

}  // namespace pqkv::tiering
