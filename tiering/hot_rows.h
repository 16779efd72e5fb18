// Hot rows: the block cache with blocks of one token (block_cache_tokens 1)
// on a CUDA store, kept and driven on the device.
//
// Why single rows: the index's picks recur from step to step (at 128K
// tokens on the synthetic workload, 47% of a step's picks were picked at the
// step before, 71% at two or more of the last 8 steps) but they are sparse
// (7 picks per touched block of 64 tokens), so a cache of blocks fills its
// slots with rows nobody reads. Why on the device: a row that missed was
// just gathered into the step's row buffer, so admitting it is a copy
// within HBM, not a second trip over PCIe, and the policy is a kernel forked
// from the step's stream after the gather (the engine runs it on a stream of
// its own, beside the step's attention and, in a captured step, the next
// layer's step): no host work, no synchronisation, and it runs under CUDA
// graph replay as it does directly.
//
// The policy of one (layer, KV head), with C slots, at each step:
//   1. stamp += 1; every cacheable pick (not resident, below max_tokens)
//      that the table lists is a hit: its slot is marked used at `stamp`.
//   2. The free slots are those not used at `stamp`, in the order
//      hand, hand + 1, ... (mod C): the slot filled longest ago first.
//   3. The misses, in entry order, take the free slots in that order (with
//      admit_count 2, only a miss picked at an earlier step within the last
//      kAdmitWindow steps); a slot's old row leaves the table; the hand moves
//      past the last slot taken.
// The rows are the gathered bytes of written tokens, and rows never change
// once written, so a slot never holds a stale or unwritten row.
//
// HotRowsPolicy is the same policy on the host, the reference the device
// is tested against (tests/tiering/hot_rows_cuda_test.cpp).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace pqkv::tiering {

// admit_count 2: a miss is admitted when it was picked at one of this many steps before.
inline constexpr uint32_t kHotRowsAdmitWindow = 8;

// A miss admitted by a step: the row of `entry` (its index in the step's
// position list of the head) goes into `slot` (a global slot index).
struct HotRowsAdmission {
  int64_t entry = 0;
  int32_t slot = 0;
};

// One (layer, KV head)'s state as the device keeps it. Not thread-safe.
class HotRowsPolicy {
 public:
  // Tokens [0, max_tokens) can be cached; slots [slot_base, slot_base +
  // slots); admit_count 1 or 2 (see the header comment).
  HotRowsPolicy(int64_t max_tokens, int32_t slot_base, int64_t slots, uint32_t admit_count);

  // One step over the head's position list (-1 entries are skipped, as are
  // tokens for which cacheable[...] is false, sized like positions).
  // Returns the hits; `admissions` gets the misses admitted, in entry order.
  int64_t step(std::span<const int32_t> positions, const std::vector<bool>& cacheable,
               std::vector<HotRowsAdmission>* admissions);

  // token -> global slot, or -1.
  const std::vector<int32_t>& table() const { return table_; }
  // slot - slot_base -> token, or -1.
  const std::vector<int32_t>& owner() const { return owner_; }

 private:
  int32_t slot_base_;
  uint32_t admit_count_;
  std::vector<int32_t> table_;
  std::vector<int32_t> owner_;
  std::vector<uint32_t> used_;  // per slot: the stamp of the last step that read or filled it
  std::vector<uint32_t> seen_;  // per token: the stamp of its last pick (admit_count 2)
  std::vector<int32_t> free_;   // scratch
  uint32_t stamp_ = 0;
  int64_t hand_ = 0;
};

}  // namespace pqkv::tiering
