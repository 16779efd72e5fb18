// The block cache's policy on the host: partial blocks are never admitted
// nor served, admissions serve only once complete, LFU picks the victim with
// aging, and an evicted slot never serves its old block.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
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

// The policy written the plain way, for the flat one to match step by step:
// ordered maps keyed by block, counts halved eagerly, the victim searched
// over every resident block.
class ReferencePolicy {
 public:
  ReferencePolicy(int64_t block, int64_t slots, int aging)
      : block_(block), slots_(slots), aging_(aging) {
    for (int64_t s = slots - 1; s >= 0; --s)
      free_.push_back(s);
  }
  BlockStep step(int32_t layer, int32_t head, const std::vector<int32_t>& positions, int64_t length,
                 int64_t max_admissions) {
    BlockStep out;
    std::map<int64_t, int64_t> served;
    for (const int32_t p : positions) {
      if (p < 0) {
        out.slot_of.push_back(-1);
        continue;
      }
      const int64_t index = p / block_;
      if (!served.count(index)) served[index] = ready_slot(BlockId{layer, head, index});
      out.slot_of.push_back(served[index]);
      (served[index] >= 0 ? out.hits : out.misses) += 1;
    }
    std::vector<BlockId> candidates;
    for (const auto& [index, slot] : served) {
      const BlockId b{layer, head, index};
      ++counts_[b];
      if ((index + 1) * block_ <= length && !resident_.count(b)) candidates.push_back(b);
    }
    if (slots_ == 0) return out;
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](const BlockId& a, const BlockId& b) { return counts_[a] > counts_[b]; });
    for (const BlockId& b : candidates) {
      if (max_admissions >= 0 && static_cast<int64_t>(out.admissions.size()) >= max_admissions)
        break;
      int64_t slot = -1;
      if (!free_.empty()) {
        slot = free_.back();
        free_.pop_back();
      } else {
        // The coldest resident block, the earliest admitted among equals.
        auto victim = resident_.begin();
        for (auto it = resident_.begin(); it != resident_.end(); ++it) {
          const auto key = std::make_pair(counts_[it->first], std::get<2>(it->second));
          if (key < std::make_pair(counts_[victim->first], std::get<2>(victim->second)))
            victim = it;
        }
        if (counts_[victim->first] >= counts_[b]) break;
        slot = std::get<0>(victim->second);
        out.evictions.emplace_back(victim->first, slot);
        resident_.erase(victim);
      }
      resident_[b] = {slot, false, admitted_++};
      out.admissions.emplace_back(b, slot);
    }
    return out;
  }
  void complete(const BlockId& b, int64_t slot) {
    const auto it = resident_.find(b);
    if (it != resident_.end() && std::get<0>(it->second) == slot) std::get<1>(it->second) = true;
  }
  void end_step() {
    if (aging_ == 0 || ++steps_ % aging_ != 0) return;
    for (auto& [b, c] : counts_)
      c /= 2;
  }
  int64_t ready_slot(const BlockId& b) const {
    const auto it = resident_.find(b);
    return it != resident_.end() && std::get<1>(it->second) ? std::get<0>(it->second) : -1;
  }
  uint32_t count(const BlockId& b) const {
    const auto it = counts_.find(b);
    return it == counts_.end() ? 0 : it->second;
  }
  int64_t resident() const { return static_cast<int64_t>(resident_.size()); }

 private:
  int64_t block_;
  int64_t slots_;
  int aging_;
  std::map<BlockId, uint32_t> counts_;
  std::map<BlockId, std::tuple<int64_t, bool, int64_t>> resident_;  // slot, ready, admitted_at
  std::vector<int64_t> free_;
  int64_t admitted_ = 0;
  int64_t steps_ = 0;
};

struct Case {
  int64_t block;
  int64_t slots;
  int aging;
  int64_t picks;           // positions per (layer, head) and step
  int64_t max_admissions;  // per step() call; -1 = no limit
  uint64_t seed;
};

// Random skewed steps with padding, a growing partly written last block,
// copies that complete late or never before an eviction, and ties of counts
// everywhere (few picks per block, aging that collapses counts): every step's
// slots, hits, admissions, evictions and counts equal the reference's.
void expect_same_as_reference(const Case& c) {
  SCOPED_TRACE("seed " + std::to_string(c.seed) + ", block " + std::to_string(c.block) +
               ", slots " + std::to_string(c.slots) + ", aging " + std::to_string(c.aging) +
               ", picks " + std::to_string(c.picks) + ", max admissions " +
               std::to_string(c.max_admissions));
  std::mt19937_64 rng(c.seed);
  BlockCachePolicy p = make_policy(c.slots, c.block, c.aging);
  ReferencePolicy ref(c.block, c.slots, c.aging);
  int64_t length = 3 * c.block + 5;
  std::vector<std::pair<BlockId, int64_t>> pending;
  int64_t hits = 0;
  int64_t evictions = 0;
  for (int step = 0; step < 400; ++step) {
    length += static_cast<int64_t>(rng() % 3);
    for (int32_t layer = 0; layer < 2; ++layer) {
      for (int32_t head = 0; head < 3; ++head) {
        std::vector<int32_t> picks;
        const int64_t hot = static_cast<int64_t>(rng() % 4);
        for (int64_t i = 0; i < c.picks; ++i) {
          const uint64_t kind = rng() % 8;
          if (kind == 0) {
            picks.push_back(-1);  // padding
          } else if (kind == 1) {
            picks.push_back(static_cast<int32_t>(length - 1 - static_cast<int64_t>(rng() % 4)));
          } else if (kind < 5) {
            picks.push_back(static_cast<int32_t>((hot + i % 3) * c.block +
                                                 static_cast<int64_t>(rng() % c.block)));
          } else {
            picks.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(length)));
          }
        }
        // Some copies in flight complete now, in a random order; the rest wait.
        std::shuffle(pending.begin(), pending.end(), rng);
        for (size_t i = 0; i < pending.size();) {
          if (rng() % 3 != 0) {
            p.complete(pending[i].first, pending[i].second);
            ref.complete(pending[i].first, pending[i].second);
            pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
          } else {
            ++i;
          }
        }
        const BlockStep got = p.step(layer, head, picks, length, c.max_admissions);
        const BlockStep want = ref.step(layer, head, picks, length, c.max_admissions);
        const std::string where = "step " + std::to_string(step) + ", layer " +
                                  std::to_string(layer) + ", head " + std::to_string(head);
        ASSERT_EQ(got.slot_of, want.slot_of) << where;
        ASSERT_EQ(got.hits, want.hits) << where;
        ASSERT_EQ(got.misses, want.misses) << where;
        ASSERT_EQ(got.admissions, want.admissions) << where;
        ASSERT_EQ(got.evictions, want.evictions) << where;
        for (const auto& [block, slot] : got.admissions) {
          ASSERT_LE((block.index + 1) * c.block, length) << where << ": a partly written block";
          pending.emplace_back(block, slot);
        }
        for (int64_t index = 0; index <= length / c.block; ++index) {
          const BlockId b{layer, head, index};
          ASSERT_EQ(p.count(b), ref.count(b)) << where << ", block " << index;
          ASSERT_EQ(p.ready_slot(b), ref.ready_slot(b)) << where << ", block " << index;
        }
        ASSERT_EQ(p.resident_blocks(), ref.resident()) << where;
        hits += got.hits;
        evictions += static_cast<int64_t>(got.evictions.size());
      }
    }
    p.end_step();
    ref.end_step();
  }
  if (c.slots > 0) {
    EXPECT_GT(hits, 0);
    EXPECT_GT(evictions, 0);
  }
}

TEST(BlockCachePolicyTest, MatchesTheReferencePolicyStepByStep) {
  for (const Case& c :
       {Case{16, 6, 3, 12, -1, 11}, Case{16, 1, 2, 5, -1, 12}, Case{32, 9, 0, 20, 2, 13},
        Case{8, 17, 1, 30, -1, 14}, Case{64, 4, 5, 7, 1, 15}, Case{16, 0, 4, 10, -1, 16}}) {
    expect_same_as_reference(c);
  }
}

TEST(BlockCachePolicyTest, TiesGoToTheEarliestAdmittedVictimAndTheLowerCandidate) {
  BlockCachePolicy p = make_policy(2, 16, /*aging=*/0);
  // Blocks 3 then 1 admitted in one step: equal counts, the lower first.
  BlockStep s = p.step(0, 0, std::vector<int32_t>{50, 20}, 1000);
  ASSERT_EQ(s.admissions.size(), 2u);
  EXPECT_EQ(s.admissions[0].first.index, 1);
  EXPECT_EQ(s.admissions[1].first.index, 3);
  complete_all(p, s);
  // Block 5 read twice beats both (count 1): the victim is block 1, admitted first.
  p.step(0, 0, std::vector<int32_t>{80}, 1000);
  s = p.step(0, 0, std::vector<int32_t>{81}, 1000);
  ASSERT_EQ(s.evictions.size(), 1u);
  EXPECT_EQ(s.evictions[0].first.index, 1);
  // Block 7 read twice ties block 5 (2) and beats block 3 (1): block 3 leaves.
  p.step(0, 0, std::vector<int32_t>{112}, 1000);
  s = p.step(0, 0, std::vector<int32_t>{113}, 1000);
  ASSERT_EQ(s.evictions.size(), 1u);
  EXPECT_EQ(s.evictions[0].first.index, 3);
}

TEST(BlockCachePolicyTest, AgingReordersEqualCountsByAdmission) {
  BlockCachePolicy p = make_policy(2, 16, /*aging=*/1);
  // Block 0 admitted first with count 1, block 1 later read 3 times (count 3).
  complete_all(p, p.step(0, 0, std::vector<int32_t>{0}, 1000));
  for (int i = 0; i < 3; ++i)
    complete_all(p, p.step(0, 0, std::vector<int32_t>{16}, 1000));
  EXPECT_EQ(p.count(BlockId{0, 0, 1}), 3u);
  // Two halvings: block 0 -> 0, block 1 -> 0 as well. Equal: the earlier admitted (block 0) goes.
  p.end_step();
  p.end_step();
  EXPECT_EQ(p.count(BlockId{0, 0, 0}), 0u);
  EXPECT_EQ(p.count(BlockId{0, 0, 1}), 0u);
  const BlockStep s = p.step(0, 0, std::vector<int32_t>{40}, 1000);
  ASSERT_EQ(s.evictions.size(), 1u);
  EXPECT_EQ(s.evictions[0].first.index, 0);
}

TEST(BlockCachePolicyTest, AReusedSlotServesOnlyItsNewBlockAndOnlyOnceComplete) {
  BlockCachePolicy p = make_policy(1, 16, /*aging=*/0);
  complete_all(p, p.step(0, 0, std::vector<int32_t>{3}, 1000));
  const int64_t slot = p.ready_slot(BlockId{0, 0, 0});
  ASSERT_EQ(slot, 0);
  // Block 2 of another head wins the slot: block 0 stops at once, block 2 waits for its copy.
  p.step(1, 2, std::vector<int32_t>{33}, 1000);
  const BlockStep s = p.step(1, 2, std::vector<int32_t>{34}, 1000);
  ASSERT_EQ(s.admissions.size(), 1u);
  EXPECT_EQ(s.admissions[0], std::make_pair(BlockId{1, 2, 2}, slot));
  EXPECT_EQ(p.ready_slot(BlockId{0, 0, 0}), -1);
  EXPECT_EQ(p.ready_slot(BlockId{1, 2, 2}), -1);
  EXPECT_EQ(p.step(0, 0, std::vector<int32_t>{3}, 1000).slot_of[0], -1);
  EXPECT_EQ(p.step(1, 2, std::vector<int32_t>{33}, 1000).slot_of[0], -1);
  complete_all(p, s);
  EXPECT_EQ(p.step(1, 2, std::vector<int32_t>{33}, 1000).slot_of[0], slot);
}

TEST(BlockCachePolicyTest, StepIntoWithoutPositionsCountsTheSameAndReusesItsOutput) {
  BlockCachePolicy a = make_policy(3, 16, 2);
  BlockCachePolicy b = make_policy(3, 16, 2);
  std::mt19937_64 rng(21);
  SCOPED_TRACE("seed 21");
  BlockStep reused;
  for (int step = 0; step < 50; ++step) {
    std::vector<int32_t> picks;
    for (int i = 0; i < 9; ++i)
      picks.push_back(static_cast<int32_t>(rng() % 200));
    const BlockStep full = a.step(0, 1, picks, 190, 2);
    b.step_into(0, 1, picks, 190, 2, /*per_position=*/false, &reused);
    EXPECT_TRUE(reused.slot_of.empty());
    EXPECT_EQ(reused.hits, 0);
    EXPECT_EQ(reused.misses, 0);
    ASSERT_EQ(reused.admissions, full.admissions) << "step " << step;
    ASSERT_EQ(reused.evictions, full.evictions) << "step " << step;
    complete_all(a, full);
    complete_all(b, reused);
    a.end_step();
    b.end_step();
  }
}

}  // namespace
}  // namespace pqkv::testing
