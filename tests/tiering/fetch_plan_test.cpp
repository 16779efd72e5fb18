// The tiers' fetch plan: ranges in order and without gaps cover every entry
// of a step's position lists exactly once, and an entry is planned from the
// resident rows exactly when its token is resident at the step's length.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tiering/fetch_plan.h"
#include "tiering/resident_rows.h"

namespace pqkv::testing {
namespace {

using tiering::FetchPlan;
using tiering::ResidentShape;
using tiering::RowSource;
using tiering::StepRows;

// The source of every entry, from the plan's ranges; fails the test on a gap,
// an overlap or a range out of order.
std::vector<RowSource> entry_sources(const FetchPlan& p) {
  std::vector<RowSource> sources;
  int64_t next = 0;
  for (int r = 0; r < p.num_ranges; ++r) {
    EXPECT_EQ(p.ranges[r].begin, next) << "range " << r;
    EXPECT_GT(p.ranges[r].size(), 0) << "range " << r;
    if (r > 0) {
      EXPECT_NE(p.ranges[r].source, p.ranges[r - 1].source) << "unmerged range " << r;
    }
    for (int64_t e = p.ranges[r].begin; e < p.ranges[r].end; ++e)
      sources.push_back(p.ranges[r].source);
    next = p.ranges[r].end;
  }
  EXPECT_EQ(next, p.rows_per_head);
  return sources;
}

// What the plan must say for entry `e`: sink entries hold tokens 0.., window
// entries the last tokens, middle entries are always gathered.
RowSource expected_source(const StepRows& s, const ResidentShape& r, int64_t e) {
  if (e < s.sink) return r.holds(e, s.length) ? RowSource::kResident : RowSource::kDram;
  if (e < s.sink + s.middle) return RowSource::kDram;
  const int64_t token = s.length - s.window + (e - s.sink - s.middle);
  return r.holds(token, s.length) ? RowSource::kResident : RowSource::kDram;
}

void check_plan(const StepRows& s, const ResidentShape& r) {
  const FetchPlan p = tiering::FetchPlanner().plan(s, r);
  EXPECT_EQ(p.rows_per_head, s.rows_per_head());
  const std::vector<RowSource> sources = entry_sources(p);
  ASSERT_EQ(static_cast<int64_t>(sources.size()), s.rows_per_head());
  int64_t resident = 0;
  for (int64_t e = 0; e < s.rows_per_head(); ++e) {
    ASSERT_EQ(sources[e], expected_source(s, r, e)) << "entry " << e;
    resident += sources[e] == RowSource::kResident ? 1 : 0;
  }
  EXPECT_EQ(p.rows_from(RowSource::kResident), resident);
  EXPECT_EQ(p.rows_from(RowSource::kDram), s.rows_per_head() - resident);
}

TEST(FetchPlanTest, SsdIsATierOfItsOwn) {
  using namespace tiering;
  EXPECT_STREQ(row_source_name(RowSource::kSsd), "ssd");
  EXPECT_EQ(static_cast<int>(RowSource::kDram), 0);
  EXPECT_EQ(static_cast<int>(RowSource::kResident), 1);
  EXPECT_STREQ(row_source_name(RowSource::kCache), "cache");
  EXPECT_EQ(kNumRowSources, 4);
  // A plan from counts reads nothing from disk until the SSD tier fills it.
  const FetchPlan p = FetchPlanner{}.plan({100, 4, 10, 8}, ResidentShape{});
  EXPECT_EQ(p.ssd_rows, 0);
  EXPECT_EQ(p.ssd_pages, 0);
  EXPECT_EQ(p.rows_from(RowSource::kSsd), 0);
}

TEST(FetchPlanTest, WithoutResidentRowsEveryRowComesFromDram) {
  for (int64_t rows : {int64_t{0}, int64_t{1}, int64_t{97}, int64_t{12800}}) {
    const StepRows s{rows + 100, 0, rows, 0};
    const FetchPlan p = tiering::FetchPlanner().plan(s, ResidentShape{});
    EXPECT_EQ(p.rows_from(RowSource::kDram), rows);
    EXPECT_EQ(p.num_ranges, rows > 0 ? 1 : 0);
    check_plan(s, ResidentShape{});
  }
  EXPECT_STREQ(tiering::row_source_name(RowSource::kDram), "dram");
  EXPECT_STREQ(tiering::row_source_name(RowSource::kResident), "resident");
}

TEST(FetchPlanTest, SinkAndWindowWithinTheResidentSlotsAreResident) {
  // 128K context, sink 32, window 6400, 6400 picks, all of sink and window resident.
  const StepRows s{131072, 32, 6400, 6400};
  const FetchPlan p = tiering::FetchPlanner().plan(s, ResidentShape{32, 6400});
  ASSERT_EQ(p.num_ranges, 3);
  EXPECT_EQ(p.ranges[0].source, RowSource::kResident);
  EXPECT_EQ(p.ranges[1].source, RowSource::kDram);
  EXPECT_EQ(p.ranges[1].size(), 6400);
  EXPECT_EQ(p.ranges[2].source, RowSource::kResident);
  EXPECT_EQ(p.rows_from(RowSource::kResident), 32 + 6400);
  check_plan(s, ResidentShape{32, 6400});
}

TEST(FetchPlanTest, AWindowWiderThanTheRingIsGatheredBeyondIt) {
  // A ratio budget whose window outgrew the slots reserved for it: the
  // oldest window tokens come from DRAM.
  const StepRows s{5000, 32, 400, 500};
  const FetchPlan p = tiering::FetchPlanner().plan(s, ResidentShape{16, 300});
  EXPECT_EQ(p.rows_from(RowSource::kResident), 16 + 300);
  check_plan(s, ResidentShape{16, 300});
}

TEST(FetchPlanTest, ShortContextsWhoseWindowReachesTheSink) {
  // Everything attended: the window's first tokens sit in the sink slots.
  check_plan(StepRows{40, 8, 0, 32}, ResidentShape{16, 8});
  check_plan(StepRows{40, 8, 0, 32}, ResidentShape{32, 0});
  check_plan(StepRows{1, 1, 0, 0}, ResidentShape{32, 64});
  check_plan(StepRows{1, 0, 0, 1}, ResidentShape{32, 64});
  check_plan(StepRows{0, 0, 0, 0}, ResidentShape{32, 64});
}

TEST(FetchPlanTest, RandomShapesCoverEveryEntryOnceFromItsTier) {
  const uint64_t seed = 20261130;
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 2000; ++i) {
    std::uniform_int_distribution<int64_t> len(1, 5000);
    StepRows s;
    s.length = len(rng);
    s.sink = std::uniform_int_distribution<int64_t>(0, std::min<int64_t>(s.length, 64))(rng);
    s.window = std::uniform_int_distribution<int64_t>(0, s.length - s.sink)(rng);
    s.middle = std::uniform_int_distribution<int64_t>(0, s.length - s.sink - s.window)(rng);
    ResidentShape r;
    r.sink_slots = std::uniform_int_distribution<int64_t>(0, 64)(rng);
    r.window_slots = std::uniform_int_distribution<int64_t>(0, 3000)(rng);
    SCOPED_TRACE("seed " + std::to_string(seed) + ", case " + std::to_string(i) + ": length " +
                 std::to_string(s.length) + ", sink " + std::to_string(s.sink) + ", middle " +
                 std::to_string(s.middle) + ", window " + std::to_string(s.window) + ", slots " +
                 std::to_string(r.sink_slots) + "+" + std::to_string(r.window_slots));
    check_plan(s, r);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(ResidentRowsViewTest, TheRingSlidesInPlace) {
  tiering::ResidentRowsView v;
  v.shape = {4, 8};
  v.kv_heads = 2;
  v.row_bytes = 16;
  EXPECT_EQ(v.slots_per_head(), 12);
  EXPECT_EQ(v.slot(3), 3);
  EXPECT_EQ(v.slot(4), 4 + 4);
  EXPECT_EQ(v.slot(12), 4 + 4);  // 12 replaces 4 once the context passes it by 8
  // At 20 tokens the ring holds 12..19 and the sink 0..3; 11 is gone.
  EXPECT_TRUE(v.shape.holds(12, 20));
  EXPECT_TRUE(v.shape.holds(19, 20));
  EXPECT_TRUE(v.shape.holds(0, 20));
  EXPECT_FALSE(v.shape.holds(11, 20));
  // Slots of the window tokens at any length are distinct.
  for (int64_t length = 5; length < 40; ++length) {
    std::vector<bool> used(v.slots_per_head(), false);
    for (int64_t t = 0; t < length; ++t) {
      if (!v.shape.holds(t, length)) continue;
      ASSERT_FALSE(used[v.slot(t)]) << "token " << t << " at length " << length;
      used[v.slot(t)] = true;
    }
  }
  EXPECT_EQ(tiering::ResidentRowsView::bytes(2, 16, v.shape), 2 * 12 * 16);
}

}  // namespace
}  // namespace pqkv::testing
