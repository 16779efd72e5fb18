#include "workload/quality_metrics.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "pqkv/model_spec.h"
#include "test_util.h"
#include "workload/synthetic_workload.h"

namespace pqkv::workload {
namespace {

ModelSpec one_head(int q_heads) {
  return {"one-head", 1, q_heads, 1, 2, DType::kF32};
}

std::vector<int64_t> range(int64_t begin, int64_t end) {
  std::vector<int64_t> v(static_cast<size_t>(end - begin));
  std::iota(v.begin(), v.end(), begin);
  return v;
}

// Logits 0, ln 2, ln 3, 0 (weights 1, 2, 3, 1 out of 7) and values (t, 0).
struct HandStep {
  std::vector<float> q{std::sqrt(2.0f), 0.0f};
  std::vector<float> keys{0, 0, std::log(2.0f), 0, std::log(3.0f), 0, 0, 0};
  std::vector<float> values{0, 0, 1, 0, 2, 0, 3, 0};
  StepTensors step() const { return {q.data(), keys.data(), values.data(), 4}; }
};

TEST(QualityMetricsTest, MatchesAHandComputedStep) {
  const HandStep hand;
  const BudgetPolicy::Counts counts{1, 1, 1};
  auto oracle = oracle_positions(one_head(1), hand.step(), 0, counts, GqaAggregation::kSoftmaxSum);
  PQKV_ASSERT_OK(oracle);
  EXPECT_EQ(*oracle, (std::vector<int64_t>{0, 2, 3}));
  const std::vector<std::vector<int64_t>> attended{{3, 0, 1, 1}};  // order and repeats ignored
  auto q = evaluate_step(one_head(1), hand.step(), attended, counts, GqaAggregation::kSoftmaxSum);
  PQKV_ASSERT_OK(q);
  EXPECT_NEAR(q->attended_mass, 4.0 / 7, 1e-6);
  EXPECT_NEAR(q->oracle_mass, 5.0 / 7, 1e-6);
  EXPECT_NEAR(q->mass_recall, 0.8, 1e-6);
  // sparse = (0*1 + 1*2 + 3*1) / 4 = 5/4, full = 11/7.
  EXPECT_NEAR(q->output_error, (11.0 / 7 - 5.0 / 4) / (11.0 / 7), 1e-6);
  EXPECT_FALSE(q->needle_hit.has_value());
}

TEST(QualityMetricsTest, OracleAggregatesTheGroupAsConfigured) {
  // Two query heads share one KV head. Middle tokens 1..3: head 0 weighs them
  // 10 : 9 : 1, head 1 weighs them 1 : 9 : 10. Summed, token 2 leads; by the
  // max, tokens 1 and 3 tie ahead of it and the lower position wins.
  const float s = std::sqrt(2.0f);
  const float l9 = std::log(9.0f);
  const float l10 = std::log(10.0f);
  const std::vector<float> q{s, 0, 0, s};
  const std::vector<float> keys{0, 0, l10, 0, l9, l9, 0, l10, 0, 0};
  const std::vector<float> values(keys.size(), 1.0f);
  const StepTensors step{q.data(), keys.data(), values.data(), 5};
  const BudgetPolicy::Counts counts{1, 1, 1};
  auto sum = oracle_positions(one_head(2), step, 0, counts, GqaAggregation::kSoftmaxSum);
  auto max = oracle_positions(one_head(2), step, 0, counts, GqaAggregation::kMax);
  PQKV_ASSERT_OK(sum);
  PQKV_ASSERT_OK(max);
  EXPECT_EQ(*sum, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(*max, (std::vector<int64_t>{0, 1, 4}));
}

class WorkloadStepTest : public ::testing::Test {
 protected:
  void SetUp() override {
    WorkloadOptions o;
    o.prompt_tokens = 3000;
    o.num_needles = 2;
    auto w = SyntheticWorkload::create(spec_, o);
    PQKV_ASSERT_OK(w);
    workload_.emplace(std::move(*w));
    needle_ = workload_->needles().front();
    position_ = needle_.target_position;
    const size_t row = static_cast<size_t>(spec_.num_kv_heads * spec_.head_dim);
    keys_.resize(static_cast<size_t>(position_ + 1) * row);
    values_.resize(keys_.size());
    query_.resize(static_cast<size_t>(spec_.num_q_heads * spec_.head_dim));
    PQKV_ASSERT_OK(workload_->keys(0, 0, position_ + 1, keys_.data()));
    PQKV_ASSERT_OK(workload_->values(0, 0, position_ + 1, values_.data()));
    PQKV_ASSERT_OK(workload_->query(0, position_, query_.data()));
  }
  StepTensors step() const { return {query_.data(), keys_.data(), values_.data(), position_ + 1}; }
  std::vector<std::vector<int64_t>> per_head(const std::vector<int64_t>& positions) const {
    return std::vector<std::vector<int64_t>>(static_cast<size_t>(spec_.num_kv_heads), positions);
  }

  const ModelSpec spec_ = ModelSpec::tiny();
  const BudgetPolicy::Counts counts_{4, 32, 60};
  std::optional<SyntheticWorkload> workload_;
  Needle needle_;
  int64_t position_ = 0;
  std::vector<float> keys_, values_, query_;
};

TEST_F(WorkloadStepTest, EverythingAttendedIsExact) {
  const auto all = per_head(range(0, position_ + 1));
  const BudgetPolicy::Counts everything{4, 32, position_};
  auto q =
      evaluate_step(spec_, step(), all, everything, GqaAggregation::kSoftmaxSum, needle_.position);
  PQKV_ASSERT_OK(q);
  EXPECT_NEAR(q->mass_recall, 1.0, 1e-12);
  EXPECT_NEAR(q->attended_mass, 1.0, 1e-12);
  EXPECT_LT(q->output_error, 1e-12);
  EXPECT_EQ(q->needle_hit, 1.0);
  // Against a smaller oracle budget, attending everything can only do better.
  auto smaller = evaluate_step(spec_, step(), all, counts_, GqaAggregation::kMax);
  PQKV_ASSERT_OK(smaller);
  EXPECT_GE(smaller->mass_recall, 1.0);
}

TEST_F(WorkloadStepTest, OracleBeatsSinkAndWindowAndRandomSelections) {
  const int64_t n = position_ + 1;
  for (GqaAggregation a : {GqaAggregation::kSoftmaxSum, GqaAggregation::kMax}) {
    std::vector<std::vector<int64_t>> oracle;
    for (int g = 0; g < spec_.num_kv_heads; ++g) {
      auto o = oracle_positions(spec_, step(), g, counts_, a);
      PQKV_ASSERT_OK(o);
      EXPECT_EQ(static_cast<int64_t>(o->size()), counts_.sink + counts_.window + counts_.top_k);
      oracle.push_back(*o);
    }
    auto best = evaluate_step(spec_, step(), oracle, counts_, a, needle_.position);
    PQKV_ASSERT_OK(best);
    EXPECT_NEAR(best->mass_recall, 1.0, 1e-12);
    EXPECT_EQ(best->needle_hit, 1.0);

    std::vector<int64_t> sink_window = range(0, counts_.sink);
    for (int64_t t : range(n - counts_.window, n))
      sink_window.push_back(t);
    auto bare = evaluate_step(spec_, step(), per_head(sink_window), counts_, a, needle_.position);
    PQKV_ASSERT_OK(bare);
    EXPECT_EQ(bare->needle_hit, 0.0);
    EXPECT_LT(bare->mass_recall, best->mass_recall);

    std::mt19937_64 rng(99);
    std::vector<int64_t> middle = range(counts_.sink, n - counts_.window);
    std::shuffle(middle.begin(), middle.end(), rng);
    std::vector<int64_t> random = sink_window;
    random.insert(random.end(), middle.begin(), middle.begin() + counts_.top_k);
    auto guess = evaluate_step(spec_, step(), per_head(random), counts_, a);
    PQKV_ASSERT_OK(guess);
    EXPECT_LT(guess->mass_recall, 0.9 * best->mass_recall);
    EXPECT_GT(guess->output_error, best->output_error);
  }
}

TEST_F(WorkloadStepTest, BadInputReturnsStatus) {
  const auto all = per_head(range(0, position_ + 1));
  const auto agg = GqaAggregation::kSoftmaxSum;
  EXPECT_EQ(evaluate_step(spec_, step(), per_head({position_ + 1}), counts_, agg).status().code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(evaluate_step(spec_, step(), std::span(all).first(1), counts_, agg).status().code(),
            StatusCode::kInvalidArgument);
  StepTensors empty = step();
  empty.num_tokens = 0;
  EXPECT_FALSE(evaluate_step(spec_, empty, all, counts_, agg).ok());
  StepTensors no_keys = step();
  no_keys.keys = nullptr;
  EXPECT_FALSE(oracle_positions(spec_, no_keys, 0, counts_, agg).ok());
  EXPECT_EQ(oracle_positions(spec_, step(), 2, counts_, agg).status().code(),
            StatusCode::kOutOfRange);
  EXPECT_FALSE(oracle_positions(spec_, step(), 0, {-1, 0, 0}, agg).ok());
  EXPECT_EQ(exact_logits(spec_, step(), 4).status().code(), StatusCode::kOutOfRange);
  ModelSpec bad = spec_;
  bad.head_dim = 0;
  EXPECT_FALSE(exact_logits(bad, step(), 0).ok());
}

}  // namespace
}  // namespace pqkv::workload
