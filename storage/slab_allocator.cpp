#include "storage/slab_allocator.h"

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if PQKV_HAVE_CUDA
#include "core/cuda_check.h"
#endif

namespace pqkv::storage {
namespace {

class HeapSlabAllocator final : public SlabAllocator {
 public:
  Result<std::byte*> allocate(size_t bytes) override {
    auto* p = static_cast<std::byte*>(std::malloc(bytes));
    if (p == nullptr) {
      return Status::resource_exhausted("out of host memory allocating a " +
                                        std::to_string(bytes >> 10) + " KiB slab");
    }
    return p;
  }
  void deallocate(std::byte* p) override { std::free(p); }
  bool device_readable() const override { return false; }
};

#if PQKV_HAVE_CUDA
// Pinned slabs carved out of larger pinned chunks: cudaHostAlloc costs about a
// millisecond a call, and a long context needs thousands of slabs. Freed
// slabs are reused for slabs of the same size; chunks go back when the
// allocator does.
class PinnedSlabAllocator final : public SlabAllocator {
 public:
  ~PinnedSlabAllocator() override {
    for (void* c : chunks_)
      cudaFreeHost(c);
  }

  Result<std::byte*> allocate(size_t bytes) override {
    std::lock_guard lock(mutex_);
    auto& free = free_[bytes];
    if (!free.empty()) {
      std::byte* p = free.back();
      free.pop_back();
      return p;
    }
    if (bytes > kChunkBytes / 4) return host_alloc(bytes);
    if (chunk_left_ < bytes) {
      PQKV_ASSIGN_OR_RETURN(chunk_next_, host_alloc(kChunkBytes));
      chunk_left_ = kChunkBytes;
    }
    std::byte* p = chunk_next_;
    chunk_next_ += bytes;
    chunk_left_ -= bytes;
    sizes_[p] = bytes;
    return p;
  }

  void deallocate(std::byte* p) override {
    std::lock_guard lock(mutex_);
    free_[sizes_.at(p)].push_back(p);
  }

  bool device_readable() const override { return true; }

 private:
  static constexpr size_t kChunkBytes = size_t{64} << 20;

  // A new pinned, mapped allocation owned by the allocator.
  Result<std::byte*> host_alloc(size_t bytes) {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::resource_exhausted("cudaHostAlloc of " + std::to_string(bytes >> 20) +
                                        " MiB of pinned memory failed: " + cudaGetErrorString(err) +
                                        "; lower the DRAM budget or free pinned memory");
    }
    chunks_.push_back(p);
    sizes_[static_cast<std::byte*>(p)] = bytes;
    return static_cast<std::byte*>(p);
  }

  std::mutex mutex_;
  std::vector<void*> chunks_;
  std::byte* chunk_next_ = nullptr;
  size_t chunk_left_ = 0;
  std::unordered_map<std::byte*, size_t> sizes_;              // every slab handed out
  std::unordered_map<size_t, std::vector<std::byte*>> free_;  // by size
};
#endif

}  // namespace

std::shared_ptr<SlabAllocator> make_heap_slab_allocator() {
  return std::make_shared<HeapSlabAllocator>();
}

Result<std::shared_ptr<SlabAllocator>> make_pinned_slab_allocator() {
#if PQKV_HAVE_CUDA
  return std::shared_ptr<SlabAllocator>(std::make_shared<PinnedSlabAllocator>());
#else
  return Status::unavailable("pinned slabs need CUDA; this build of pqkv has none");
#endif
}

}  // namespace pqkv::storage
