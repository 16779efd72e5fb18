// The block cache on the host (tiering/block_cache.h): admitted blocks hold
// their rows, a partly written last block is never admitted, and once a
// block is evicted its slot serves only the block that reused it.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "test_util.h"
#include "tiering/block_cache.h"

namespace pqkv::testing {
namespace {

using tiering::BlockCacheCpu;
using tiering::BlockCacheOptions;
using tiering::BlockStep;

constexpr int64_t kRowBytes = 32;
constexpr int kShift = 7;  // the row store's 128-token blocks

// One KV head's rows of `tokens` tokens in host memory, each row filled with
// its token number, seen as a row table.
struct Rows {
  explicit Rows(int64_t tokens) {
    const int64_t blocks = (tokens >> kShift) + 1;
    bytes.resize(static_cast<size_t>(blocks << kShift) * kRowBytes);
    for (int64_t t = 0; t < (blocks << kShift); ++t)
      std::memset(bytes.data() + t * kRowBytes, static_cast<int>(t & 0xFF), kRowBytes);
    for (int64_t b = 0; b < blocks; ++b)
      pointers.push_back(bytes.data() + (b << kShift) * kRowBytes);
    view.blocks = pointers.data();
    view.kv_heads = 1;
    view.row_bytes = kRowBytes;
    view.tokens_per_block = int64_t{1} << kShift;
    view.block_shift = kShift;
  }
  std::vector<std::byte> bytes;
  std::vector<std::byte*> pointers;
  storage::RowTableView view;
};

std::unique_ptr<BlockCacheCpu> make_cache(int64_t slots, int64_t block) {
  BlockCacheOptions o;
  o.tokens_per_block = block;
  o.num_slots = slots;
  o.aging_interval = 1000;
  auto c = BlockCacheCpu::create(o, kRowBytes, nullptr);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return std::move(c).value();
}

bool slot_holds(const BlockCacheCpu& cache, int64_t slot, int64_t token) {
  const std::byte* row = cache.slot_row(slot, token);
  for (int64_t i = 0; i < kRowBytes; ++i) {
    if (row[i] != static_cast<std::byte>(token & 0xFF)) return false;
  }
  return true;
}

TEST(BlockCacheCpuTest, RejectsBlocksLargerThanTheRowStoreBlock) {
  BlockCacheOptions o;
  o.tokens_per_block = 256;
  o.num_slots = 1;
  const auto c = BlockCacheCpu::create(o, kRowBytes, nullptr);
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().to_string();
}

TEST(BlockCacheCpuTest, AdmittedBlocksServeTheirRowsFromTheNextStep) {
  const Rows rows(300);
  auto cache = make_cache(4, 32);
  const std::vector<int32_t> picks = {33, 40, 200};
  const BlockStep first = cache->step(0, 0, picks, 300);
  EXPECT_EQ(first.hits, 0);
  ASSERT_EQ(first.admissions.size(), 2u);
  PQKV_ASSERT_OK(cache->admit({&first, 1}, rows.view));
  const BlockStep second = cache->step(0, 0, picks, 300);
  EXPECT_EQ(second.hits, 3);
  for (size_t i = 0; i < picks.size(); ++i) {
    ASSERT_GE(second.slot_of[i], 0);
    EXPECT_TRUE(slot_holds(*cache, second.slot_of[i], picks[i])) << "token " << picks[i];
  }
}

TEST(BlockCacheCpuTest, APartlyWrittenLastBlockIsNeverAdmitted) {
  const Rows rows(100);
  auto cache = make_cache(4, 16);
  // Block 6 holds tokens 96..111; only 96..99 are written at length 100.
  const std::vector<int32_t> picks = {97, 98};
  for (int step = 0; step < 5; ++step) {
    const BlockStep s = cache->step(0, 0, picks, 100);
    EXPECT_TRUE(s.admissions.empty()) << "step " << step;
    EXPECT_EQ(s.hits, 0);
    PQKV_ASSERT_OK(cache->admit({&s, 1}, rows.view));
  }
  // Once the block is complete it is admitted.
  const BlockStep s = cache->step(0, 0, picks, 112);
  ASSERT_EQ(s.admissions.size(), 1u);
  EXPECT_EQ(s.admissions[0].first.index, 6);
}

TEST(BlockCacheCpuTest, AnEvictedBlockIsNeverServedAndItsReusedSlotHoldsTheNewBlock) {
  const Rows rows(1024);
  auto cache = make_cache(1, 64);
  const std::vector<int32_t> old_block = {70};   // block 1
  const std::vector<int32_t> new_block = {700};  // block 10
  const BlockStep a = cache->step(0, 0, old_block, 1024);
  ASSERT_EQ(a.admissions.size(), 1u);
  const int64_t slot = a.admissions[0].second;
  PQKV_ASSERT_OK(cache->admit({&a, 1}, rows.view));
  ASSERT_EQ(cache->step(0, 0, old_block, 1024).hits, 1);
  // Block 10 becomes hotter (3 accesses against 2) and takes the only slot.
  BlockStep b;
  for (int i = 0; i < 3 && b.admissions.empty(); ++i) {
    b = cache->step(0, 0, new_block, 1024);
    PQKV_ASSERT_OK(cache->admit({&b, 1}, rows.view));
  }
  ASSERT_EQ(b.admissions.size(), 1u);
  EXPECT_EQ(b.admissions[0].second, slot);
  ASSERT_EQ(b.evictions.size(), 1u);
  EXPECT_EQ(b.evictions[0].first.index, 1);
  const BlockStep after = cache->step(0, 0, old_block, 1024);
  EXPECT_EQ(after.hits, 0);
  EXPECT_EQ(after.slot_of[0], -1);
  EXPECT_TRUE(slot_holds(*cache, slot, 700));
  const BlockStep served = cache->step(0, 0, new_block, 1024);
  ASSERT_EQ(served.slot_of[0], slot);
}

}  // namespace
}  // namespace pqkv::testing
