#include "storage/kv_row_store.h"

#include <algorithm>
#include <cassert>
#include <new>
#include <string>

namespace pqkv::storage {

KvRowStore::KvRowStore(const ModelSpec& spec, std::shared_ptr<BlockArena> arena)
    : spec_(spec),
      arena_(std::move(arena)),
      lengths_(spec.num_layers, 0),
      blocks_(spec.num_layers) {}

KvRowStore::~KvRowStore() {
  for (const auto& b : blocks_)
    arena_->release(b.data(), static_cast<int64_t>(b.size()));
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
  PQKV_RETURN_IF_ERROR(arena_->allocate((need - have) * kv_heads, &list));
  blocks_held_ += (need - have) * kv_heads;
  return ok_status();
}

Status KvRowStore::extend(int layer, int64_t n) {
  PQKV_RETURN_IF_ERROR(grow_blocks(layer, lengths_[layer] + n));
  lengths_[layer] += n;
  return ok_status();
}

Status KvRowStore::reserve(int64_t max_tokens) {
  const int kv_heads = spec_.num_kv_heads;
  const int64_t per_head = (max_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  int64_t missing = 0;
  for (int l = 0; l < spec_.num_layers; ++l)
    missing += std::max<int64_t>(0, per_head - num_blocks(l)) * kv_heads;
  if (missing == 0) return ok_status();
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

Status KvRowStore::append(int layer, const TensorView& keys, const TensorView& values) {
  const int64_t n = keys.dim(0);
  if (n == 0) return ok_status();
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
      const int64_t src = (i * kv_heads + h) * d;
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
  return host_table(layer).row(head, token);
}

void KvRowStore::keys_as_float(int layer, int64_t begin, int64_t end, float* out) const {
  const int kv_heads = spec_.num_kv_heads;
  const int d = spec_.head_dim;
  const RowTableView table = host_table(layer);
  for (int64_t t = begin; t < end; ++t) {
    for (int h = 0; h < kv_heads; ++h) {
      convert_to_float(table.row(h, t), spec_.dtype, d, out + ((t - begin) * kv_heads + h) * d);
    }
  }
}

}  // namespace pqkv::storage
