// The sampler refuses what it cannot sample from: a temperature that is NaN,
// infinite or negative, and logits that are empty, NaN, +Inf or all -Inf.
#include "model/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "test_util.h"

namespace pqkv::model {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(SamplerTest, RefusesTemperaturesThatAreNotFiniteAndNonNegative) {
  for (float t : {kNaN, kInf, -kInf, -1.0f, -1e-30f}) {
    SamplingOptions o;
    o.temperature = t;
    auto s = Sampler::create(o);
    ASSERT_FALSE(s.ok()) << "temperature " << t;
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("temperature must be a finite number >= 0"),
              std::string::npos)
        << s.status().to_string();
  }
  for (float t : {0.0f, 1e-30f, 0.7f, 1e30f}) {
    SamplingOptions o;
    o.temperature = t;
    PQKV_EXPECT_OK(Sampler::create(o));
  }
}

TEST(SamplerTest, RefusesLogitsItCannotSampleFrom) {
  for (float t : {0.0f, 1.0f}) {
    auto s = Sampler::create({t, 7});
    PQKV_ASSERT_OK(s);
    const std::vector<std::vector<float>> bad = {
        {}, {1.0f, kNaN, 2.0f}, {1.0f, kInf}, {-kInf, -kInf, -kInf}};
    for (const auto& logits : bad) {
      auto r = s->next(logits);
      ASSERT_FALSE(r.ok()) << "temperature " << t << ", " << logits.size() << " logits";
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().to_string();
    }
  }
}

TEST(SamplerTest, NegativeInfinityMasksATokenAndGreedyTakesTheLowestIdOnTies) {
  auto greedy = Sampler::create({0.0f, 0});
  PQKV_ASSERT_OK(greedy);
  EXPECT_EQ(greedy->next(std::vector<float>{-kInf, 3.0f, 3.0f, 1.0f}).value(), 1);
  auto hot = Sampler::create({1.0f, 1234});
  PQKV_ASSERT_OK(hot);
  const std::vector<float> logits = {-kInf, 0.0f, -kInf, 0.0f};
  std::map<int32_t, int> seen;
  for (int i = 0; i < 200; ++i)
    ++seen[hot->next(logits).value()];
  EXPECT_EQ(seen.count(0) + seen.count(2), 0u) << "a masked token was sampled (seed 1234)";
  EXPECT_GT(seen[1], 50);
  EXPECT_GT(seen[3], 50);
}

}  // namespace
}  // namespace pqkv::model
