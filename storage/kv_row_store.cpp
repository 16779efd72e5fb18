#include "storage/kv_row_store.h"

#include <algorithm>
#include <cassert>
#include <new>
#include <string>
#include <vector>

namespace pqkv::storage {

KvRowStore::KvRowStore(const ModelSpec& spec, std::shared_ptr<BlockArena> arena, SpillConfig spill)
    : spec_(spec),
      arena_(std::move(arena)),
      lengths_(spec.num_layers, 0),
      blocks_(spec.num_layers),
      spill_config_(std::move(spill)),
      spilled_per_layer_(spec.num_layers, 0),
      table_versions_(spec.num_layers, 0) {}

KvRowStore::~KvRowStore() {
  for (const auto& list : blocks_) {
    for (std::byte* b : list) {
      if (b != nullptr) arena_->release(&b, 1);
    }
  }
}

Status KvRowStore::spill_cold(int64_t entries) {
  const int kv_heads = spec_.num_kv_heads;
  if (spilled_ == nullptr) {
    PQKV_ASSIGN_OR_RETURN(spilled_,
                          SpilledRows::create(spill_config_.directory, spill_config_.file_prefix,
                                              spec_.row_bytes(), kTokensPerBlock));
  }
  // Spill in batches of at least an eighth of what this sequence holds, so
  // a long generation writes tens of files, not one per block.
  const int64_t want = std::max(entries, blocks_held_ / 8);
  // Coldest first = oldest first: the middle blocks nearest the start,
  // never a block holding a sink token or a token of the recent window. The
  // CPU store keeps no per-block selection counts, and under recency-weighted
  // attention (real models, the synthetic workload) the oldest middle
  // tokens are the least selected; the order is also deterministic, which
  // the equality tests and the figure rely on.
  std::vector<SpilledRows::BlockWrite> victims;
  int64_t max_blocks = 0;
  for (int l = 0; l < spec_.num_layers; ++l)
    max_blocks = std::max(max_blocks, num_blocks(l));
  try {
    for (int64_t b = 0; b < max_blocks && static_cast<int64_t>(victims.size()) < want; ++b) {
      for (int l = 0; l < spec_.num_layers; ++l) {
        const BudgetPolicy::Counts counts = spill_config_.budget.resolve(lengths_[l], lengths_[l]);
        const int64_t first = b * kTokensPerBlock;
        const int64_t hot_tail = std::max<int64_t>(lengths_[l] - counts.window, 0);
        if (b >= num_blocks(l) || first < counts.sink || first + kTokensPerBlock > hot_tail) {
          continue;
        }
        if (blocks_[l][b * kv_heads] == nullptr) continue;
        for (int h = 0; h < kv_heads; ++h) {
          victims.push_back({l, b * kv_heads + h, blocks_[l][b * kv_heads + h]});
        }
      }
    }
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory listing row blocks to spill");
  }
  if (static_cast<int64_t>(victims.size()) < entries) {
    return Status::resource_exhausted(
        "the DRAM budget is full and only " + std::to_string(victims.size() / kv_heads) +
        " cold row blocks are left to spill, " + std::to_string(entries / kv_heads) +
        " needed (sinks and recent windows stay in DRAM); raise "
        "StoreOptions::dram_budget_bytes or drop sequences");
  }
  if (spill_config_.before_spill) PQKV_RETURN_IF_ERROR(spill_config_.before_spill());
  PQKV_RETURN_IF_ERROR(spilled_->write(victims));
  for (const auto& v : victims) {
    std::byte*& slot = blocks_[v.layer][v.entry];
    arena_->release(&slot, 1);
    slot = nullptr;
    ++spilled_per_layer_[v.layer];
    ++table_versions_[v.layer];
  }
  blocks_held_ -= static_cast<int64_t>(victims.size());
  return ok_status();
}

Status KvRowStore::grow_blocks(int layer, int64_t tokens) {
  const int kv_heads = spec_.num_kv_heads;
  const int64_t have = num_blocks(layer);
  const int64_t need = (tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  if (need <= have) return ok_status();
  std::vector<std::byte*>& list = blocks_[layer];
  try {
    list.reserve(static_cast<size_t>(need) * kv_heads);
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the block table of layer " +
                                      std::to_string(layer));
  }
  // The blocks go straight into the reserved list: no step below can fail.
  const int64_t entries = (need - have) * kv_heads;
  Status s = arena_->allocate(entries, &list);
  if (s.code() == StatusCode::kResourceExhausted && spill_config_.enabled()) {
    PQKV_RETURN_IF_ERROR(spill_cold(entries));
    s = arena_->allocate(entries, &list);
  }
  PQKV_RETURN_IF_ERROR(s);
  blocks_held_ += (need - have) * kv_heads;
  return ok_status();
}

Status KvRowStore::refill_spilled(int layer, int64_t begin, int64_t end) {
  if (spilled_ == nullptr || end <= begin) return ok_status();
  const int kv_heads = spec_.num_kv_heads;
  for (int64_t b = begin >> kBlockShift; b <= (end - 1) >> kBlockShift; ++b) {
    for (int h = 0; h < kv_heads; ++h) {
      std::byte*& slot = blocks_[layer][b * kv_heads + h];
      if (slot != nullptr) continue;
      // A block spilled before a truncate: rows are about to be written
      // into it again, so it comes back to DRAM (its old rows, before
      // `begin`, are read back first).
      std::vector<std::byte*> fresh;
      Status s = arena_->allocate(1, &fresh);
      if (s.code() == StatusCode::kResourceExhausted) {
        PQKV_RETURN_IF_ERROR(spill_cold(1));
        s = arena_->allocate(1, &fresh);
      }
      PQKV_RETURN_IF_ERROR(s);
      s = spilled_->read_block(layer, b * kv_heads + h, fresh[0]);
      if (!s.ok()) {
        arena_->release(fresh.data(), 1);
        return s;
      }
      spilled_->forget(layer, b * kv_heads + h);
      slot = fresh[0];
      ++blocks_held_;
      --spilled_per_layer_[layer];
      ++table_versions_[layer];
    }
  }
  return ok_status();
}

Status KvRowStore::extend(int layer, int64_t n) {
  PQKV_RETURN_IF_ERROR(grow_blocks(layer, lengths_[layer] + n));
  PQKV_RETURN_IF_ERROR(refill_spilled(layer, lengths_[layer], lengths_[layer] + n));
  lengths_[layer] += n;
  return ok_status();
}

Status KvRowStore::reserve(int64_t max_tokens) {
  if (spill_config_.enabled()) return ok_status();
  return take_blocks(max_tokens);
}

Status KvRowStore::reserve_if_room(int64_t max_tokens) {
  if (!spill_config_.enabled()) return take_blocks(max_tokens);
  const Status s = take_blocks(max_tokens);
  return s.code() == StatusCode::kResourceExhausted ? ok_status() : s;
}

Status KvRowStore::take_blocks(int64_t max_tokens) {
  const int kv_heads = spec_.num_kv_heads;
  // Rounded up without max_tokens + kTokensPerBlock - 1, which overflows.
  const int64_t per_head = max_tokens / kTokensPerBlock + (max_tokens % kTokensPerBlock != 0);
  int64_t missing = 0;
  for (int l = 0; l < spec_.num_layers; ++l)
    missing += std::max<int64_t>(0, per_head - num_blocks(l)) * kv_heads;
  if (missing == 0) return ok_status();
  PQKV_RETURN_IF_ERROR(arena_->check_fits(missing, "reserving rows"));
  std::vector<std::byte*> fresh;
  try {
    fresh.reserve(missing);
    for (auto& list : blocks_)
      list.reserve(std::max<size_t>(list.size(), static_cast<size_t>(per_head) * kv_heads));
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the block tables");
  }
  PQKV_RETURN_IF_ERROR(arena_->allocate(missing, &fresh));
  size_t next = 0;
  for (auto& list : blocks_) {
    while (static_cast<int64_t>(list.size()) < per_head * kv_heads)
      list.push_back(fresh[next++]);
  }
  blocks_held_ += missing;
  return ok_status();
}

std::vector<int64_t> KvRowStore::block_counts() const {
  std::vector<int64_t> counts(blocks_.size());
  for (size_t l = 0; l < blocks_.size(); ++l)
    counts[l] = num_blocks(static_cast<int>(l));
  return counts;
}

void KvRowStore::release_blocks_past(const std::vector<int64_t>& blocks) {
  const int kv_heads = spec_.num_kv_heads;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const int64_t needed = (lengths_[l] + kTokensPerBlock - 1) / kTokensPerBlock;
    const int64_t keep = std::max(blocks[l], needed) * kv_heads;
    std::vector<std::byte*>& list = blocks_[l];
    if (static_cast<int64_t>(list.size()) <= keep) continue;
    const int64_t extra = static_cast<int64_t>(list.size()) - keep;
    // Blocks past the length are never spilled, so every entry is in DRAM.
    arena_->release(list.data() + keep, extra);
    list.resize(static_cast<size_t>(keep));
    blocks_held_ -= extra;
  }
}

Status KvRowStore::append(int layer, const TensorView& keys, const TensorView& values) {
  const int64_t n = keys.dim(0);
  if (n == 0) return ok_status();
  const int64_t before = lengths_[layer];
  // With spilling on, a long append goes a block at a time, so the rows it
  // wrote first can leave DRAM to make room for the rest.
  const int64_t piece = spill_config_.enabled() ? kTokensPerBlock : n;
  for (int64_t i = 0; i < n; i += piece) {
    const Status s = append_rows(layer, keys, values, i, std::min(piece, n - i));
    if (!s.ok()) {
      lengths_[layer] = before;
      return s;
    }
  }
  return ok_status();
}

Status KvRowStore::append_rows(int layer, const TensorView& keys, const TensorView& values,
                               int64_t first, int64_t n) {
  const int64_t begin = lengths_[layer];
  const int kv_heads = spec_.num_kv_heads;
  const int d = spec_.head_dim;
  PQKV_RETURN_IF_ERROR(extend(layer, n));
  const DType dt = spec_.dtype;
  const int64_t half_row = int64_t{d} * dtype_size(dt);
  const RowTableView table = host_table(layer);
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < kv_heads; ++h) {
      std::byte* dst = table.row(h, begin + i);
      const int64_t src = ((first + i) * kv_heads + h) * d;
      convert_elements(keys.data, keys.dtype, src, d, dst, dt);
      convert_elements(values.data, values.dtype, src, d, dst + half_row, dt);
    }
  }
  return ok_status();
}

void KvRowStore::truncate(int layer, int64_t length) {
  assert(length >= 0 && length <= lengths_[layer]);
  lengths_[layer] = length;
}

RowTableView KvRowStore::host_table(int layer) const {
  RowTableView t;
  t.blocks = blocks_[layer].data();
  t.kv_heads = spec_.num_kv_heads;
  t.head_dim = spec_.head_dim;
  t.row_dtype = spec_.dtype;
  t.row_bytes = spec_.row_bytes();
  t.tokens_per_block = kTokensPerBlock;
  t.block_shift = kBlockShift;
  return t;
}

const std::byte* KvRowStore::row(int layer, int head, int64_t token) const {
  const RowTableView table = host_table(layer);
  if (table.blocks[table.block_index(head, token)] == nullptr) return nullptr;
  return table.row(head, token);
}

Status KvRowStore::keys_as_float(int layer, int64_t begin, int64_t end, float* out) const {
  const int kv_heads = spec_.num_kv_heads;
  const int d = spec_.head_dim;
  const RowTableView table = host_table(layer);
  // Spilled rows are read back a group of blocks at a time, each group in
  // one batch of page reads at the ring's queue depth.
  constexpr int64_t kGroupBlocks = 8;
  std::vector<SpilledRows::RowRead> reads;
  std::vector<const std::byte*> spilled_rows;
  for (int64_t first = begin; first < end;) {
    const int64_t group_end = std::min(end, ((first >> kBlockShift) + kGroupBlocks) << kBlockShift);
    reads.clear();
    try {
      for (int64_t t = first; t < group_end; ++t) {
        for (int h = 0; h < kv_heads; ++h) {
          const int64_t entry = table.block_index(h, t);
          if (table.blocks[entry] == nullptr)
            reads.push_back({layer, entry, table.row_in_block(t)});
        }
      }
      spilled_rows.resize(reads.size());
    } catch (const std::bad_alloc&) {
      return Status::resource_exhausted("out of host memory listing spilled rows to read back");
    }
    if (!reads.empty()) PQKV_RETURN_IF_ERROR(spilled_->read(reads, spilled_rows.data(), nullptr));
    size_t next = 0;
    for (int64_t t = first; t < group_end; ++t) {
      for (int h = 0; h < kv_heads; ++h) {
        const std::byte* block = table.blocks[table.block_index(h, t)];
        const std::byte* row =
            block != nullptr ? block + table.offset_in_block(t) : spilled_rows[next++];
        convert_to_float(row, spec_.dtype, d, out + ((t - begin) * kv_heads + h) * d);
      }
    }
    first = group_end;
  }
  return ok_status();
}

}  // namespace pqkv::storage
