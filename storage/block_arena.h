// Fixed-size blocks of host memory shared by every sequence of a Store: the
// row store takes a block per (layer, KV head) for each kTokensPerBlock
// tokens, so memory follows the tokens held, and blocks a dropped sequence
// gives back serve the next one.
//
// Blocks are carved from larger chunks (cudaHostAlloc costs about a
// millisecond a call and single huge pinned allocations fail on some systems).
// Chunks come from the heap (CPU stores) or are pinned and mapped (CUDA
// stores: a kernel reads a block through its host pointer, zero-copy). Every
// chunk is charged to the Store's MemoryBudget when it is allocated and
// released when the arena goes, so the budget's use is exactly the host bytes
// the arena holds. Chunks are kept until the arena is destroyed.
//
// preallocate() takes blocks ahead of the appends, in chunks of
// kPreallocChunkBytes: pinning a gigabyte 16 MiB at a time from the prefill's
// thread costs hundreds of milliseconds of host time that a caller can spend
// before the prompt instead.
//
// Thread-safe: sequences of one Store allocate from many threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "pqkv/status.h"
#include "storage/memory_budget.h"

namespace pqkv::storage {

// Where an arena's chunks come from.
class ChunkAllocator {
 public:
  virtual ~ChunkAllocator() = default;
  // Allocates `bytes` (aligned to 256 B); never returns null with an OK status.
  virtual Result<std::byte*> allocate(size_t bytes) = 0;
  virtual void deallocate(std::byte* p) = 0;
  // True when a CUDA kernel can read the chunks through their host pointers.
  virtual bool device_readable() const = 0;
};

// Plain heap memory.
std::unique_ptr<ChunkAllocator> make_heap_chunk_allocator();
// cudaHostAlloc(mapped | portable) memory; Unavailable without CUDA.
Result<std::unique_ptr<ChunkAllocator>> make_pinned_chunk_allocator();

class BlockArena {
 public:
  // Chunks hold up to this many bytes (whole blocks; at least one block).
  static constexpr int64_t kChunkBytes = int64_t{16} << 20;
  // Chunks taken by preallocate() hold up to this many bytes: fewer, larger
  // cudaHostAlloc calls for the gigabytes a long prompt needs.
  static constexpr int64_t kPreallocChunkBytes = int64_t{256} << 20;

  // An arena of `block_bytes` blocks (a multiple of 16). `budget` may be null
  // (unlimited) and must outlive the arena.
  BlockArena(int64_t block_bytes, MemoryBudget* budget, std::unique_ptr<ChunkAllocator> chunks);
  ~BlockArena();
  BlockArena(const BlockArena&) = delete;
  BlockArena& operator=(const BlockArena&) = delete;

  // Heap arena, for CPU stores and tests.
  static std::shared_ptr<BlockArena> heap(int64_t block_bytes, MemoryBudget* budget = nullptr);
  // Pinned, mapped arena, for CUDA stores; Unavailable without CUDA.
  static Result<std::shared_ptr<BlockArena>> pinned(int64_t block_bytes,
                                                    MemoryBudget* budget = nullptr);

  // Appends `n` blocks to `out`. All or nothing: when a chunk cannot be had
  // (ResourceExhausted naming the budget to raise, or the allocator's error)
  // `out`, the budget and the arena are as they were.
  [[nodiscard]] Status allocate(int64_t n, std::vector<std::byte*>* out);
  // Gives blocks back for reuse; their contents are not kept.
  void release(std::byte* const* blocks, int64_t n);
  // Makes at least `bytes` (rounded up to whole blocks) of blocks free, so
  // that allocate() hands them out without allocating a chunk: takes only
  // the blocks missing from the free ones (nothing when enough are free, so
  // repeating a call is a no-op), in chunks of kPreallocChunkBytes. All or
  // nothing: ResourceExhausted (naming the budget and the bytes asked for)
  // when the budget cannot take them, or the allocator's error; the arena
  // and the budget are then as they were. `bytes` <= 0 takes nothing.
  [[nodiscard]] Status preallocate(int64_t bytes);

  // ResourceExhausted naming `what` when `blocks` blocks pass this machine's
  // memory (or int64 bytes): refused before the lists that would hold them
  // are sized, as such a request could only fail after allocating.
  [[nodiscard]] Status check_fits(int64_t blocks, const char* what) const;

  int64_t block_bytes() const { return block_bytes_; }
  bool device_readable() const { return device_readable_; }
  // Host bytes held in chunks (what the budget is charged).
  int64_t bytes_held() const;
  int64_t blocks_in_use() const;
  // Blocks held but not handed out.
  int64_t blocks_free() const;
  // Chunks allocated since the arena was made (by allocate and preallocate).
  int64_t chunks_allocated() const;

 private:
  // Allocates chunks of up to `blocks_per_chunk` blocks for `blocks` more
  // blocks, charges them to the budget and adds them to free_; all or
  // nothing. `shrink_tail`: whole chunks except the last, which shrinks to
  // what is missing when a whole one would pass the budget. Holds mutex_.
  Status grow(int64_t blocks, int64_t blocks_per_chunk, bool shrink_tail, const char* what);

  const int64_t block_bytes_;
  const int64_t blocks_per_chunk_;
  MemoryBudget* const budget_;
  const std::unique_ptr<ChunkAllocator> chunks_;
  const bool device_readable_;

  mutable std::mutex mutex_;
  std::vector<std::pair<std::byte*, int64_t>> held_;  // chunk, bytes
  std::vector<std::byte*> free_;                      // blocks ready to hand out
  int64_t bytes_held_ = 0;
  int64_t blocks_total_ = 0;
  int64_t chunks_allocated_ = 0;
};

}  // namespace pqkv::storage
