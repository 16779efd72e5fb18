// Where the rows of a decode step come from: the seam where the tiers decide.
//
// A decode step attends, per KV head, to a list of token positions: the sink,
// the index's picks of the middle (or the whole middle), then the window. The
// fetch plan cuts that list into ranges and names the source of each: rows
// resident in device memory (the sink and the recent window on a CUDA store,
// tiering/resident_rows.h) are read in place; the others are gathered from
// DRAM (the Store's block arena: pinned and mapped on a CUDA store, so the
// gather kernel reads it over PCIe). The step fetches every range in one
// launch, so neither the index nor the attention kernels change when a tier
// is added.
//
// Plans have a fixed size (no allocation per step) and are made on the host
// from counts only, so they can be made before a step is enqueued.
#pragma once

#include <cstdint>

#include "tiering/resident_rows.h"

namespace pqkv::tiering {

enum class RowSource : uint8_t {
  kDram = 0,      // the row store's blocks in host memory
  kResident = 1,  // the resident sink and window rows in device memory
  // A block cache slot (tiering/block_cache.h). Chosen per entry of a DRAM
  // range when the step runs, from the residency table: plans never hold it.
  kCache = 2,
  kSsd = 3,  // spill files: rows of DRAM ranges whose blocks left DRAM (ssd_tier.h)
};
inline constexpr int kNumRowSources = 4;
const char* row_source_name(RowSource source);  // "dram", "resident", "cache", "ssd"

// The shape of each KV head's position list in a step, in the order the
// step lists them (attention::DecodePlan): `sink` entries holding tokens
// [0, sink), `middle` entries holding the index's picks of the middle (or the
// whole middle) in any order, `window` entries holding tokens
// [length - window, length).
struct StepRows {
  int64_t length = 0;  // tokens in the context
  int64_t sink = 0;
  int64_t middle = 0;
  int64_t window = 0;
  int64_t rows_per_head() const { return sink + middle + window; }
};

// Entries [begin, end) of each KV head's position list, read from `source`.
struct FetchRange {
  RowSource source = RowSource::kDram;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

struct FetchPlan {
  // Sink and window: resident (sink slots), DRAM, resident (ring) each;
  // middle: DRAM.
  static constexpr int kMaxRanges = 7;
  FetchRange ranges[kMaxRanges];
  int num_ranges = 0;         // ranges in order, covering [0, rows_per_head) without gaps
  int64_t rows_per_head = 0;  // positions per KV head the step attends to

  // Rows per KV head that the ranges read from `source` (kSsd: none; see below).
  int64_t rows_from(RowSource source) const;

  // The SSD tier, known only once the step's positions are (filled by
  // tiering/ssd_tier.h; all 0 when nothing is spilled): rows of the DRAM
  // ranges whose blocks are only in spill files, over every KV head; the
  // distinct 4 KiB pages read for them (with a cpu block cache, plus the
  // pages of the spilled blocks it admitted); rows served by a page read for
  // another row of the step (hits). With a block cache, rows its slots serve
  // are not read from disk and count as cache hits, not here.
  int64_t ssd_rows = 0;
  int64_t ssd_pages = 0;
  int64_t ssd_hits = 0;
};

// Makes the fetch plan of each step. Stateless: the residency it plans for
// is passed in. Thread-safe.
class FetchPlanner {
 public:
  // The plan for a step of shape `step` over a layer whose rows of `resident`
  // are in device memory (an empty shape: every row from DRAM). Adjacent
  // ranges of one source are merged; an empty step has no ranges. Entries of
  // the middle are planned from DRAM even where a token is resident, so the
  // plan depends on counts only.
  FetchPlan plan(const StepRows& step, const ResidentShape& resident) const;
};

}  // namespace pqkv::tiering
