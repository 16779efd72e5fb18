// Where the rows of a decode step come from: the seam where the tiers decide.
//
// A decode step attends, per KV head, to a list of token positions (sink,
// the index's picks, window). The fetch plan cuts that list into ranges and
// names the source of each: today every row is gathered from DRAM (the
// Store's block arena: pinned and mapped on a CUDA store, so the gather
// kernel reads it over PCIe). A GPU block cache will add ranges already
// resident in device memory and an NVMe tier ranges read from segments; the
// step runs one fetch per range, so neither the index nor the attention
// kernels change when a tier is added.
//
// Plans have a fixed size (no allocation per step) and are made on the host
// from counts only, so they can be made before a step is enqueued.
#pragma once

#include <cstdint>

namespace pqkv::tiering {

enum class RowSource : uint8_t {
  kDram = 0,  // the row store's blocks in host memory
};
const char* row_source_name(RowSource source);  // "dram"

// Entries [begin, end) of each KV head's position list, read from `source`.
struct FetchRange {
  RowSource source = RowSource::kDram;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

struct FetchPlan {
  static constexpr int kMaxRanges = 4;
  FetchRange ranges[kMaxRanges];
  int num_ranges = 0;         // ranges in order, covering [0, rows_per_head) without gaps
  int64_t rows_per_head = 0;  // positions per KV head the step attends to

  // Rows per KV head that come from `source`.
  int64_t rows_from(RowSource source) const;
};

// Makes the fetch plan of each step. Stateless today (every row is in DRAM);
// the tiering components (block cache residency, spill) plug in here.
// Thread-safe.
class FetchPlanner {
 public:
  // The plan for a step attending to `rows_per_head` positions per KV head
  // (>= 0). An empty step has no ranges.
  FetchPlan plan(int64_t rows_per_head) const;
};

}  // namespace pqkv::tiering
