// The policy of the GPU block cache, on the host: which blocks of B
// consecutive tokens of one (layer, KV head) hold a cache slot, which step's
// selected tokens hit them, which blocks are admitted and which evicted. It is
// the reference that CI tests and that a GPU residency table is compared
// with.
//
// - A block is admitted only when every one of its rows is written (its last
//   token is below the layer's length): a partly filled last block is never
//   admitted nor served.
// - LFU with aging: each access of a block (a step that selects at least one
//   of its tokens) adds 1 to its count; every `aging_interval` steps all
//   counts are halved, so a block that was hot long ago can leave. The
//   victim is the resident block with the lowest count, the earliest admitted
//   among equals.
// - An admission is a copy in flight: its slot serves the block only after
//   complete(). An evicted block leaves the table at once, so its slot is
//   never read for it again.
//
// Cost: the state of each (layer, KV head) is a flat array indexed by block
// (count, slot, the step that last read it), so a step touches one entry per
// selected position and hashes nothing; halving the counts is lazy (each
// entry remembers the aging epoch of its count); the victim is the root of a
// heap over the resident slots only, O(log num_slots) per admission.
//
// Not thread-safe: one policy serves one Store's steps in order.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "pqkv/status.h"

namespace pqkv::tiering {

struct BlockCacheOptions {
  // Tokens per block, a power of two. Default 64: 32 KiB blocks of 512 B
  // rows, large enough for a copy at full PCIe speed and small enough that a
  // step's picks fill a good share of each.
  int64_t tokens_per_block = 64;
  int64_t num_slots = 0;  // blocks the cache holds; 0 = no cache. Default 0.
  // Steps between halvings of every count; 0 = never (plain LFU, PQCache's
  // policy). Default 16.
  int aging_interval = 16;
  // Accesses (aging included) a block needs before it is admitted: 1 = at its
  // first, 2 = once it is picked again. >= 1. Default 1.
  uint32_t admit_count = 1;

  Status validate() const;
};

// A block: tokens [index * B, (index + 1) * B) of one (layer, KV head).
struct BlockId {
  int32_t layer = 0;
  int32_t head = 0;
  int64_t index = 0;
  auto operator<=>(const BlockId&) const = default;
};

// What one step of one (layer, KV head) reads and starts.
struct BlockStep {
  // Per selected position: the slot that serves it, or -1 (gathered from
  // DRAM). Empty when the step was asked for counts only (see step_into).
  std::vector<int64_t> slot_of;
  int64_t hits = 0;    // positions served by a slot
  int64_t misses = 0;  // positions gathered from DRAM
  // Copies to start: each block's rows into its slot (usable after complete()).
  std::vector<std::pair<BlockId, int64_t>> admissions;
  // Blocks that left the cache in this step, with the slot they held: a
  // residency table must stop serving them before the slot is written again.
  std::vector<std::pair<BlockId, int64_t>> evictions;
};

class BlockCachePolicy {
 public:
  // InvalidArgument for bad options.
  static Result<BlockCachePolicy> create(const BlockCacheOptions& options);

  // One step of (layer, head) over the selected `positions` (tokens below
  // `length`, the tokens written): serves hits from ready slots, counts the
  // accesses, and admits each accessed, complete, not resident block whose
  // count beats the coldest resident block (or a free slot), at most
  // `max_admissions` of them (negative: no limit; 0 while the caller cannot
  // start copies), hottest first, the lower block first among equals.
  // Negative positions (padding) are skipped. `layer` and `head` are >= 0.
  BlockStep step(int32_t layer, int32_t head, std::span<const int32_t> positions, int64_t length,
                 int64_t max_admissions = -1);
  // The same step into `out` (its vectors reused, their old contents
  // dropped); with `per_position` false out->slot_of stays empty and
  // out->hits and out->misses 0 (a caller that reads hits from its own
  // residency table and needs only the admissions and evictions).
  void step_into(int32_t layer, int32_t head, std::span<const int32_t> positions, int64_t length,
                 int64_t max_admissions, bool per_position, BlockStep* out);

  // The copy of an admitted block into `slot` has finished: the slot serves it
  // from now on (unless it was evicted meanwhile).
  void complete(const BlockId& block, int64_t slot);

  // Ends a decode step (every layer done): ages the counts every
  // aging_interval calls.
  void end_step();

  // The slot that serves `block` now, or -1 (not resident, or its copy not done).
  int64_t ready_slot(const BlockId& block) const;
  int64_t resident_blocks() const { return static_cast<int64_t>(heap_.size()); }
  const BlockCacheOptions& options() const { return options_; }
  // The block's count, aging included.
  uint32_t count(const BlockId& block) const;

 private:
  // One block of one (layer, KV head).
  struct Entry {
    uint32_t count = 0;  // as of aging epoch `epoch`: halved once per epoch since
    uint32_t epoch = 0;
    int32_t slot = -1;   // the slot it holds (copy done or not), or -1
    int32_t serve = -1;  // the slot that serves it (copy done), or -1
  };
  // A resident slot, ordered in the heap by (count, admitted_at).
  struct Slot {
    BlockId block;
    uint32_t count = 0;  // its block's count, aging included
    int64_t admitted_at = 0;
    int64_t heap_at = -1;  // its place in heap_, or -1 (free)
  };
  explicit BlockCachePolicy(const BlockCacheOptions& options);

  std::vector<Entry>& entries(int32_t layer, int32_t head, int64_t blocks);
  const Entry* find(const BlockId& block) const;  // null when never read
  Entry* find(const BlockId& block);
  uint32_t aged(const Entry& e) const;
  bool colder(int64_t a, int64_t b) const;  // slot a before slot b in the eviction order
  void sift_up(int64_t at);
  void sift_down(int64_t at);
  void heap_set(int64_t at, int64_t slot);

  BlockCacheOptions options_;
  int block_shift_ = 0;
  std::vector<std::vector<std::vector<Entry>>> entries_;  // [layer][head][block]
  // [layer][head][block]: the step_into() call that last read the block,
  // apart from entries_ so the per-position loop reads 4 bytes per block.
  std::vector<std::vector<std::vector<uint32_t>>> seen_;
  std::vector<Slot> slots_;
  std::vector<int64_t> heap_;  // resident slots, coldest at the root
  std::vector<int64_t> free_slots_;
  std::vector<int64_t> accessed_;  // scratch: blocks one step read
  int64_t admissions_ = 0;
  int64_t steps_ = 0;
  uint32_t epoch_ = 0;  // aging epochs so far
  uint32_t calls_ = 0;  // step_into() calls so far, the `seen` stamp
};

}  // namespace pqkv::tiering
