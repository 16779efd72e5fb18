// One decode step of one layer as attention/ runs it: plan -> fetch ->
// attend, over views of state that others own (engine/ owns a sequence's
// rows and indexes) and a workspace the caller sizes. The step keeps nothing
// between calls.
//
//   plan:   the DecodePlan (which tokens: sink, top-K of the middle, window)
//           and the index's search -> the position list [kv_heads, rows];
//   fetch:  the tiers' FetchPlan (tiering/) says where each range of the
//           list is read from -> rows;
//   attend: exact attention over those rows.
//
// Backends side by side: cpu/decode_step_cpu.h and cuda/decode_step_cuda.h.
#pragma once

#include "attention/decode_plan.h"
#include "attention/output_report.h"
#include "index/layer_index.h"
#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "storage/row_table.h"
#include "storage/spilled_rows.h"
#include "tiering/block_cache.h"
#include "tiering/fetch_plan.h"
#include "tiering/resident_rows.h"

namespace pqkv::attention {

struct DecodeStepInputs {
  const ModelSpec* spec = nullptr;  // the layer's geometry; outlives the step
  DecodePlan plan;
  // The layer's rows: a host view for the CPU step, a device view for the
  // CUDA step (storage::DeviceRowTable::view).
  storage::RowTableView rows;
  // The layer's index; searched when plan.search_k > 0 (then trained and
  // holding codes of every token in the plan's middle range).
  index::LayerIndex* index = nullptr;
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
  const tiering::FetchPlanner* tiers = nullptr;  // required
  // The step's layer: it names the spilled rows and the block cache's blocks.
  int layer = 0;
  // The layer's rows that were spilled to disk (null blocks of the table),
  // or null when none were. The CUDA step then needs `host_rows`, the host
  // view of the same table (KvRowStore::host_table), to find them.
  storage::SpilledRows* spilled = nullptr;
  storage::RowTableView host_rows;
  // The layer's resident sink and window rows in device memory (CUDA step
  // only); a default view: none, every row comes from DRAM.
  tiering::ResidentRowsView resident;
  // CUDA step only: the step's plan in device memory, or null. When set, the
  // kernels read the step's counts from it when they run (it is written
  // earlier on the same stream, attention/cuda/device_plan.cuh) and `plan` is
  // the largest step they will see (the plan at the reserved length): every
  // launch and the workspace are sized for it, and the search runs whenever
  // plan.counts.top_k > 0 and `index` is set (exiting at once when the
  // device plan searches nothing). This is what lets one captured graph
  // replay every step of a generation.
  const DeviceStepPlan* device_plan = nullptr;
  // The block cache (tiering/block_cache.h), whose BlockIds name the layer as
  // `layer`. CPU step: the sequence's host cache, or null (none); the step
  // runs the policy over the middle's entries, reads hits from the slots and
  // admits blocks after reading. CUDA step: `cache` is the layer's device
  // view (default: none); entries of DRAM ranges whose block has a slot are
  // read from it.
  tiering::BlockCacheCpu* host_cache = nullptr;
  tiering::BlockCacheView cache;
  // How much of the device the step's search may hold
  // (index::SearchRequest::sm_share): below 1 when the step runs beside
  // other sequences' steps (the Store's batched steps).
  float search_sm_share = 1.0f;
  // CUDA step only: where the attention records a non-finite output element
  // (device-writable; see OutputReport), or null.
  OutputReport* output_report = nullptr;
};

// The shape of the plan's position lists as the tiers see them.
tiering::StepRows step_rows(const DecodePlan& plan);

// Sets the fetch plan's rows and bytes per tier, over every KV head, in
// trace->fetch.
void fill_fetch_trace(const tiering::FetchPlan& fetch, const ModelSpec& spec, AttendTrace* trace);
// Moves `hits` rows (over every KV head) of trace->fetch from DRAM to the
// block cache.
void add_cache_hits(int64_t hits, const ModelSpec& spec, AttendTrace* trace);

}  // namespace pqkv::attention
