// The SSD tier of a decode step: the attended rows whose blocks were spilled
// to disk (storage/spilled_rows.h) are read back, in 4 KiB page batches
// through io_uring, into the spill's page-aligned staging, so the attention
// reads them as it reads DRAM rows and the result equals that of the same
// sequence held all in DRAM. The CPU step reads them there; the CUDA step
// (attention/cuda/decode_step_cuda.h) copies them into pinned, mapped
// staging that its gather reads.
//
// No read-ahead of neighbouring pages: a step reads exactly the distinct
// pages holding its selected rows (rows sharing a page count as hits).
//
// Thread safety: one thread at a time per SpilledRows (one sequence).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "pqkv/status.h"
#include "storage/row_table.h"
#include "storage/spilled_rows.h"
#include "tiering/fetch_plan.h"

namespace pqkv::tiering {

// Host scratch of the SSD tier, reused across steps.
struct SsdTierWorkspace {
  // [kv_heads * tokens_per_head]: the staged row of each attended entry
  // whose block is spilled, null for rows in DRAM. Empty when the step
  // attends to no spilled row.
  std::vector<const std::byte*> staged;
  std::vector<storage::SpilledRows::RowRead> reads;  // one per spilled entry
  std::vector<int64_t> entries;                      // their index in `staged`
  std::vector<const std::byte*> fetched;             // their staged rows
};

// Reads the rows of `layer` (table `rows`: null block pointers are spilled)
// at `positions` [kv_heads, tokens_per_head] (host memory; negative entries
// are skipped: rows served by another tier) that are only on disk, and fills ws.staged (cleared
// when none is) and plan->ssd_rows, ssd_pages and ssd_hits. `spilled` may be null (nothing
// spilled); `read_us` (may be null) gets the wall time of the reads. The staged rows stay valid
// until the next read of `spilled`. Corruption naming the file and page when a page fails its
// checksum, IoError when a read fails, ResourceExhausted when scratch cannot grow.
[[nodiscard]] Status fetch_spilled_rows(const storage::RowTableView& rows, int layer,
                                        storage::SpilledRows* spilled, const int32_t* positions,
                                        int64_t tokens_per_head, SsdTierWorkspace& ws,
                                        FetchPlan* plan, double* read_us);

}  // namespace pqkv::tiering
