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
// Not thread-safe: one policy serves one Store's steps in order.
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <span>
#include <tuple>
#include <unordered_map>
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

  Status validate() const;
};

// A block: tokens [index * B, (index + 1) * B) of one (layer, KV head).
struct BlockId {
  int32_t layer = 0;
  int32_t head = 0;
  int64_t index = 0;
  auto operator<=>(const BlockId&) const = default;
};

struct BlockIdHash {
  size_t operator()(const BlockId& b) const {
    return std::hash<int64_t>{}((int64_t{b.layer} << 48) ^ (int64_t{b.head} << 40) ^ b.index);
  }
};

// What one step of one (layer, KV head) reads and starts.
struct BlockStep {
  // Per selected position: the slot that serves it, or -1 (gathered from DRAM).
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
  // start copies). Negative positions (padding) are skipped.
  BlockStep step(int32_t layer, int32_t head, std::span<const int32_t> positions, int64_t length,
                 int64_t max_admissions = -1);

  // The copy of an admitted block into `slot` has finished: the slot serves it
  // from now on (unless it was evicted meanwhile).
  void complete(const BlockId& block, int64_t slot);

  // Ends a decode step (every layer done): ages the counts every
  // aging_interval calls.
  void end_step();

  // The slot that serves `block` now, or -1 (not resident, or its copy not done).
  int64_t ready_slot(const BlockId& block) const;
  int64_t resident_blocks() const { return static_cast<int64_t>(resident_.size()); }
  const BlockCacheOptions& options() const { return options_; }
  uint32_t count(const BlockId& block) const;

 private:
  struct Resident {
    int64_t slot = 0;
    bool ready = false;
    int64_t admitted_at = 0;  // admission order, the tie-break
  };
  // A resident block's place in the eviction order: (count, admitted_at).
  using Heat = std::tuple<uint32_t, int64_t, BlockId>;
  explicit BlockCachePolicy(const BlockCacheOptions& options);
  // Orders the resident blocks again after the counts changed (aging).
  void reorder();

  BlockCacheOptions options_;
  std::unordered_map<BlockId, Resident, BlockIdHash> resident_;
  std::unordered_map<BlockId, uint32_t, BlockIdHash> counts_;
  // Resident blocks, coldest first: the victim is by_heat_.begin().
  std::set<Heat> by_heat_;
  std::vector<int64_t> free_slots_;
  int64_t admissions_ = 0;
  int64_t steps_ = 0;
};

}  // namespace pqkv::tiering
