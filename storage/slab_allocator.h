// Where the row store's slabs come from: the heap for the CPU backend, pinned
// and mapped host memory for the GPU backend (a kernel then reads rows
// straight over PCIe, zero-copy). Slabs are a few MB each: single huge pinned
// allocations fail on some systems.
#pragma once

#include <cstddef>
#include <memory>

#include "pqkv/status.h"

namespace pqkv::storage {

class SlabAllocator {
 public:
  virtual ~SlabAllocator() = default;
  // Allocates `bytes`; never returns null with an OK status.
  virtual Result<std::byte*> allocate(size_t bytes) = 0;
  virtual void deallocate(std::byte* p) = 0;
  // True when a CUDA kernel can read the slabs through their host pointers.
  virtual bool device_readable() const = 0;
};

// Plain heap memory.
std::shared_ptr<SlabAllocator> make_heap_slab_allocator();
// cudaHostAlloc(mapped | portable) memory; Unavailable without CUDA.
Result<std::shared_ptr<SlabAllocator>> make_pinned_slab_allocator();

}  // namespace pqkv::storage
