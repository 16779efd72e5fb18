// KvRowStore with spilling on, as a device-backed store relies on it: the
// spill hook runs before any block leaves DRAM and its error stops the
// spill; each layer's count of spilled blocks and its table version follow
// spills and read-backs; reserve_if_room takes blocks only when they fit.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

namespace fs = std::filesystem;
using pqkv::testing::random_floats;

class KvRowStoreSpillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("pqkv-kv-spill-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  SpillConfig spill(std::function<Status()> hook) const {
    SpillConfig c;
    c.directory = dir_.string();
    c.file_prefix = "t";
    c.budget = BudgetPolicy::ratio_of_context(0.1);
    c.budget.sink = {16, 0.0};
    c.budget.window = {64, 0.0};
    c.before_spill = std::move(hook);
    return c;
  }

  fs::path dir_;
};

// Appends n tokens to every layer.
Status append_all(KvRowStore& kv, int64_t n, uint64_t seed) {
  const ModelSpec& spec = kv.spec();
  for (int l = 0; l < spec.num_layers; ++l) {
    auto k = random_floats(static_cast<size_t>(n * spec.num_kv_heads * spec.head_dim), seed + l);
    const TensorView view = host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim});
    PQKV_RETURN_IF_ERROR(kv.append(l, view, view));
  }
  return ok_status();
}

// Null entries of the layer's host table.
int64_t null_entries(const KvRowStore& kv, int layer) {
  const RowTableView t = kv.host_table(layer);
  int64_t n = 0;
  for (int64_t e = 0; e < kv.num_blocks(layer) * t.kv_heads; ++e)
    n += t.blocks[e] == nullptr ? 1 : 0;
  return n;
}

TEST_F(KvRowStoreSpillTest, HookRunsFirstAndCountsAndVersionsFollowTheTable) {
  const ModelSpec spec = ModelSpec::tiny();
  MemoryBudget budget(KvRowStore::block_bytes(spec) * spec.num_layers * spec.num_kv_heads * 8);
  int calls = 0;
  KvRowStore kv(spec, BlockArena::heap(KvRowStore::block_bytes(spec), &budget), spill([&] {
                  ++calls;
                  return ok_status();
                }));
  PQKV_ASSERT_OK(append_all(kv, 4 * KvRowStore::kTokensPerBlock, 1));
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(kv.table_version(0), 0);
  PQKV_ASSERT_OK(append_all(kv, 8 * KvRowStore::kTokensPerBlock, 2));
  EXPECT_GT(calls, 0);
  int64_t spilled = 0;
  for (int l = 0; l < spec.num_layers; ++l) {
    EXPECT_EQ(kv.blocks_spilled(l), null_entries(kv, l)) << "layer " << l;
    if (kv.blocks_spilled(l) > 0) {
      EXPECT_GT(kv.table_version(l), 0) << "layer " << l;
    }
    spilled += kv.blocks_spilled(l);
  }
  EXPECT_EQ(spilled, kv.blocks_spilled());
  EXPECT_GT(spilled, 0);

  // Truncating into spilled blocks and appending again reads them back.
  int layer = 0;
  while (kv.blocks_spilled(layer) == 0)
    ++layer;
  const RowTableView table = kv.host_table(layer);
  int64_t block = 0;
  while (table.blocks[block * table.kv_heads] != nullptr)
    ++block;
  const int64_t token = block * KvRowStore::kTokensPerBlock + 3;
  const int64_t version = kv.table_version(layer);
  const int64_t before = kv.blocks_spilled(layer);
  kv.truncate(layer, token);
  auto k = random_floats(static_cast<size_t>(spec.num_kv_heads * spec.head_dim), 9);
  const TensorView one = host_view(k.data(), {1, spec.num_kv_heads, spec.head_dim});
  PQKV_ASSERT_OK(kv.append(layer, one, one));
  EXPECT_NE(kv.row(layer, 0, token), nullptr);
  EXPECT_GT(kv.table_version(layer), version);
  EXPECT_LT(kv.blocks_spilled(layer), before);
  EXPECT_EQ(kv.blocks_spilled(layer), null_entries(kv, layer));
}

TEST_F(KvRowStoreSpillTest, HookErrorStopsTheSpill) {
  const ModelSpec spec = ModelSpec::tiny();
  MemoryBudget budget(KvRowStore::block_bytes(spec) * spec.num_layers * spec.num_kv_heads * 8);
  KvRowStore kv(spec, BlockArena::heap(KvRowStore::block_bytes(spec), &budget),
                spill([] { return Status::internal("device wait failed"); }));
  PQKV_ASSERT_OK(append_all(kv, 8 * KvRowStore::kTokensPerBlock, 1));
  const Status s = append_all(kv, 4 * KvRowStore::kTokensPerBlock, 2);
  EXPECT_EQ(s.code(), StatusCode::kInternal) << s.to_string();
  EXPECT_EQ(kv.blocks_spilled(), 0);
  for (int l = 0; l < spec.num_layers; ++l)
    EXPECT_EQ(null_entries(kv, l), 0);
}

TEST_F(KvRowStoreSpillTest, ReserveIfRoomTakesBlocksOnlyWhenTheyFit) {
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t per_layer_block = KvRowStore::block_bytes(spec) * spec.num_kv_heads;
  MemoryBudget budget(per_layer_block * spec.num_layers * 4);
  KvRowStore kv(spec, BlockArena::heap(KvRowStore::block_bytes(spec), &budget), spill({}));
  PQKV_ASSERT_OK(kv.reserve(4 * KvRowStore::kTokensPerBlock));  // spilling: takes nothing
  EXPECT_EQ(kv.num_blocks(0), 0);
  PQKV_ASSERT_OK(kv.reserve_if_room(8 * KvRowStore::kTokensPerBlock));  // does not fit
  EXPECT_EQ(kv.num_blocks(0), 0);
  PQKV_ASSERT_OK(kv.reserve_if_room(4 * KvRowStore::kTokensPerBlock));  // fits
  for (int l = 0; l < spec.num_layers; ++l)
    EXPECT_EQ(kv.num_blocks(l), 4);
}

}  // namespace
}  // namespace pqkv::storage
