#include <gtest/gtest.h>

#include <cstring>

#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

using pqkv::testing::random_floats;

TEST(KvRowStoreTest, RowsHoldKeyThenValueInTokenOrderAcrossSlabs) {
  ModelSpec spec = ModelSpec::tiny();  // d = 32, bf16: 128 B rows
  KvRowStore kv(spec, nullptr);
  const int64_t n = KvRowStore::kTokensPerSlab + 17;  // crosses a slab boundary
  auto k = random_floats(n * 2 * 32, 1);
  auto v = random_floats(n * 2 * 32, 2);
  // Two appends of uneven size must equal one.
  ASSERT_TRUE(
      kv.append(0, host_view(k.data(), {97, 2, 32}), host_view(v.data(), {97, 2, 32})).ok());
  ASSERT_TRUE(kv.append(0, host_view(k.data() + 97 * 64, {n - 97, 2, 32}),
                        host_view(v.data() + 97 * 64, {n - 97, 2, 32}))
                  .ok());
  EXPECT_EQ(kv.length(0), n);
  EXPECT_EQ(kv.length(1), 0);
  EXPECT_EQ(kv.num_slabs(0), 2);
  for (int64_t t : {int64_t{0}, int64_t{96}, int64_t{97}, KvRowStore::kTokensPerSlab - 1,
                    KvRowStore::kTokensPerSlab, n - 1}) {
    for (int h = 0; h < 2; ++h) {
      const auto* row = reinterpret_cast<const uint16_t*>(kv.row(0, h, t));
      for (int c = 0; c < 32; ++c) {
        ASSERT_EQ(row[c], float_to_bf16(k[(t * 2 + h) * 32 + c])) << t;
        ASSERT_EQ(row[32 + c], float_to_bf16(v[(t * 2 + h) * 32 + c])) << t;
      }
    }
  }
  std::vector<float> back(3 * 2 * 32);
  kv.keys_as_float(0, 4095, 4098, back.data());
  for (size_t i = 0; i < back.size(); ++i) {
    EXPECT_EQ(back[i], bf16_to_float(float_to_bf16(k[4095 * 64 + i])));
  }
}

TEST(KvRowStoreTest, Fp32RowsAreExactCopies) {
  ModelSpec spec = ModelSpec::tiny();
  spec.dtype = DType::kF32;
  KvRowStore kv(spec, nullptr);
  auto k = random_floats(5 * 64, 3);
  ASSERT_TRUE(kv.append(1, host_view(k.data(), {5, 2, 32}), host_view(k.data(), {5, 2, 32})).ok());
  EXPECT_EQ(std::memcmp(kv.row(1, 1, 4), k.data() + (4 * 2 + 1) * 32, 32 * 4), 0);
}

TEST(KvRowStoreTest, BudgetIsChargedPerSlabAndReleased) {
  ModelSpec spec = ModelSpec::tiny();
  const int64_t slab = KvRowStore::kTokensPerSlab * spec.row_bytes();
  MemoryBudget budget(3 * slab);
  {
    KvRowStore kv(spec, &budget);
    auto k = random_floats(64, 4);
    ASSERT_TRUE(
        kv.append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32})).ok());
    EXPECT_EQ(budget.used(), 2 * slab);  // one slab per KV head
    Status s = kv.append(1, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}));
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(kv.length(1), 0);
    EXPECT_EQ(budget.used(), 2 * slab);
  }
  EXPECT_EQ(budget.used(), 0);
}

// Fails after a given number of allocations, to check that a failed append
// frees what it allocated and leaves the budget as it was.
class FailingAllocator final : public SlabAllocator {
 public:
  explicit FailingAllocator(int succeed) : left_(succeed) {}
  Result<std::byte*> allocate(size_t bytes) override {
    if (left_-- <= 0) return Status::resource_exhausted("test allocator refused");
    ++live;
    return new std::byte[bytes];
  }
  void deallocate(std::byte* p) override {
    --live;
    delete[] p;
  }
  bool device_readable() const override { return false; }
  int live = 0;

 private:
  int left_;
};

TEST(KvRowStoreTest, FailedAllocationLeavesNothingBehind) {
  ModelSpec spec = ModelSpec::tiny();
  MemoryBudget budget(0);
  auto alloc = std::make_shared<FailingAllocator>(1);  // the second head's slab fails
  KvRowStore kv(spec, &budget, alloc);
  auto k = random_floats(64, 5);
  Status s = kv.append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}));
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(alloc->live, 0);
  EXPECT_EQ(budget.used(), 0);
  EXPECT_EQ(kv.length(0), 0);
}

TEST(MemoryBudgetTest, UnlimitedWhenZero) {
  MemoryBudget b(0);
  EXPECT_TRUE(b.reserve(int64_t{1} << 50, "test").ok());
  b.release(int64_t{1} << 50);
  MemoryBudget small(100);
  Status s = small.reserve(101, "a test request");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("a test request"), std::string::npos);
}

}  // namespace
}  // namespace pqkv::storage
