// The hot rows' policy on the host (tiering/hot_rows.h), the reference of
// the device's: the table and the slots' owners always agree, only
// cacheable picks are cached, a pick of the step before hits when the cache
// holds a step's picks, admit_count 2 admits a row only at its second pick
// within the window, and the oldest free slots are taken first.
#include "tiering/hot_rows.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace pqkv::tiering {
namespace {

std::vector<bool> all_cacheable(size_t n) {
  return std::vector<bool>(n, true);
}

// Every listed token's slot is owned by it, and every owned slot is listed
// (or its token was re-admitted elsewhere: never two listings of a slot).
void expect_consistent(const HotRowsPolicy& p, int32_t base) {
  const auto& table = p.table();
  const auto& owner = p.owner();
  for (size_t t = 0; t < table.size(); ++t) {
    if (table[t] < 0) continue;
    ASSERT_GE(table[t], base);
    ASSERT_LT(table[t] - base, static_cast<int32_t>(owner.size()));
    EXPECT_EQ(owner[static_cast<size_t>(table[t] - base)], static_cast<int32_t>(t));
  }
  for (size_t s = 0; s < owner.size(); ++s) {
    if (owner[s] >= 0) {
      EXPECT_EQ(table[static_cast<size_t>(owner[s])], base + static_cast<int32_t>(s));
    }
  }
}

TEST(HotRowsPolicyTest, RepeatedPicksHitAndTheTableMatchesTheOwners) {
  const uint64_t seed = 4242;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t tokens = 997;
  const int32_t base = 37;
  HotRowsPolicy p(tokens, base, 61, 1);
  std::vector<int32_t> all(tokens);
  std::iota(all.begin(), all.end(), 0);
  std::vector<HotRowsAdmission> admitted;
  std::vector<int32_t> last;
  for (int step = 0; step < 200; ++step) {
    std::shuffle(all.begin(), all.end(), rng);
    // Half of the last step's picks again, the rest new; and a padding entry.
    std::vector<int32_t> picks(last.begin(), last.begin() + static_cast<long>(last.size() / 2));
    for (size_t i = 0; picks.size() < 50; ++i)
      if (std::find(picks.begin(), picks.end(), all[i]) == picks.end()) picks.push_back(all[i]);
    picks.push_back(-1);
    std::vector<bool> cacheable = all_cacheable(picks.size());
    cacheable[3] = false;  // a resident row: never cached
    int64_t listed = 0;
    for (size_t e = 0; e < picks.size(); ++e)
      listed += picks[e] >= 0 && cacheable[e] && p.table()[static_cast<size_t>(picks[e])] >= 0;
    const int64_t hits = p.step(picks, cacheable, &admitted);
    EXPECT_EQ(hits, listed);
    // 61 slots hold the 49 cacheable picks of a step: the last step's picks all hit.
    if (step > 0) {
      int64_t repeated = 0;
      for (size_t e = 0; e < picks.size(); ++e) {
        const bool was = std::find(last.begin(), last.end(), picks[e]) != last.end();
        repeated += picks[e] >= 0 && cacheable[e] && was;
      }
      EXPECT_GE(hits, repeated) << "step " << step;
    }
    for (const HotRowsAdmission& a : admitted) {
      ASSERT_NE(a.entry, 3);
      EXPECT_EQ(p.table()[static_cast<size_t>(picks[static_cast<size_t>(a.entry)])], a.slot);
    }
    expect_consistent(p, base);
    last.assign(picks.begin(), picks.end() - 1);
    last.erase(last.begin() + 3);
  }
}

TEST(HotRowsPolicyTest, AdmitCountTwoWaitsForASecondPickWithinTheWindow) {
  HotRowsPolicy p(100, 0, 8, 2);
  std::vector<HotRowsAdmission> admitted;
  const std::vector<int32_t> a = {5, 6};
  EXPECT_EQ(p.step(a, all_cacheable(2), &admitted), 0);
  EXPECT_TRUE(admitted.empty());
  EXPECT_EQ(p.step(a, all_cacheable(2), &admitted), 0);
  EXPECT_EQ(admitted.size(), 2u);
  EXPECT_EQ(p.step(a, all_cacheable(2), &admitted), 2);
  // A token seen once, then again after more than the window: not admitted.
  const std::vector<int32_t> b = {40};
  const std::vector<int32_t> none = {-1};
  p.step(b, all_cacheable(1), &admitted);
  for (uint32_t i = 0; i < kHotRowsAdmitWindow; ++i)
    p.step(none, all_cacheable(1), &admitted);
  p.step(b, all_cacheable(1), &admitted);
  EXPECT_TRUE(admitted.empty());
  EXPECT_LT(p.table()[40], 0);
}

TEST(HotRowsPolicyTest, TakesTheOldestFreeSlotsFirstAndNeverEvictsAHit) {
  HotRowsPolicy p(64, 0, 4, 1);
  std::vector<HotRowsAdmission> admitted;
  p.step(std::vector<int32_t>{1, 2, 3, 4}, all_cacheable(4), &admitted);
  ASSERT_EQ(admitted.size(), 4u);
  // 1 and 2 hit; 10 and 11 take the slots of 3 and 4 (the hand's order).
  p.step(std::vector<int32_t>{1, 2, 10, 11}, all_cacheable(4), &admitted);
  ASSERT_EQ(admitted.size(), 2u);
  EXPECT_EQ(admitted[0].slot, 2);
  EXPECT_EQ(admitted[1].slot, 3);
  EXPECT_LT(p.table()[3], 0);
  EXPECT_LT(p.table()[4], 0);
  EXPECT_EQ(p.table()[1], 0);
  // Three hits (1, 2, 10) leave one free slot for the misses 20 and 21.
  p.step(std::vector<int32_t>{1, 2, 10, 20, 21}, all_cacheable(5), &admitted);
  EXPECT_EQ(admitted.size(), 1u);
  expect_consistent(p, 0);
}

}  // namespace
}  // namespace pqkv::tiering
