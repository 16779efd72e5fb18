// BlockArena::preallocate: blocks taken ahead of the appends, in large chunks,
// charged to the budget exactly, all or nothing.
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "storage/block_arena.h"
#include "storage/memory_budget.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

// Heap chunks that record each request's size and refuse the
// `fail_call`-th (0-based; -1: none). Pages are never touched, so the
// gigabyte-sized requests below cost address space only.
class RecordingChunks final : public ChunkAllocator {
 public:
  RecordingChunks(std::vector<size_t>* sizes, int* live, int fail_call = -1)
      : sizes_(sizes), live_(live), fail_call_(fail_call) {}
  Result<std::byte*> allocate(size_t bytes) override {
    if (calls_++ == fail_call_) return Status::resource_exhausted("test allocator refused");
    sizes_->push_back(bytes);
    ++*live_;
    return static_cast<std::byte*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  }
  void deallocate(std::byte* p) override {
    --*live_;
    std::free(p);
  }
  bool device_readable() const override { return false; }

 private:
  std::vector<size_t>* sizes_;
  int* live_;
  int fail_call_;
  int calls_ = 0;
};

constexpr int64_t kBlock = int64_t{64} << 10;  // Llama-geometry block: 128 rows of 512 B
constexpr int64_t kPreallocBlocks = BlockArena::kPreallocChunkBytes / kBlock;

TEST(BlockArenaTest, PreallocatedBlocksServeAllocationsWithoutChunks) {
  MemoryBudget budget(0);
  std::vector<size_t> sizes;
  int live = 0;
  BlockArena arena(kBlock, &budget, std::make_unique<RecordingChunks>(&sizes, &live));
  // 1.5 preallocation chunks and a partial block: rounded up to whole blocks.
  const int64_t blocks = kPreallocBlocks + kPreallocBlocks / 2 + 1;
  PQKV_ASSERT_OK(arena.preallocate((blocks - 1) * kBlock + 1));
  ASSERT_EQ(sizes.size(), 2u);
  EXPECT_EQ(static_cast<int64_t>(sizes[0]), BlockArena::kPreallocChunkBytes);
  EXPECT_EQ(static_cast<int64_t>(sizes[1]), (blocks - kPreallocBlocks) * kBlock)
      << "the last chunk holds only the blocks asked for";
  EXPECT_EQ(arena.bytes_held(), blocks * kBlock);
  EXPECT_EQ(budget.used(), blocks * kBlock);
  EXPECT_EQ(arena.blocks_free(), blocks);
  EXPECT_EQ(arena.chunks_allocated(), 2);

  std::vector<std::byte*> out;
  PQKV_ASSERT_OK(arena.allocate(blocks - 5, &out));
  PQKV_ASSERT_OK(arena.allocate(5, &out));
  EXPECT_EQ(arena.chunks_allocated(), 2) << "every block came from the preallocation";
  EXPECT_EQ(arena.blocks_in_use(), blocks);
  EXPECT_EQ(budget.used(), blocks * kBlock);
  // Past the preallocation the arena grows in its ordinary 16 MiB chunks.
  PQKV_ASSERT_OK(arena.allocate(1, &out));
  EXPECT_EQ(arena.chunks_allocated(), 3);
  EXPECT_EQ(static_cast<int64_t>(sizes.back()), BlockArena::kChunkBytes);
  arena.release(out.data(), static_cast<int64_t>(out.size()));
}

TEST(BlockArenaTest, PreallocateTakesOnlyWhatIsNotFree) {
  MemoryBudget budget(0);
  std::vector<size_t> sizes;
  int live = 0;
  BlockArena arena(kBlock, &budget, std::make_unique<RecordingChunks>(&sizes, &live));
  PQKV_ASSERT_OK(arena.preallocate(100 * kBlock));
  PQKV_ASSERT_OK(arena.preallocate(100 * kBlock));
  PQKV_ASSERT_OK(arena.preallocate(60 * kBlock));
  PQKV_ASSERT_OK(arena.preallocate(0));
  EXPECT_EQ(arena.chunks_allocated(), 1) << "a repeated call takes nothing";
  EXPECT_EQ(budget.used(), 100 * kBlock);

  std::vector<std::byte*> out;
  PQKV_ASSERT_OK(arena.allocate(70, &out));
  // 30 free: 100 free needs 70 more, in one chunk.
  PQKV_ASSERT_OK(arena.preallocate(100 * kBlock));
  EXPECT_EQ(arena.chunks_allocated(), 2);
  EXPECT_EQ(static_cast<int64_t>(sizes.back()), 70 * kBlock);
  EXPECT_EQ(arena.blocks_free(), 100);
  EXPECT_EQ(budget.used(), 170 * kBlock);
  EXPECT_EQ(arena.bytes_held(), budget.used());
  arena.release(out.data(), 70);
  EXPECT_EQ(arena.blocks_free(), 170);
}

TEST(BlockArenaTest, PreallocationOverTheBudgetTakesNothing) {
  MemoryBudget budget(100 * kBlock);
  std::vector<size_t> sizes;
  int live = 0;
  BlockArena arena(kBlock, &budget, std::make_unique<RecordingChunks>(&sizes, &live));
  std::vector<std::byte*> out;
  PQKV_ASSERT_OK(arena.allocate(10, &out));
  const int64_t held = arena.bytes_held();
  const int chunks = live;
  const Status s = arena.preallocate(101 * kBlock);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_NE(s.message().find("preallocating"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("dram_budget_bytes"), std::string::npos) << s.to_string();
  EXPECT_EQ(arena.bytes_held(), held);
  EXPECT_EQ(budget.used(), held);
  EXPECT_EQ(live, chunks);
  EXPECT_EQ(arena.blocks_in_use(), 10);
  // The whole budget is still usable: a preallocation up to it succeeds.
  PQKV_ASSERT_OK(arena.preallocate(90 * kBlock));
  EXPECT_EQ(budget.used(), 100 * kBlock);
  arena.release(out.data(), 10);
}

TEST(BlockArenaTest, FailedPreallocationFreesItsChunks) {
  MemoryBudget budget(0);
  std::vector<size_t> sizes;
  int live = 0;
  {
    // The second chunk of three is refused.
    BlockArena arena(kBlock, &budget, std::make_unique<RecordingChunks>(&sizes, &live, 1));
    const Status s = arena.preallocate(3 * BlockArena::kPreallocChunkBytes);
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
    EXPECT_EQ(live, 0);
    EXPECT_EQ(budget.used(), 0);
    EXPECT_EQ(arena.bytes_held(), 0);
    EXPECT_EQ(arena.blocks_free(), 0);
    PQKV_ASSERT_OK(arena.preallocate(kBlock));
    EXPECT_EQ(budget.used(), kBlock);
  }
  EXPECT_EQ(live, 0);
  EXPECT_EQ(budget.used(), 0) << "the arena gives its chunks back to the budget";
}

}  // namespace
}  // namespace pqkv::storage
