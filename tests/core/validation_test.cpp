// Validation as a class: sizes, ratios and dtype codes that come from callers,
// and values that cannot be stored in the store's dtype.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "pqkv/dtype.h"
#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/tensor_view.h"
#include "test_util.h"

namespace pqkv {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(TensorViewValidationTest, NegativeSizesAreRefusedEvenWhereAnySizeMatches) {
  std::vector<float> data(64);
  const TensorView negative(data.data(), DType::kF32, Device::cpu(), {-40, 2, 32});
  const Status s = negative.expect_shape("keys", {-1, 2, 32});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("negative size -40"), std::string::npos) << s.to_string();

  // A null pointer with a negative count is refused for the count, not accepted as empty.
  const TensorView null_negative(static_cast<void*>(nullptr), DType::kF32, Device::cpu(),
                                 {-1, 2, 32});
  EXPECT_EQ((null_negative.expect_shape("keys", {-1, 2, 32}).code()), StatusCode::kInvalidArgument);

  const TensorView empty(static_cast<void*>(nullptr), DType::kF32, Device::cpu(), {0, 2, 32});
  PQKV_EXPECT_OK(empty.expect_shape("keys", {-1, 2, 32}));
  const TensorView fine(data.data(), DType::kF32, Device::cpu(), {1, 2, 32});
  PQKV_EXPECT_OK(fine.expect_shape("keys", {-1, 2, 32}));
}

TEST(TensorViewValidationTest, SizesWhoseByteCountOverflowAreRefused) {
  std::vector<float> data(64);
  const TensorView huge(data.data(), DType::kF32, Device::cpu(), {int64_t{1} << 61, 2, 32});
  const Status s = huge.expect_shape("keys", {-1, 2, 32});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("64 bits"), std::string::npos) << s.to_string();
}

TEST(TokenCountValidationTest, NaNInfNegativeAndOverOneAreRefused) {
  PQKV_EXPECT_OK((TokenCount{32, 0.0}.validate("sink")));
  PQKV_EXPECT_OK((TokenCount{0, 1.0}.validate("window")));
  for (double bad : {kNaN, kInf, -kInf, -0.01, 1.01}) {
    const Status s = TokenCount{0, bad}.validate("window");
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << "ratio " << bad;
    EXPECT_NE(s.message().find("window"), std::string::npos) << s.to_string();
  }
  EXPECT_EQ((TokenCount{-1, 0.0}.validate("sink").code()), StatusCode::kInvalidArgument);
}

TEST(BudgetPolicyValidationTest, EveryCountIsValidated) {
  PQKV_EXPECT_OK(BudgetPolicy{}.validate());
  PQKV_EXPECT_OK(BudgetPolicy::everything().validate());
  EXPECT_EQ(BudgetPolicy::ratio_of_context(kNaN).validate().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(BudgetPolicy::ratio_of_context(kInf).validate().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(BudgetPolicy::pqcache(kNaN).validate().code(), StatusCode::kInvalidArgument);
  for (int which = 0; which < 3; ++which) {
    BudgetPolicy b;
    TokenCount* t = which == 0 ? &b.sink : which == 1 ? &b.window : &b.top_k;
    t->ratio = kNaN;
    EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument) << which;
    t->ratio = 0;
    t->tokens = -5;
    EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument) << which;
  }
}

TEST(SequenceOptionsValidationTest, NaNBudgetAndUnknownAggregation) {
  const ModelSpec spec = ModelSpec::tiny();
  SequenceOptions o;
  PQKV_EXPECT_OK(o.validate(spec));
  o.budget.top_k.ratio = kNaN;
  EXPECT_EQ(o.validate(spec).code(), StatusCode::kInvalidArgument);
  o = {};
  o.aggregation = static_cast<GqaAggregation>(7);
  EXPECT_EQ(o.validate(spec).code(), StatusCode::kInvalidArgument);
}

TEST(ModelSpecValidationTest, UnknownDtypeCodeIsRefused) {
  ModelSpec spec = ModelSpec::tiny();
  spec.dtype = static_cast<DType>(9);
  const Status s = spec.validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dtype"), std::string::npos) << s.to_string();
}

TEST(StorableTest, Fp16OverflowBf16RangeAndNonFinite) {
  EXPECT_TRUE(storable_as(65504.0f, DType::kF16));
  EXPECT_TRUE(storable_as(65519.0f, DType::kF16));  // rounds down to 65504
  EXPECT_FALSE(storable_as(65520.0f, DType::kF16));
  EXPECT_FALSE(storable_as(-70000.0f, DType::kF16));
  EXPECT_TRUE(storable_as(70000.0f, DType::kBF16));
  EXPECT_TRUE(storable_as(70000.0f, DType::kF32));
  EXPECT_FALSE(storable_as(FLT_MAX, DType::kBF16));  // rounds up to Inf
  EXPECT_TRUE(storable_as(FLT_MAX, DType::kF32));
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    EXPECT_FALSE(storable_as(std::nanf(""), t));
    EXPECT_FALSE(storable_as(INFINITY, t));
  }
}

TEST(StorableTest, FindUnstorableNamesTheFirstBadElement) {
  std::vector<float> v = testing::random_floats(100, 7);
  EXPECT_EQ(find_unstorable(v.data(), DType::kF32, 100, DType::kF16), -1);
  v[42] = 1e5f;
  v[77] = std::nanf("");
  EXPECT_EQ(find_unstorable(v.data(), DType::kF32, 100, DType::kF16), 42);
  EXPECT_EQ(find_unstorable(v.data(), DType::kF32, 100, DType::kBF16), 77);
  std::vector<uint16_t> bf(100);
  convert_from_float(v.data(), 100, bf.data(), DType::kBF16);
  EXPECT_EQ(find_unstorable(bf.data(), DType::kBF16, 100, DType::kF16), 42);
  EXPECT_EQ(find_unstorable(bf.data(), DType::kBF16, 100, DType::kF32), 77);
}

}  // namespace
}  // namespace pqkv
