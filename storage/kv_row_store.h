// Keys and values of one sequence in host memory, one row per
// (layer, KV head, token): K (head_dim values) then V, in the model's dtype,
// so a row is 512 B at head_dim 128 in bf16 and a gather moves whole rows.
// Rows of one (layer, KV head) are in token order, in slabs of
// kTokensPerSlab rows, so the store grows without moving what it holds and no
// single allocation is huge.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"
#include "storage/memory_budget.h"
#include "storage/slab_allocator.h"

namespace pqkv::storage {

class KvRowStore {
 public:
  static constexpr int64_t kTokensPerSlab = 4096;

  // `budget` may be null (unlimited) and must outlive the store.
  KvRowStore(const ModelSpec& spec, MemoryBudget* budget,
             std::shared_ptr<SlabAllocator> allocator = make_heap_slab_allocator());
  ~KvRowStore();
  KvRowStore(const KvRowStore&) = delete;
  KvRowStore& operator=(const KvRowStore&) = delete;

  const ModelSpec& spec() const { return spec_; }
  int64_t length(int layer) const { return lengths_[layer]; }
  int64_t bytes_reserved() const { return bytes_reserved_; }

  // Appends keys and values [n, kv_heads, head_dim] (host memory, any dtype;
  // shapes checked by the caller) after the layer's last token. All or nothing:
  // on failure the layer is as it was.
  Status append(int layer, const TensorView& keys, const TensorView& values);

  // Grows the layer by n tokens whose rows someone else writes (a GPU kernel
  // through the slab pointers); allocates the slabs they need. All or nothing.
  Status extend(int layer, int64_t n);

  // Forgets the tokens of `layer` from `length` on (length <= length(layer)),
  // keeping their slabs for the next append: how a caller undoes an append
  // whose later steps failed.
  void truncate(int layer, int64_t length);

  // The row of (layer, head, token): head_dim keys then head_dim values.
  const std::byte* row(int layer, int head, int64_t token) const;

  // Keys of tokens [begin, end) of every head as fp32: out [end - begin, kv_heads, head_dim].
  void keys_as_float(int layer, int64_t begin, int64_t end, float* out) const;

  // Slab `s` of (layer, head): kTokensPerSlab rows. A device kernel may read
  // it directly when allocator().device_readable().
  const std::byte* slab(int layer, int head, int64_t s) const {
    return slabs(layer, head)[s].get();
  }
  int64_t num_slabs(int layer) const { return static_cast<int64_t>(slabs(layer, 0).size()); }
  const SlabAllocator& allocator() const { return *allocator_; }

 private:
  struct SlabDeleter {
    SlabAllocator* allocator = nullptr;
    void operator()(std::byte* p) const { allocator->deallocate(p); }
  };
  using Slab = std::unique_ptr<std::byte[], SlabDeleter>;

  std::vector<Slab>& slabs(int layer, int head) {
    return slabs_[static_cast<size_t>(layer) * spec_.num_kv_heads + head];
  }
  const std::vector<Slab>& slabs(int layer, int head) const {
    return slabs_[static_cast<size_t>(layer) * spec_.num_kv_heads + head];
  }
  int64_t slab_bytes() const { return kTokensPerSlab * spec_.row_bytes(); }

  ModelSpec spec_;
  MemoryBudget* budget_;
  std::shared_ptr<SlabAllocator> allocator_;
  std::vector<int64_t> lengths_;          // [layer]
  std::vector<std::vector<Slab>> slabs_;  // [layer * kv_heads + head]
  int64_t bytes_reserved_ = 0;
};

}  // namespace pqkv::storage
