// Keys and values of one sequence in host memory, one row per
// (layer, KV head, token): K (head_dim values) then V, in the model's dtype,
// so a row is 512 B at head_dim 128 in bf16 and a gather moves whole rows.
// Rows of one (layer, KV head) are in token order, in blocks of
// kTokensPerBlock rows taken from the Store's BlockArena as tokens arrive, so
// memory follows the tokens held and the store grows without moving rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"
#include "storage/block_arena.h"
#include "storage/row_table.h"
#include "storage/spilled_rows.h"

namespace pqkv::storage {

// Spilling cold rows to disk when the arena's budget is reached
// (StoreOptions::spill_to_disk). Off when `directory` is empty.
struct SpillConfig {
  std::string directory;    // where the spill files go (exists)
  std::string file_prefix;  // unique per sequence in `directory`
  // The sequence's budget: its sink and recent window (resolved at each
  // layer's length) are never spilled.
  BudgetPolicy budget;
  // Called before a spill reads blocks for writing and gives their memory
  // back to the arena (may be empty). A caller whose rows a device writes or
  // reads asynchronously (a CUDA store) waits there for that work, so no
  // block leaves DRAM with a kernel still using it; an error stops the spill.
  std::function<Status()> before_spill;
  bool enabled() const { return !directory.empty(); }
};

class KvRowStore {
 public:
  // 128 rows: 64 KiB per block at Llama-3.1-8B geometry, so a short sequence
  // holds 16 MiB over 32 layers x 8 KV heads (256 rows: twice that, with no
  // gain in gather bandwidth, which depends on the row size only).
  static constexpr int kBlockShift = 7;
  static constexpr int64_t kTokensPerBlock = int64_t{1} << kBlockShift;

  // Bytes of one block for `spec`: what the store's arena must hand out.
  static int64_t block_bytes(const ModelSpec& spec) { return kTokensPerBlock * spec.row_bytes(); }

  // `arena` hands out blocks of block_bytes(spec) and is shared with the
  // Store's other sequences.
  KvRowStore(const ModelSpec& spec, std::shared_ptr<BlockArena> arena, SpillConfig spill = {});
  ~KvRowStore();
  KvRowStore(const KvRowStore&) = delete;
  KvRowStore& operator=(const KvRowStore&) = delete;

  const ModelSpec& spec() const { return spec_; }
  int64_t length(int layer) const { return lengths_[layer]; }
  // Host bytes of the blocks this sequence holds in DRAM.
  int64_t bytes_held() const { return blocks_held_ * arena_->block_bytes(); }
  // Blocks (one (layer, KV head) each) whose rows are only in spill files.
  int64_t blocks_spilled() const { return spilled_ == nullptr ? 0 : spilled_->blocks(); }
  // The spilled rows, or null while nothing was spilled. A row-table entry
  // of a spilled block is null; its rows are read through this.
  SpilledRows* spilled() const { return spilled_.get(); }
  // Blocks of `layer` (one KV head each) whose rows are only in spill files.
  int64_t blocks_spilled(int layer) const { return spilled_per_layer_[layer]; }
  // Changes each time entries of `layer`'s table that were in place change
  // (a block spilled, or read back): a device copy of the table compares it
  // to re-copy them (DeviceRowTable::update). Appended blocks do not change it.
  int64_t table_version(int layer) const { return table_versions_[layer]; }

  // Appends keys and values [n, kv_heads, head_dim] (host memory, any dtype;
  // shapes checked by the caller) after the layer's last token. All or nothing:
  // on failure the layer is as it was. With spilling on, a full budget
  // first moves cold blocks to disk (see grow_blocks); ResourceExhausted
  // only when no cold block is left, IoError when the disk fails.
  Status append(int layer, const TensorView& keys, const TensorView& values);

  // Grows the layer by n tokens whose rows someone else writes (a GPU kernel
  // through the block pointers); takes the blocks they need. All or nothing.
  Status extend(int layer, int64_t n);

  // Forgets the tokens of `layer` from `length` on (length <= length(layer)),
  // keeping their blocks for the next append: how a caller undoes an append
  // whose later steps failed.
  void truncate(int layer, int64_t length);

  // Takes now the blocks of every layer up to `max_tokens` tokens, so later
  // appends up to that length take none. All or nothing. With spilling on it
  // takes nothing: the rows past the budget go to disk as they arrive.
  Status reserve(int64_t max_tokens);
  // reserve(), and with spilling on: takes the blocks when the arena has
  // room for all of them, else nothing (OK either way; the rows past the
  // budget then go to disk as they arrive). How a CUDA store has rows ahead
  // of time for the appends a captured graph replays while they fit in DRAM.
  Status reserve_if_room(int64_t max_tokens);

  // Blocks each head of every layer holds: [layer]. With
  // release_blocks_past, how a caller undoes a reserve whose later steps
  // failed.
  std::vector<int64_t> block_counts() const;

  // Gives back to the arena every block of layer l past max(blocks[l], the
  // blocks its length needs). `blocks` has one entry per layer. A device
  // copy of the row table must drop the released entries before it is read
  // (DeviceRowTable::update does).
  void release_blocks_past(const std::vector<int64_t>& blocks);

  // The row of (layer, head, token): head_dim keys then head_dim values;
  // null when its block is spilled.
  const std::byte* row(int layer, int head, int64_t token) const;

  // Keys of tokens [begin, end) of every head as fp32: out [end - begin,
  // kv_heads, head_dim]. Spilled rows are read back from disk, eight blocks'
  // worth of tokens per batch of page reads (the errors of SpilledRows::read).
  [[nodiscard]] Status keys_as_float(int layer, int64_t begin, int64_t end, float* out) const;

  // Where `layer`'s rows are, for host code: the table is host memory, valid
  // until the layer next grows or spills. A null block pointer marks a block
  // whose rows are only on disk (spilled()). A device kernel may dereference
  // the block pointers when arena().device_readable().
  RowTableView host_table(int layer) const;
  // Blocks each head of `layer` holds (at least enough for its length).
  int64_t num_blocks(int layer) const {
    return static_cast<int64_t>(blocks_[layer].size()) / spec_.num_kv_heads;
  }
  const BlockArena& arena() const { return *arena_; }

 private:
  // Makes every head of `layer` hold blocks for `tokens` tokens; with
  // spilling on, spills cold blocks when the budget is reached.
  Status grow_blocks(int layer, int64_t tokens);
  // Moves at least `entries` block entries (whole layer blocks: every KV
  // head) to disk, coldest first, and gives their memory to the arena.
  // ResourceExhausted when too few cold blocks are left.
  Status spill_cold(int64_t entries);
  // reserve() without the spilling check.
  Status take_blocks(int64_t max_tokens);
  // Brings back to DRAM the spilled blocks of tokens [begin, end) of `layer`
  // (spilled before a truncate), so rows can be written there again.
  Status refill_spilled(int layer, int64_t begin, int64_t end);
  // Writes tokens [first, first + n) of keys and values after the layer's last token.
  Status append_rows(int layer, const TensorView& keys, const TensorView& values, int64_t first,
                     int64_t n);

  ModelSpec spec_;
  std::shared_ptr<BlockArena> arena_;
  std::vector<int64_t> lengths_;  // [layer]
  // [layer] -> [block][kv_heads], the RowTableView layout, so the device
  // table is a copy of it.
  std::vector<std::vector<std::byte*>> blocks_;
  int64_t blocks_held_ = 0;  // blocks in DRAM
  SpillConfig spill_config_;
  std::unique_ptr<SpilledRows> spilled_;    // made at the first spill
  std::vector<int64_t> spilled_per_layer_;  // [layer] blocks only on disk
  std::vector<int64_t> table_versions_;     // [layer] see table_version()
};

}  // namespace pqkv::storage
