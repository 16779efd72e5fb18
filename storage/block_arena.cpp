#include "storage/block_arena.h"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <string>

#include "core/host_memory.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace pqkv::storage {
namespace {

constexpr size_t kChunkAlignment = 256;

class HeapChunkAllocator final : public ChunkAllocator {
 public:
  Result<std::byte*> allocate(size_t bytes) override {
    const size_t rounded = (bytes + kChunkAlignment - 1) / kChunkAlignment * kChunkAlignment;
    auto* p = static_cast<std::byte*>(std::aligned_alloc(kChunkAlignment, rounded));
    if (p == nullptr) {
      return Status::resource_exhausted("out of host memory allocating a " +
                                        std::to_string(bytes >> 10) + " KiB chunk of row blocks");
    }
    return p;
  }
  void deallocate(std::byte* p) override { std::free(p); }
  bool device_readable() const override { return false; }
};

#if PQKV_HAVE_CUDA
class PinnedChunkAllocator final : public ChunkAllocator {
 public:
  Result<std::byte*> allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::resource_exhausted("cudaHostAlloc of " + std::to_string(bytes >> 10) +
                                        " KiB of pinned memory failed: " + cudaGetErrorString(err) +
                                        "; lower the DRAM budget or free pinned memory");
    }
    return static_cast<std::byte*>(p);
  }
  void deallocate(std::byte* p) override { cudaFreeHost(p); }
  bool device_readable() const override { return true; }
};
#endif

}  // namespace

std::unique_ptr<ChunkAllocator> make_heap_chunk_allocator() {
  return std::make_unique<HeapChunkAllocator>();
}

Result<std::unique_ptr<ChunkAllocator>> make_pinned_chunk_allocator() {
#if PQKV_HAVE_CUDA
  return std::unique_ptr<ChunkAllocator>(std::make_unique<PinnedChunkAllocator>());
#else
  return Status::unavailable("pinned memory needs CUDA; this build of pqkv has none");
#endif
}

BlockArena::BlockArena(int64_t block_bytes, MemoryBudget* budget,
                       std::unique_ptr<ChunkAllocator> chunks)
    : block_bytes_(block_bytes),
      blocks_per_chunk_(std::max<int64_t>(1, kChunkBytes / block_bytes)),
      budget_(budget),
      chunks_(std::move(chunks)),
      device_readable_(chunks_->device_readable()) {}

BlockArena::~BlockArena() {
  for (const auto& [chunk, bytes] : held_)
    chunks_->deallocate(chunk);
  if (budget_ != nullptr) budget_->release(bytes_held_);
}

std::shared_ptr<BlockArena> BlockArena::heap(int64_t block_bytes, MemoryBudget* budget) {
  return std::make_shared<BlockArena>(block_bytes, budget, make_heap_chunk_allocator());
}

Result<std::shared_ptr<BlockArena>> BlockArena::pinned(int64_t block_bytes, MemoryBudget* budget) {
  PQKV_ASSIGN_OR_RETURN(auto chunks, make_pinned_chunk_allocator());
  return std::make_shared<BlockArena>(block_bytes, budget, std::move(chunks));
}

Status BlockArena::check_fits(int64_t blocks, const char* what) const {
  // More than the machine's memory cannot be pinned, nor held on the heap
  // once used: refused at once rather than after allocating until the system
  // refuses (seconds for a petabyte).
  return check_fits_host_memory(static_cast<double>(blocks) * static_cast<double>(block_bytes_),
                                std::string(what) + " (" + std::to_string(blocks) + " blocks of " +
                                    std::to_string(block_bytes_) + " bytes)");
}

Status BlockArena::grow(int64_t blocks, int64_t blocks_per_chunk, bool shrink_tail,
                        const char* what) {
  PQKV_RETURN_IF_ERROR(check_fits(blocks, what));
  const int64_t full = (blocks - 1) / blocks_per_chunk;
  const int64_t tail_exact = blocks - full * blocks_per_chunk;
  int64_t tail = tail_exact;
  if (shrink_tail) {
    // Whole chunks, except that the last one shrinks to what is missing when
    // a whole one would pass the budget: a budget is usable to its last block.
    tail = blocks_per_chunk;
    if (budget_ != nullptr && budget_->limit() > 0 &&
        budget_->used() + (full + 1) * blocks_per_chunk * block_bytes_ > budget_->limit()) {
      tail = tail_exact;
    }
  }
  const int64_t bytes = (full * blocks_per_chunk + tail) * block_bytes_;
  if (budget_ != nullptr) PQKV_RETURN_IF_ERROR(budget_->reserve(bytes, what));
  std::vector<std::pair<std::byte*, int64_t>> fresh;
  const auto undo = [&] {
    for (const auto& [chunk, b] : fresh)
      chunks_->deallocate(chunk);
    if (budget_ != nullptr) budget_->release(bytes);
  };
  try {
    fresh.reserve(static_cast<size_t>(full + 1));
  } catch (const std::bad_alloc&) {
    undo();
    return Status::resource_exhausted("out of host memory for the block arena's bookkeeping");
  }
  for (int64_t c = 0; c <= full; ++c) {
    const int64_t n = c < full ? blocks_per_chunk : tail;
    auto p = chunks_->allocate(static_cast<size_t>(n * block_bytes_));
    if (!p.ok()) {
      undo();
      return p.status();
    }
    fresh.emplace_back(p.value(), n * block_bytes_);
  }
  // Only growth of the two vectors can fail from here; reserve first so
  // that a failure leaves the arena unchanged.
  try {
    held_.reserve(held_.size() + fresh.size());
    free_.reserve(blocks_total_ + bytes / block_bytes_);  // release() never grows it
  } catch (const std::bad_alloc&) {
    undo();
    return Status::resource_exhausted("out of host memory for the block arena's bookkeeping");
  }
  for (const auto& [chunk, b] : fresh) {
    held_.emplace_back(chunk, b);
    // Pushed in reverse so blocks leave in address order.
    for (int64_t i = b / block_bytes_ - 1; i >= 0; --i)
      free_.push_back(chunk + i * block_bytes_);
  }
  bytes_held_ += bytes;
  blocks_total_ += bytes / block_bytes_;
  chunks_allocated_ += static_cast<int64_t>(fresh.size());
  return ok_status();
}

Status BlockArena::allocate(int64_t n, std::vector<std::byte*>* out) {
  if (n <= 0) return ok_status();
  try {
    out->reserve(out->size() + n);
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the block list");
  }
  std::lock_guard lock(mutex_);
  const int64_t missing = n - static_cast<int64_t>(free_.size());
  if (missing > 0) {
    PQKV_RETURN_IF_ERROR(
        grow(missing, blocks_per_chunk_, /*shrink_tail=*/true, "storing keys and values"));
  }
  for (int64_t i = 0; i < n; ++i) {
    out->push_back(free_.back());
    free_.pop_back();
  }
  return ok_status();
}

Status BlockArena::preallocate(int64_t bytes) {
  if (bytes <= 0) return ok_status();
  // Rounded up without bytes + block_bytes_ - 1, which overflows near INT64_MAX.
  const int64_t blocks = bytes / block_bytes_ + (bytes % block_bytes_ != 0 ? 1 : 0);
  std::lock_guard lock(mutex_);
  const int64_t missing = blocks - static_cast<int64_t>(free_.size());
  if (missing <= 0) return ok_status();
  return grow(missing, std::max<int64_t>(1, kPreallocChunkBytes / block_bytes_),
              /*shrink_tail=*/false, "preallocating rows for keys and values");
}

void BlockArena::release(std::byte* const* blocks, int64_t n) {
  std::lock_guard lock(mutex_);
  for (int64_t i = 0; i < n; ++i)
    free_.push_back(blocks[i]);
}

int64_t BlockArena::bytes_held() const {
  std::lock_guard lock(mutex_);
  return bytes_held_;
}

int64_t BlockArena::blocks_in_use() const {
  std::lock_guard lock(mutex_);
  return blocks_total_ - static_cast<int64_t>(free_.size());
}

int64_t BlockArena::blocks_free() const {
  std::lock_guard lock(mutex_);
  return static_cast<int64_t>(free_.size());
}

int64_t BlockArena::chunks_allocated() const {
  std::lock_guard lock(mutex_);
  return chunks_allocated_;
}

}  // namespace pqkv::storage
