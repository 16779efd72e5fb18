// The row gather of a decode step over the tiers: entries of the position
// lists that the fetch plan reads from resident rows (the sink and window
// kept in HBM, tiering/resident_rows.h) are copied device to device, the
// others read from a block cache slot where the layer's residency table
// names one for their block (tiering/block_cache.h) and otherwise gathered
// from the row store's blocks over PCIe, and entries whose rows the SSD tier
// staged (their block left DRAM) from that staging, all into the same
// compact buffer [kv_heads, tokens, row] that the attention kernel reads, so
// attention over it is exactly the attention over rows gathered from DRAM.
// One launch per layer; no host work per row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/cuda/launch_config.h"
#include "pqkv/status.h"
#include "tiering/block_cache.h"
#include "tiering/fetch_plan.h"
#include "tiering/resident_rows.h"

namespace pqkv::attention::cuda {

struct GatherTieredRowsArgs {
  GatherRowsArgs dram;  // the table, positions, tokens and output, as for launch_gather_rows
  // Device rows of the layer's resident sink and window; its row_bytes and
  // kv_heads those of dram.table.
  tiering::ResidentRowsView resident;
  // Which entries come from `resident`: ranges of plan.ranges with source
  // kResident (each of their tokens held by resident.shape at the step's
  // length); plan.rows_per_head == dram.tokens.
  tiering::FetchPlan plan;
  // A replayed step (with dram.device_tokens): the layer's length in device
  // memory, read when the kernel runs. Each entry's source is then chosen
  // from its position, resident when resident.shape.holds(position, length),
  // and `plan` is not read.
  const int64_t* device_length = nullptr;
  // The layer's block cache (device view; default: none). Its row_bytes
  // those of dram.table.
  tiering::BlockCacheView cache;
  // Rows read back from spill files (tiering/ssd_tier.h), or null (none):
  // device memory [kv_heads, dram.tokens] of row pointers, each null or a
  // device-readable row (mapped pinned host memory) read instead of the
  // entry's row in the table, whose block is null. Direct steps only (no
  // device_length): the SSD tier needs the step's positions on the host.
  const std::byte* const* staged = nullptr;

  Status validate() const;
};

// Enqueues the gather described by `args` on `stream`. No allocation and no
// host synchronisation: it can be captured in a graph. InvalidArgument when
// the arguments disagree (see GatherTieredRowsArgs).
Status launch_gather_tiered_rows(const GatherTieredRowsArgs& args, cudaStream_t stream);

}  // namespace pqkv::attention::cuda
