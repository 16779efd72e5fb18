#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

using pqkv::testing::random_floats;

std::shared_ptr<BlockArena> heap_arena(const ModelSpec& spec, MemoryBudget* budget = nullptr) {
  return BlockArena::heap(KvRowStore::block_bytes(spec), budget);
}

TEST(KvRowStoreTest, RowsHoldKeyThenValueInTokenOrderAcrossBlocks) {
  ModelSpec spec = ModelSpec::tiny();  // d = 32, bf16: 128 B rows
  KvRowStore kv(spec, heap_arena(spec));
  const int64_t n = KvRowStore::kTokensPerBlock + 17;  // crosses a block boundary
  auto k = random_floats(n * 2 * 32, 1);
  auto v = random_floats(n * 2 * 32, 2);
  // Two appends of uneven size must equal one.
  PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {97, 2, 32}), host_view(v.data(), {97, 2, 32})));
  PQKV_ASSERT_OK(kv.append(0, host_view(k.data() + 97 * 64, {n - 97, 2, 32}),
                           host_view(v.data() + 97 * 64, {n - 97, 2, 32})));
  EXPECT_EQ(kv.length(0), n);
  EXPECT_EQ(kv.length(1), 0);
  EXPECT_EQ(kv.num_blocks(0), 2);
  for (int64_t t : {int64_t{0}, int64_t{96}, int64_t{97}, KvRowStore::kTokensPerBlock - 1,
                    KvRowStore::kTokensPerBlock, n - 1}) {
    for (int h = 0; h < 2; ++h) {
      const auto* row = reinterpret_cast<const uint16_t*>(kv.row(0, h, t));
      for (int c = 0; c < 32; ++c) {
        ASSERT_EQ(row[c], float_to_bf16(k[(t * 2 + h) * 32 + c])) << t;
        ASSERT_EQ(row[32 + c], float_to_bf16(v[(t * 2 + h) * 32 + c])) << t;
      }
    }
  }
  std::vector<float> back(3 * 2 * 32);
  const int64_t first = KvRowStore::kTokensPerBlock - 1;
  PQKV_ASSERT_OK(kv.keys_as_float(0, first, first + 3, back.data()));
  for (size_t i = 0; i < back.size(); ++i) {
    const int64_t t = first + static_cast<int64_t>(i) / 64;
    EXPECT_EQ(back[i], bf16_to_float(float_to_bf16(k[t * 64 + i % 64])));
  }
}

TEST(KvRowStoreTest, Fp32RowsAreExactCopies) {
  ModelSpec spec = ModelSpec::tiny();
  spec.dtype = DType::kF32;
  KvRowStore kv(spec, heap_arena(spec));
  auto k = random_floats(5 * 64, 3);
  PQKV_ASSERT_OK(kv.append(1, host_view(k.data(), {5, 2, 32}), host_view(k.data(), {5, 2, 32})));
  EXPECT_EQ(std::memcmp(kv.row(1, 1, 4), k.data() + (4 * 2 + 1) * 32, 32 * 4), 0);
}

TEST(KvRowStoreTest, BlocksFollowTheTokensAndGoBackToTheArena) {
  ModelSpec spec = ModelSpec::tiny();  // 2 KV heads
  const int64_t block = KvRowStore::block_bytes(spec);
  auto arena = heap_arena(spec);
  auto k = random_floats(200 * 64, 4);
  std::vector<std::byte*> first_blocks;
  {
    KvRowStore kv(spec, arena);
    PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32})));
    EXPECT_EQ(kv.bytes_held(), 2 * block);  // one block per KV head
    EXPECT_EQ(arena->blocks_in_use(), 2);
    // 200 tokens: two blocks per head.
    PQKV_ASSERT_OK(
        kv.append(0, host_view(k.data(), {199, 2, 32}), host_view(k.data(), {199, 2, 32})));
    EXPECT_EQ(kv.bytes_held(), 4 * block);
    first_blocks.assign(kv.host_table(0).blocks, kv.host_table(0).blocks + 4);
  }
  EXPECT_EQ(arena->blocks_in_use(), 0);
  const int64_t held = arena->bytes_held();
  KvRowStore next(spec, arena);
  PQKV_ASSERT_OK(next.append(1, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32})));
  EXPECT_EQ(arena->bytes_held(), held) << "freed blocks are reused";
  for (int h = 0; h < 2; ++h) {
    EXPECT_NE(std::find(first_blocks.begin(), first_blocks.end(), next.host_table(1).blocks[h]),
              first_blocks.end())
        << "head " << h << " got a block that was never freed";
  }
}

TEST(KvRowStoreTest, BudgetHitChangesNothingAndNamesTheBudget) {
  ModelSpec spec = ModelSpec::tiny();
  const int64_t block = KvRowStore::block_bytes(spec);
  MemoryBudget budget(3 * block);
  {
    auto arena = heap_arena(spec, &budget);
    KvRowStore kv(spec, arena);
    auto k = random_floats(64, 4);
    PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32})));
    EXPECT_EQ(budget.used(), 2 * block);  // exactly the two blocks: the chunk shrank to fit
    EXPECT_EQ(arena->bytes_held(), budget.used());
    Status s = kv.append(1, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}));
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
    EXPECT_NE(s.message().find("dram_budget_bytes"), std::string::npos) << s.to_string();
    EXPECT_EQ(kv.length(1), 0);
    EXPECT_EQ(kv.num_blocks(1), 0);
    EXPECT_EQ(budget.used(), 2 * block);
    // A reservation past the budget takes nothing either.
    EXPECT_EQ(kv.reserve(10 * KvRowStore::kTokensPerBlock).code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(kv.num_blocks(0), 1);
    EXPECT_EQ(budget.used(), 2 * block);
  }
  EXPECT_EQ(budget.used(), 0);
}

TEST(KvRowStoreTest, ReserveTakesEveryLayersBlocksOnce) {
  ModelSpec spec = ModelSpec::tiny();  // 2 layers, 2 KV heads
  auto arena = heap_arena(spec);
  KvRowStore kv(spec, arena);
  PQKV_ASSERT_OK(kv.reserve(3 * KvRowStore::kTokensPerBlock - 1));
  EXPECT_EQ(arena->blocks_in_use(), 3 * 2 * 2);
  auto k = random_floats(300 * 64, 6);
  PQKV_ASSERT_OK(
      kv.append(1, host_view(k.data(), {300, 2, 32}), host_view(k.data(), {300, 2, 32})));
  EXPECT_EQ(arena->blocks_in_use(), 3 * 2 * 2) << "appends within the reservation take no block";
}

TEST(KvRowStoreTest, ReleaseBlocksPastUndoesAReserveAndKeepsWhatTheLengthNeeds) {
  ModelSpec spec = ModelSpec::tiny();  // 2 layers, 2 KV heads
  auto arena = heap_arena(spec);
  KvRowStore kv(spec, arena);
  const uint64_t seed = 7;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int64_t n = KvRowStore::kTokensPerBlock + 5;  // 2 blocks per head
  auto k = random_floats(n * 64, seed);
  PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {n, 2, 32}), host_view(k.data(), {n, 2, 32})));
  const std::vector<int64_t> before = kv.block_counts();
  EXPECT_EQ(before, (std::vector<int64_t>{2, 0}));
  PQKV_ASSERT_OK(kv.reserve(5 * KvRowStore::kTokensPerBlock));
  EXPECT_EQ(arena->blocks_in_use(), 5 * 2 * 2);
  kv.release_blocks_past(before);
  EXPECT_EQ(kv.block_counts(), before);
  EXPECT_EQ(arena->blocks_in_use(), 2 * 2);
  // Layer 1 grows past its old blocks again; layer 0's rows are untouched.
  PQKV_ASSERT_OK(kv.append(1, host_view(k.data(), {n, 2, 32}), host_view(k.data(), {n, 2, 32})));
  std::vector<float> got(n * 64);
  PQKV_ASSERT_OK(kv.keys_as_float(0, 0, n, got.data()));
  PQKV_ASSERT_OK(kv.keys_as_float(1, 0, n, k.data()));
  EXPECT_EQ(got, k);
  // A list shorter than the length needs keeps the length's blocks.
  kv.release_blocks_past({0, 0});
  EXPECT_EQ(kv.block_counts(), (std::vector<int64_t>{2, 2}));
}

// Refuses its `fail_call`-th chunk allocation (0-based), to check that a
// failed allocation frees what it allocated and leaves the budget as it was.
class FailingChunks final : public ChunkAllocator {
 public:
  FailingChunks(int fail_call, int* live) : fail_call_(fail_call), live_(live) {}
  Result<std::byte*> allocate(size_t bytes) override {
    if (calls_++ == fail_call_) return Status::resource_exhausted("test allocator refused");
    ++*live_;
    return static_cast<std::byte*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  }
  void deallocate(std::byte* p) override {
    --*live_;
    std::free(p);
  }
  bool device_readable() const override { return false; }

 private:
  int fail_call_;
  int calls_ = 0;
  int* live_;
};

TEST(KvRowStoreTest, FailedAllocationLeavesNothingBehind) {
  MemoryBudget budget(0);
  int live = 0;
  // Chunks of one block; the second chunk fails.
  auto arena = std::make_shared<BlockArena>(BlockArena::kChunkBytes, &budget,
                                            std::make_unique<FailingChunks>(1, &live));
  std::vector<std::byte*> out;
  EXPECT_EQ(arena->allocate(2, &out).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(live, 0);
  EXPECT_EQ(budget.used(), 0);
  EXPECT_EQ(arena->bytes_held(), 0);
  PQKV_ASSERT_OK(arena->allocate(1, &out));
  EXPECT_EQ(out.size(), 1u);
}

TEST(MemoryBudgetTest, UnlimitedWhenZero) {
  MemoryBudget b(0);
  PQKV_EXPECT_OK(b.reserve(int64_t{1} << 50, "test"));
  b.release(int64_t{1} << 50);
  MemoryBudget small(100);
  Status s = small.reserve(101, "a test request");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("a test request"), std::string::npos);
}

}  // namespace
}  // namespace pqkv::storage
