// The SSD tier over a row store that spilled blocks: every attended row whose
// block is only on disk is staged with the bytes it had in DRAM, rows in DRAM
// and negative positions (rows another tier serves) are left alone, and the
// counts say how many rows and distinct pages were read.
#include "tiering/ssd_tier.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "test_util.h"

namespace pqkv::tiering {
namespace {

namespace fs = std::filesystem;
using pqkv::testing::random_floats;
using storage::KvRowStore;

TEST(SsdTierTest, StagesSpilledRowsAndSkipsTheRest) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const fs::path dir =
      fs::temp_directory_path() / ("pqkv-ssd-tier-test-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t length = 12 * KvRowStore::kTokensPerBlock + 5;
  const int64_t n = length * spec.num_kv_heads * spec.head_dim;
  const auto k = random_floats(static_cast<size_t>(n), seed);
  const auto v = random_floats(static_cast<size_t>(n), seed + 1);
  const TensorView kv_k =
      host_view(const_cast<float*>(k.data()), {length, spec.num_kv_heads, spec.head_dim});
  const TensorView kv_v =
      host_view(const_cast<float*>(v.data()), {length, spec.num_kv_heads, spec.head_dim});
  // The reference holds every row; the other a third of them in DRAM.
  KvRowStore all(spec, storage::BlockArena::heap(KvRowStore::block_bytes(spec)));
  storage::MemoryBudget budget(KvRowStore::block_bytes(spec) * spec.num_kv_heads * 4);
  storage::SpillConfig spill;
  spill.directory = dir.string();
  spill.file_prefix = "t";
  spill.budget = BudgetPolicy::ratio_of_context(0.1);
  spill.budget.sink = {4, 0.0};
  spill.budget.window = {16, 0.0};
  KvRowStore kv(spec, storage::BlockArena::heap(KvRowStore::block_bytes(spec), &budget), spill);
  PQKV_ASSERT_OK(all.append(0, kv_k, kv_v));
  PQKV_ASSERT_OK(kv.append(0, kv_k, kv_v));
  ASSERT_GT(kv.blocks_spilled(0), 0);

  // Random positions per head; every third one masked (-1).
  const int64_t per_head = 97;
  std::mt19937_64 rng(seed);
  std::vector<int32_t> positions(static_cast<size_t>(spec.num_kv_heads * per_head));
  for (size_t i = 0; i < positions.size(); ++i)
    positions[i] = i % 3 == 2 ? -1 : static_cast<int32_t>(rng() % length);
  const storage::RowTableView table = kv.host_table(0);
  SsdTierWorkspace ws;
  FetchPlan plan;
  PQKV_ASSERT_OK(
      fetch_spilled_rows(table, 0, kv.spilled(), positions.data(), per_head, ws, &plan, nullptr));
  ASSERT_EQ(ws.staged.size(), positions.size());
  int64_t spilled = 0;
  std::set<std::pair<int64_t, int64_t>> pages;  // (entry, page in block)
  const int64_t rows_per_page = storage::kPageBytes / spec.row_bytes();
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    for (int64_t i = 0; i < per_head; ++i) {
      const int32_t t = positions[h * per_head + i];
      const std::byte* staged = ws.staged[h * per_head + i];
      if (t < 0 || kv.row(0, h, t) != nullptr) {
        EXPECT_EQ(staged, nullptr) << "head " << h << ", entry " << i;
        continue;
      }
      ++spilled;
      pages.insert({table.block_index(h, t), table.row_in_block(t) / rows_per_page});
      ASSERT_NE(staged, nullptr) << "head " << h << ", entry " << i << ", token " << t;
      EXPECT_EQ(std::memcmp(staged, all.row(0, h, t), spec.row_bytes()), 0)
          << "head " << h << ", token " << t;
    }
  }
  EXPECT_GT(spilled, 0);
  EXPECT_EQ(plan.ssd_rows, spilled);
  EXPECT_EQ(plan.ssd_pages, static_cast<int64_t>(pages.size()));
  EXPECT_EQ(plan.ssd_hits, spilled - plan.ssd_pages);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace pqkv::tiering
