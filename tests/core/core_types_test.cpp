#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "pqkv/dtype.h"
#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/tensor_view.h"
#include "test_util.h"

namespace pqkv {
namespace {

TEST(StatusTest, CarriesCodeAndMessage) {
  Status s = Status::invalid_argument("bad shape");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.to_string(), "InvalidArgument: bad shape");
  EXPECT_EQ(s.with_context("append").message(), "append: bad shape");
  PQKV_EXPECT_OK(ok_status());
}

TEST(StatusTest, ResultHoldsValueOrError) {
  Result<int> good = 3;
  PQKV_ASSERT_OK(good);
  EXPECT_EQ(*good, 3);
  Result<int> bad = Status::not_found("x");
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kNotFound);
}

TEST(DTypeTest, Bf16RoundTripsAndRoundsToNearestEven) {
  for (float f : {0.0f, 1.0f, -2.5f, 3.140625f, 65536.0f, -0.0078125f}) {
    EXPECT_EQ(bf16_to_float(float_to_bf16(f)), f) << f;
  }
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even one (1.0).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DTypeTest, F16RoundTripsNormalsSubnormalsAndLimits) {
  for (float f :
       {0.0f, 1.0f, -2.5f, 0.333251953125f, 65504.0f, 6.103515625e-05f, 5.9604644775390625e-08f}) {
    EXPECT_EQ(f16_to_float(float_to_f16(f)), f) << f;
  }
  EXPECT_TRUE(std::isinf(f16_to_float(float_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  // Every half value survives half -> float -> half.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f) continue;
    ASSERT_EQ(float_to_f16(f16_to_float(static_cast<uint16_t>(h))), h) << h;
  }
}

TEST(ModelSpecTest, PresetsAreValidAndLookedUpByName) {
  for (const auto& name : ModelSpec::preset_names()) {
    auto spec = ModelSpec::preset(name);
    SCOPED_TRACE(name);
    PQKV_ASSERT_OK(spec);
    PQKV_EXPECT_OK(spec->validate());
  }
  auto llama = ModelSpec::preset("llama-3.1-8b");
  EXPECT_EQ(llama->group_size(), 4);
  EXPECT_EQ(llama->row_bytes(), 512);
  EXPECT_FALSE(ModelSpec::preset("gpt-5").ok());
}

TEST(ModelSpecTest, RejectsQHeadsNotMultipleOfKvHeads) {
  ModelSpec s = ModelSpec::tiny();
  s.num_q_heads = 6;
  s.num_kv_heads = 4;
  Status st = s.validate();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("multiple of kv_heads"), std::string::npos);
}

TEST(PqConfigTest, ValidatesDivisibilityAndBits) {
  PQKV_EXPECT_OK(PqConfig{}.validate(128));
  EXPECT_EQ(PqConfig{}.resolved_m(128), 16);  // the default: 8 dims per sub-space
  EXPECT_EQ(PqConfig{}.resolved_m(16), 2);
  PQKV_EXPECT_OK(PqConfig{}.validate(16));
  PqConfig c;
  c.m = 3;
  EXPECT_NE(c.validate(128).message().find("divide head_dim"), std::string::npos);
  c = {};
  c.bits = 9;
  EXPECT_NE(c.validate(128).message().find("1..8"), std::string::npos);
  c.bits = 0;
  EXPECT_FALSE(c.validate(128).ok());
  auto parsed = PqConfig::parse("m=8,b=6");
  PQKV_ASSERT_OK(parsed);
  EXPECT_EQ(parsed->m, 8);
  EXPECT_EQ(parsed->bits, 6);
  EXPECT_EQ(PqConfig::parse("pqcache")->m, 2);
  EXPECT_FALSE(PqConfig::parse("m=8").ok());
}

TEST(BudgetPolicyTest, GrowsWithTheContext) {
  BudgetPolicy b = BudgetPolicy::ratio_of_context(0.1);
  auto short_ctx = b.resolve(1000, 1000);
  auto long_ctx = b.resolve(100000, 1000);
  EXPECT_EQ(short_ctx.sink, 32);
  EXPECT_EQ(short_ctx.window, 50);
  EXPECT_EQ(short_ctx.top_k, 50);
  EXPECT_EQ(long_ctx.window, 5000);
  EXPECT_EQ(long_ctx.top_k, 5000);
}

TEST(BudgetPolicyTest, PqcacheRuleIsFrozenAtPrefill) {
  BudgetPolicy b = BudgetPolicy::pqcache(0.1, 0.5);
  auto at_prefill = b.resolve(1032, 1032);
  auto later = b.resolve(50000, 1032);
  EXPECT_EQ(at_prefill.window, 50);  // (1032 - 32) * 0.1 * 0.5
  EXPECT_EQ(at_prefill.top_k, 50);
  EXPECT_EQ(later.window, at_prefill.window);
  EXPECT_EQ(later.top_k, at_prefill.top_k);
}

TEST(BudgetPolicyTest, ClampsToTheContextAndAlwaysKeepsTheNewestToken) {
  BudgetPolicy b;
  b.window = {0, 0.0};
  b.top_k = {1000, 0.0};
  auto c = b.resolve(10, 10);
  EXPECT_EQ(c.sink, 10);
  EXPECT_EQ(c.window, 0);
  EXPECT_EQ(c.top_k, 0);
  c = b.resolve(100, 100);
  EXPECT_EQ(c.sink, 32);
  EXPECT_EQ(c.window, 1);
  EXPECT_EQ(c.top_k, 67);
  auto all = BudgetPolicy::everything().resolve(777, 10);
  EXPECT_EQ(all.sink + all.window + all.top_k, 777);
}

TEST(TokenCountTest, ParsesAbsoluteRatioAndBoth) {
  EXPECT_EQ(TokenCount::parse("32")->tokens, 32);
  EXPECT_DOUBLE_EQ(TokenCount::parse("5%")->ratio, 0.05);
  EXPECT_DOUBLE_EQ(TokenCount::parse("0.05")->ratio, 0.05);
  auto both = TokenCount::parse("64+0.05");
  PQKV_ASSERT_OK(both);
  EXPECT_EQ(both->resolve(100), 64);
  EXPECT_EQ(both->resolve(10000), 500);
  EXPECT_FALSE(TokenCount::parse("abc").ok());
  EXPECT_FALSE(TokenCount::parse("150%").ok());
}

TEST(TokenCountTest, OneGrammarForCountsAndRatios) {
  EXPECT_EQ(TokenCount::parse("1")->tokens, 1);
  EXPECT_DOUBLE_EQ(TokenCount::parse("1")->ratio, 0.0);
  EXPECT_DOUBLE_EQ(TokenCount::parse("100%")->ratio, 1.0);
  EXPECT_DOUBLE_EQ(TokenCount::parse("0.5%")->ratio, 0.005);
  EXPECT_DOUBLE_EQ(TokenCount::parse("0.999")->ratio, 0.999);
  auto both = TokenCount::parse("64+5%");
  PQKV_ASSERT_OK(both);
  EXPECT_EQ(both->tokens, 64);
  EXPECT_DOUBLE_EQ(both->ratio, 0.05);
  auto swapped = TokenCount::parse("5%+64");
  PQKV_ASSERT_OK(swapped);
  EXPECT_EQ(swapped->tokens, 64);
  EXPECT_DOUBLE_EQ(swapped->ratio, 0.05);
}

TEST(TokenCountTest, RefusesAmbiguousAndNonFiniteText) {
  for (const char* text :
       {"1.0", "1.",   ".5", "2.5",    "nan",    "nan%",   "inf",  "-inf",
        "-5",  "-0.1", "+5", "1e3",    "0x10",   "",       "%",    "5 %",
        " 5",  "64+",  "+",  "64+128", "5%+0.1", "64+nan", "101%", "99999999999999999999"}) {
    auto r = TokenCount::parse(text);
    EXPECT_FALSE(r.ok()) << "'" << text << "' parsed";
    if (!r.ok()) {
      EXPECT_NE(r.status().message().find("64+5%"), std::string::npos) << r.status().to_string();
    }
  }
}

TEST(TensorViewTest, ChecksShapesWithClearMessages) {
  std::vector<float> buf(24);
  TensorView v = host_view(buf.data(), {2, 3, 4});
  EXPECT_EQ(v.numel(), 24);
  PQKV_EXPECT_OK(v.expect_shape("keys", {-1, 3, 4}));
  Status s = v.expect_shape("keys", {-1, 2, 4});
  EXPECT_EQ(s.message(), "keys must have shape [*, 2, 4], got [2, 3, 4]");
}

TEST(DeviceTest, ParsesAndReportsUsability) {
  EXPECT_EQ(*parse_device("cpu"), Device::cpu());
  EXPECT_EQ(*parse_device("cuda:1"), Device::cuda(1));
  EXPECT_FALSE(parse_device("tpu").ok());
  PQKV_EXPECT_OK(check_device_usable(Device::cpu()));
  if (cuda_device_count() == 0) {
    EXPECT_EQ(check_device_usable(Device::cuda(0)).code(), StatusCode::kUnavailable);
  }
}

}  // namespace
}  // namespace pqkv
