#include "storage/kv_row_store.h"

#include <cassert>
#include <string>

namespace pqkv::storage {

KvRowStore::KvRowStore(const ModelSpec& spec, MemoryBudget* budget,
                       std::shared_ptr<SlabAllocator> allocator)
    : spec_(spec),
      budget_(budget),
      allocator_(std::move(allocator)),
      lengths_(spec.num_layers, 0),
      slabs_(static_cast<size_t>(spec.num_layers) * spec.num_kv_heads) {}

KvRowStore::~KvRowStore() {
  if (budget_ != nullptr) budget_->release(bytes_reserved_);
}

Status KvRowStore::extend(int layer, int64_t n) {
  const int64_t end = lengths_[layer] + n;
  const int kv_heads = spec_.num_kv_heads;

  // Reserve and allocate every new slab first, so a failure changes nothing.
  const int64_t have = static_cast<int64_t>(slabs(layer, 0).size());
  const int64_t need = (end + kTokensPerSlab - 1) / kTokensPerSlab;
  const int64_t new_slabs = (need - have) * kv_heads;
  if (new_slabs > 0) {
    const int64_t bytes = new_slabs * slab_bytes();
    if (budget_ != nullptr) {
      PQKV_RETURN_IF_ERROR(budget_->reserve(bytes, "appending keys and values"));
    }
    std::vector<Slab> fresh;
    fresh.reserve(new_slabs);
    for (int64_t i = 0; i < new_slabs; ++i) {
      auto p = allocator_->allocate(slab_bytes());
      if (!p.ok()) {
        fresh.clear();  // frees what this call allocated before the budget is released
        if (budget_ != nullptr) budget_->release(bytes);
        return p.status();
      }
      fresh.emplace_back(p.value(), SlabDeleter{allocator_.get()});
    }
    bytes_reserved_ += bytes;
    int64_t next = 0;
    for (int h = 0; h < kv_heads; ++h) {
      for (int64_t s = have; s < need; ++s)
        slabs(layer, h).push_back(std::move(fresh[next++]));
    }
  }

  lengths_[layer] = end;
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
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < kv_heads; ++h) {
      auto* dst = const_cast<std::byte*>(row(layer, h, begin + i));
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

const std::byte* KvRowStore::row(int layer, int head, int64_t token) const {
  const auto& s = slabs(layer, head);
  return s[token / kTokensPerSlab].get() + (token % kTokensPerSlab) * spec_.row_bytes();
}

void KvRowStore::keys_as_float(int layer, int64_t begin, int64_t end, float* out) const {
  const int kv_heads = spec_.num_kv_heads;
  const int d = spec_.head_dim;
  for (int64_t t = begin; t < end; ++t) {
    for (int h = 0; h < kv_heads; ++h) {
      convert_to_float(row(layer, h, t), spec_.dtype, d, out + ((t - begin) * kv_heads + h) * d);
    }
  }
}

}  // namespace pqkv::storage
