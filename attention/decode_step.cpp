#include "attention/decode_step.h"

namespace pqkv::attention {

tiering::StepRows step_rows(const DecodePlan& plan) {
  tiering::StepRows s;
  s.length = plan.length;
  s.sink = plan.counts.sink;
  s.window = plan.counts.window;
  s.middle = plan.tokens_per_head() - s.sink - s.window;
  return s;
}

void fill_fetch_trace(const tiering::FetchPlan& fetch, const ModelSpec& spec, AttendTrace* trace) {
  const int64_t heads = spec.num_kv_heads;
  const int64_t row_bytes = spec.row_bytes();
  const int64_t resident = heads * fetch.rows_from(tiering::RowSource::kResident);
  const int64_t dram = heads * fetch.rows_from(tiering::RowSource::kDram) - fetch.ssd_rows;
  trace->fetch.resident_rows = resident;
  trace->fetch.resident_bytes = resident * row_bytes;
  trace->fetch.dram_rows = dram;
  trace->fetch.dram_bytes = dram * row_bytes;
  trace->fetch.ssd_rows = fetch.ssd_rows;
  trace->fetch.ssd_pages = fetch.ssd_pages;
  trace->fetch.ssd_bytes = fetch.ssd_pages * storage::kPageBytes;
  trace->fetch.ssd_hits = fetch.ssd_hits;
}

void add_cache_hits(int64_t hits, const ModelSpec& spec, AttendTrace* trace) {
  const int64_t bytes = hits * spec.row_bytes();
  trace->fetch.cache_hits += hits;
  trace->fetch.cache_bytes += bytes;
  trace->fetch.dram_rows -= hits;
  trace->fetch.dram_bytes -= bytes;
}

}  // namespace pqkv::attention
