#include "storage/slab_allocator.h"

#include <cstdlib>
#include <string>

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
class PinnedSlabAllocator final : public SlabAllocator {
 public:
  Result<std::byte*> allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::resource_exhausted("cudaHostAlloc of a " + std::to_string(bytes >> 10) +
                                        " KiB pinned slab failed: " + cudaGetErrorString(err) +
                                        "; lower the DRAM budget or free pinned memory");
    }
    return static_cast<std::byte*>(p);
  }
  void deallocate(std::byte* p) override { cudaFreeHost(p); }
  bool device_readable() const override { return true; }
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
