// The block cache's policy on the host: partial blocks are never admitted
// nor served, admissions serve only once complete, LFU picks the victim with
// aging, and an evicted slot never serves its old block.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "test_util.h"
#include "tiering/block_cache_policy.h"

namespace pqkv::testing {
namespace {

using tiering::BlockCacheOptions;
using tiering::BlockCachePolicy;
using tiering::BlockId;
using tiering::BlockStep;

BlockCachePolicy make_policy(int64_t slots, int64_t block = 16, int aging = 4) {
  BlockCacheOptions o;
  o.tokens_per_block = block;
  o.num_slots = slots;
  o.aging_interval = aging;
  auto p = BlockCachePolicy::create(o);
  EXPECT_TRUE(p.ok()) << p.status().to_string();
  return std::move(p).value();
}

// Completes every admission of `s`.
void complete_all(BlockCachePolicy& p, const BlockStep& s) {
  for (const auto& [block, slot] : s.admissions)
    p.complete(block, slot);
}

TEST(BlockCachePolicyTest, RejectsBadOptions) {
  BlockCacheOptions o;
  o.tokens_per_block = 48;
  EXPECT_EQ(BlockCachePolicy::create(o).status().code(), StatusCode::kInvalidArgument);
  o.tokens_per_block = 64;
  o.num_slots = -1;
  EXPECT_EQ(BlockCachePolicy::create(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(BlockCachePolicyTest, AdmissionServesOnlyOnceComplete) {
  BlockCachePolicy p = make_policy(4);
  const std::vector<int32_t> picks = {3, 5, 20};
  BlockStep s = p.step(0, 0, picks, 100);
  EXPECT_EQ(s.hits, 0);
  EXPECT_EQ(s.misses, 3);
  ASSERT_EQ(s.admissions.size(), 2u);  // blocks 0 and 1
  // The copies are in flight: still misses.
  BlockStep again = p.step(0, 0, picks, 100);
  EXPECT_EQ(again.hits, 0);
  EXPECT_TRUE(again.admissions.empty());
  complete_all(p, s);
  BlockStep served = p.step(0, 0, picks, 100);
  EXPECT_EQ(served.hits, 3);
  EXPECT_EQ(served.slot_of[0], served.slot_of[1]);  // tokens 3 and 5 share block 0
  EXPECT_NE(served.slot_of[0], served.slot_of[2]);
}

TEST(BlockCachePolicyTest, APartlyWrittenLastBlockIsNeverAdmittedNorServed) {
  BlockCachePolicy p = make_policy(4);
  // 40 tokens written: block 2 (tokens 32..47) is partial.
  for (int step = 0; step < 5; ++step) {
    BlockStep s = p.step(0, 1, std::vector<int32_t>{33, 39}, 40);
    EXPECT_TRUE(s.admissions.empty()) << "step " << step;
    EXPECT_EQ(s.hits, 0);
  }
  EXPECT_EQ(p.ready_slot(BlockId{0, 1, 2}), -1);
  // Once the block is filled (48 tokens) it is admitted.
  BlockStep s = p.step(0, 1, std::vector<int32_t>{33, 47}, 48);
  ASSERT_EQ(s.admissions.size(), 1u);
  EXPECT_EQ(s.admissions[0].first, (BlockId{0, 1, 2}));
}

TEST(BlockCachePolicyTest, EvictsTheLeastFrequentAndNeverServesItsSlotForIt) {
  BlockCachePolicy p = make_policy(2, 16, /*aging=*/1000);
  // Block 0 accessed three times, block 1 once: both resident.
  for (int i = 0; i < 3; ++i)
    complete_all(p, p.step(0, 0, std::vector<int32_t>{1}, 1000));
  complete_all(p, p.step(0, 0, std::vector<int32_t>{17}, 1000));
  const int64_t slot1 = p.ready_slot(BlockId{0, 0, 1});
  ASSERT_GE(slot1, 0);
  // Block 2 accessed once ties block 1 and does not displace it; twice it does.
  EXPECT_TRUE(p.step(0, 0, std::vector<int32_t>{40}, 1000).admissions.empty());
  BlockStep s = p.step(0, 0, std::vector<int32_t>{40}, 1000);
  ASSERT_EQ(s.admissions.size(), 1u);
  EXPECT_EQ(s.admissions[0].second, slot1);  // block 1's slot is reused
  // The evicted block is gone at once, even before the new copy completes.
  EXPECT_EQ(p.ready_slot(BlockId{0, 0, 1}), -1);
  BlockStep old = p.step(0, 0, std::vector<int32_t>{17}, 1000);
  EXPECT_EQ(old.slot_of[0], -1);
  // The new block serves from the slot once its copy completes; a stale
  // completion of the evicted block changes nothing.
  p.complete(BlockId{0, 0, 1}, slot1);
  EXPECT_EQ(p.ready_slot(BlockId{0, 0, 1}), -1);
  complete_all(p, s);
  EXPECT_EQ(p.ready_slot(BlockId{0, 0, 2}), slot1);
  EXPECT_GE(p.ready_slot(BlockId{0, 0, 0}), 0);  // the hot block stays
}

TEST(BlockCachePolicyTest, AgingLetsABlockHotLongAgoLeave) {
  BlockCachePolicy p = make_policy(1, 16, /*aging=*/2);
  // Block 0 is hot for 8 steps.
  for (int step = 0; step < 8; ++step) {
    complete_all(p, p.step(0, 0, std::vector<int32_t>{0}, 1000));
    p.end_step();
  }
  const uint32_t hot = p.count(BlockId{0, 0, 0});
  EXPECT_LT(hot, 8u) << "counts decay";
  // Then only block 5 is read: it takes the slot within a few steps.
  int steps = 0;
  while (p.ready_slot(BlockId{0, 0, 5}) < 0 && steps < 20) {
    complete_all(p, p.step(0, 0, std::vector<int32_t>{80}, 1000));
    p.end_step();
    ++steps;
  }
  EXPECT_GE(p.ready_slot(BlockId{0, 0, 5}), 0);
  EXPECT_LE(steps, 6);
  EXPECT_EQ(p.ready_slot(BlockId{0, 0, 0}), -1);
}

TEST(BlockCachePolicyTest, RandomStepsNeverServeAnUnwrittenOrForeignRow) {
  const uint64_t seed = 7;
  SCOPED_TRACE("seed 7: 300 steps, 2 layers x 2 heads, 6 slots of 16 tokens");
  std::mt19937_64 rng(seed);
  BlockCachePolicy p = make_policy(6, 16, 3);
  // What each slot really holds once its copy completes: (block), as the GPU would.
  std::vector<BlockId> slot_holds(6, BlockId{-1, -1, -1});
  int64_t length = 50;
  int64_t hits = 0;
  std::vector<std::pair<BlockId, int64_t>> pending;
  for (int step = 0; step < 300; ++step) {
    ++length;
    for (int32_t layer = 0; layer < 2; ++layer) {
      for (int32_t head = 0; head < 2; ++head) {
        std::vector<int32_t> picks;
        for (int i = 0; i < 12; ++i) {
          // Skewed toward a few blocks, and the newest tokens.
          const int64_t hot = std::uniform_int_distribution<int64_t>(0, 3)(rng) * 16;
          const int64_t any = std::uniform_int_distribution<int64_t>(0, length - 1)(rng);
          picks.push_back(static_cast<int32_t>(i % 3 == 0 ? any : hot + i % 16));
        }
        // Copies left in flight by the last step finish first, in order.
        for (const auto& [block, slot] : pending) {
          slot_holds[slot] = block;
          p.complete(block, slot);
        }
        pending.clear();
        BlockStep s = p.step(layer, head, picks, length);
        for (size_t i = 0; i < picks.size(); ++i) {
          if (s.slot_of[i] < 0) continue;
          ++hits;
          const BlockId want{layer, head, picks[i] / 16};
          ASSERT_EQ(slot_holds[s.slot_of[i]], want) << "step " << step << ", pick " << picks[i];
          ASSERT_LE((want.index + 1) * 16, length) << "served a partly written block";
        }
        for (const auto& [block, slot] : s.admissions) {
          ASSERT_LE((block.index + 1) * 16, length) << "admitted a partly written block";
          // Half the copies complete at once, the rest at the next step.
          if (rng() % 2 == 0) {
            slot_holds[slot] = block;
            p.complete(block, slot);
          } else {
            pending.emplace_back(block, slot);
          }
        }
      }
    }
    p.end_step();
  }
  EXPECT_GT(hits, 0);
  EXPECT_LE(p.resident_blocks(), 6);
}

}  // namespace
}  // namespace pqkv::testing
