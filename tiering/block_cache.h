// The block cache of one sequence: slots holding blocks of B consecutive rows
// of one (layer, KV head) that the index picks often, in front of the row
// store, under the LFU-with-aging policy of tiering/block_cache_policy.h.
//
// - BlockCacheView is what a gather reads: a residency table (block -> slot,
//   or -1) and the slots. A row whose block has a slot is read from it;
//   every other row from the row store. The table only lists blocks whose
//   copy has completed, and an evicted block leaves it before its slot is
//   written again.
// - BlockCacheCpu is the cache on the host, the reference that CI tests: its
//   slots are host memory, admissions are copied at once (they serve from
//   the next step), and the CPU decode step reads hits from the slots.
//   tiering/cuda/block_cache_cuda.h keeps the slots and the table in device
//   memory and drives the same policy one step behind.
//
// A sequence's slots are shared by all its layers and KV heads; how many it
// takes from the Store's budget is block_cache_slots().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "pqkv/status.h"
#include "storage/memory_budget.h"
#include "storage/row_table.h"
#include "storage/spilled_rows.h"
#include "tiering/block_cache_policy.h"

namespace pqkv::tiering {

// Slots for a sequence of `layers` x `kv_heads` heads reserved for
// `max_tokens` tokens, blocks of `block_bytes`, when `available_bytes` of the
// Store's cache budget are left: as many as the sequence's complete blocks
// could fill, at most what is left. 0 when no slot fits.
int64_t block_cache_slots(int64_t available_bytes, int64_t block_bytes, int layers, int kv_heads,
                          int64_t max_tokens, int64_t tokens_per_block);

// One layer's residency table and the sequence's slots, as a gather reads
// them. Device memory for a CUDA step; a default view caches nothing.
struct BlockCacheView {
  const std::byte* slots = nullptr;  // [num_slots][tokens_per_block][row_bytes]
  const int32_t* table = nullptr;    // [kv_heads][max_blocks]: the slot serving a block, or -1
  int64_t max_blocks = 0;            // blocks per KV head the table covers
  int64_t row_bytes = 0;
  int block_shift = 0;  // log2(tokens_per_block)

  PQKV_HOST_DEVICE bool empty() const { return table == nullptr; }
  // The cached row of (head, token), or null when its block has no ready slot.
  PQKV_HOST_DEVICE const std::byte* row(int head, int64_t token) const {
    const int64_t block = token >> block_shift;
    if (table == nullptr || block >= max_blocks) return nullptr;
    const int32_t slot = table[head * max_blocks + block];
    if (slot < 0) return nullptr;
    const int64_t in_block = token & ((int64_t{1} << block_shift) - 1);
    return slots + ((int64_t{slot} << block_shift) + in_block) * row_bytes;
  }
};

// The cache on the host. Not thread-safe: one sequence is driven by one
// thread at a time.
class BlockCacheCpu {
 public:
  // options.num_slots slots of options.tokens_per_block rows of `row_bytes`
  // in host memory, charged to `budget` (may be null) while the object
  // lives. InvalidArgument for bad options (tokens_per_block above 128, the
  // row store's block); ResourceExhausted when the budget or the host is out
  // of room.
  static Result<std::unique_ptr<BlockCacheCpu>> create(const BlockCacheOptions& options,
                                                       int64_t row_bytes,
                                                       storage::MemoryBudget* budget);
  ~BlockCacheCpu();
  BlockCacheCpu(const BlockCacheCpu&) = delete;
  BlockCacheCpu& operator=(const BlockCacheCpu&) = delete;

  // The policy's step over the selected `positions` of (layer, head), the
  // layer holding `length` tokens: which slot serves each position (see
  // BlockCachePolicy::step). Call admit() with the result once the hits are read.
  BlockStep step(int32_t layer, int32_t head, std::span<const int32_t> positions, int64_t length);
  // The row of `token` in `slot` (a slot that step() named for it).
  const std::byte* slot_row(int64_t slot, int64_t token) const;
  // Copies each block admitted by `steps` (one per KV head of the layer of
  // `rows`, a host view) into its slot; the slot serves it from the next
  // step(). A block whose rows were spilled to disk (a null block in `rows`)
  // is read back from `spilled` (the layer's spill, required then) for the
  // copy: the pages of the admitted blocks' rows only, in one batch; a hot
  // spilled block is then served from DRAM instead of the SSD tier. The slot
  // holds the same bytes as the spill file, which never change, so it is
  // never stale. `stats` (may be null) gets the pages and time of those
  // reads added. The errors of SpilledRows::read (the spilled blocks are
  // then not admitted); ResourceExhausted when the read's scratch cannot grow.
  [[nodiscard]] Status admit(std::span<const BlockStep> steps, const storage::RowTableView& rows,
                             storage::SpilledRows* spilled = nullptr,
                             storage::SpillReadStats* stats = nullptr);
  // Ends a decode step (every layer done): ages the counts.
  void end_step() { policy_.end_step(); }

  const BlockCachePolicy& policy() const { return policy_; }
  int64_t bytes() const { return bytes_; }

 private:
  BlockCacheCpu(BlockCachePolicy policy, int64_t row_bytes)
      : policy_(std::move(policy)), row_bytes_(row_bytes) {}

  BlockCachePolicy policy_;
  int64_t row_bytes_ = 0;
  std::unique_ptr<std::byte[]> slots_;
  // Spilled blocks' rows read back for admissions, and where they landed.
  std::vector<storage::SpilledRows::RowRead> spilled_reads_;
  std::vector<const std::byte*> spilled_rows_;
  int64_t bytes_ = 0;
  storage::MemoryBudget* budget_ = nullptr;
};

}  // namespace pqkv::tiering
