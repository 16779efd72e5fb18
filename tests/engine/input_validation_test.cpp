// Counts, ratios and values that the engine must refuse as a class, through
// the C++ API and the C ABI alike, with nothing changed by a refused call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "engine_test_util.h"
#include "pqkv/pqkv.h"

namespace pqkv {
namespace {

using testing::append_random;
using testing::open_small_store;
using testing::random_floats;

constexpr int kKvHeads = 2;  // ModelSpec::tiny()
constexpr int kQHeads = 4;
constexpr int kDim = 32;

// Stores an int into a C enum field as a C caller may: any int, through memory.
template <class Enum>
void set_code(Enum* field, int code) {
  static_assert(sizeof(Enum) == sizeof(int));
  std::memcpy(field, &code, sizeof code);
}

bool mentions(const Status& s, const char* text) {
  return s.message().find(text) != std::string::npos;
}

std::vector<float> attend_exact(Sequence* seq, int layer) {
  const std::vector<float> q = random_floats(kQHeads * kDim, 99);
  std::vector<float> out(kQHeads * kDim);
  const Status s = seq->attend_exact(layer, host_view(q.data(), {kQHeads, kDim}),
                                     host_view(out.data(), {kQHeads, kDim}), Stream::host());
  PQKV_EXPECT_OK(s);
  return out;
}

TEST(NegativeCountTest, PrefillAppendOfNegativeTokensIsRefused) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  PQKV_ASSERT_OK(append_random(s.seq, 100, 1));
  std::vector<float> k(kKvHeads * kDim);
  for (int64_t n : {int64_t{-40}, int64_t{-1}, std::numeric_limits<int64_t>::min()}) {
    const Status st = s.seq->append(0, host_view(k.data(), {n, kKvHeads, kDim}),
                                    host_view(k.data(), {n, kKvHeads, kDim}), Stream::host());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << n;
    EXPECT_TRUE(mentions(st, "negative")) << st.to_string();
    EXPECT_EQ(s.seq->length(0), 100);
  }
  PQKV_ASSERT_OK(s.seq->finish_prefill());
}

TEST(NegativeCountTest, DecodeAppendOfNegativeTokensChangesNothing) {
  SequenceOptions o;
  o.budget = BudgetPolicy::everything();
  auto s = open_small_store(ModelSpec::tiny(), o);
  PQKV_ASSERT_OK(append_random(s.seq, 100, 1));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  const std::vector<float> before = attend_exact(s.seq, 0);
  const Status st =
      s.seq->append(0, host_view(static_cast<float*>(nullptr), {-1, kKvHeads, kDim}),
                    host_view(static_cast<float*>(nullptr), {-1, kKvHeads, kDim}), Stream::host());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
  EXPECT_EQ(s.seq->length(0), 100);
  EXPECT_EQ(attend_exact(s.seq, 0), before);
  // The step that follows works, and the index has a code for every token.
  PQKV_ASSERT_OK(append_random(s.seq, 1, 2));
  std::vector<float> q = random_floats(kQHeads * kDim, 3), out(kQHeads * kDim);
  AttendTrace trace;
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {kQHeads, kDim}),
                               host_view(out.data(), {kQHeads, kDim}), Stream::host(), &trace));
  EXPECT_EQ(trace.context_length, 101);
  PQKV_EXPECT_OK(s.seq->check_health());
}

TEST(NegativeCountTest, CApiNegativeAndNullAppendsAreRefused) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  const int64_t n = 100;
  auto k = random_floats(n * kKvHeads * kDim, 1);
  auto v = random_floats(n * kKvHeads * kDim, 2);
  for (int l = 0; l < 2; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  EXPECT_EQ(pqkv_sequence_append(seq, 0, k.data(), v.data(), -40, PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "negative"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_length(seq, 0), n);
  EXPECT_EQ(pqkv_sequence_append(seq, 0, nullptr, nullptr, -1, PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_sequence_length(seq, 0), n);
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_append(seq, 0, nullptr, nullptr, -1, PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_sequence_length(seq, 0), n);
  std::vector<float> q = random_floats(kQHeads * kDim, 3), out(kQHeads * kDim);
  EXPECT_EQ(pqkv_sequence_attend(seq, 0, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
  pqkv_store_close(store);
}

// fp16 storage: finite fp32 input that overflows fp16 is refused like NaN.
class Fp16OverflowTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelSpec spec = ModelSpec::tiny();
    spec.dtype = DType::kF16;
    SequenceOptions o;
    o.budget = BudgetPolicy::everything();
    s_ = open_small_store(spec, o);
  }
  Status append_with(int layer, int64_t n, int64_t bad_index, float bad, bool in_values) {
    auto k = random_floats(n * kKvHeads * kDim, 10 + layer);
    auto v = random_floats(n * kKvHeads * kDim, 20 + layer);
    (in_values ? v : k)[bad_index] = bad;
    return s_.seq->append(layer, host_view(k.data(), {n, kKvHeads, kDim}),
                          host_view(v.data(), {n, kKvHeads, kDim}), Stream::host());
  }
  testing::SmallStore s_;
};

TEST_F(Fp16OverflowTest, PrefillKeysAboveFp16RangeAreRefusedNamingValueAndPosition) {
  // Token 3, head 1, dim 5.
  const int64_t at = (3 * kKvHeads + 1) * kDim + 5;
  Status st = append_with(0, 8, at, 70000.0f, false);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(mentions(st, "70000")) << st.to_string();
  EXPECT_TRUE(mentions(st, "token 3, head 1, dim 5")) << st.to_string();
  EXPECT_TRUE(mentions(st, "fp16")) << st.to_string();
  EXPECT_EQ(s_.seq->length(0), 0);
  st = append_with(0, 8, at, -1e6f, true);
  EXPECT_TRUE(mentions(st, "values")) << st.to_string();
  EXPECT_EQ(s_.seq->length(0), 0);
  // 65504 is the largest finite fp16 and is stored.
  PQKV_ASSERT_OK(append_with(0, 8, at, 65504.0f, false));

  // The sequence stays usable: prefill, exact attention with finite outputs.
  for (int l = 1; l < 2; ++l)
    PQKV_ASSERT_OK(append_with(l, 8, 0, 1.0f, false));
  for (int l = 0; l < 2; ++l)
    PQKV_ASSERT_OK(append_with(l, 40, 0, 1.0f, false));
  PQKV_ASSERT_OK(s_.seq->finish_prefill());
  for (float x : attend_exact(s_.seq, 1))
    ASSERT_TRUE(std::isfinite(x));
}

TEST_F(Fp16OverflowTest, DecodeOverflowChangesNothing) {
  PQKV_ASSERT_OK(append_random(s_.seq, 64, 5));
  PQKV_ASSERT_OK(s_.seq->finish_prefill());
  const std::vector<float> before = attend_exact(s_.seq, 0);
  const Status st = append_with(0, 1, 7, 1e5f, false);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
  EXPECT_EQ(s_.seq->length(0), 64);
  EXPECT_EQ(attend_exact(s_.seq, 0), before);
  PQKV_ASSERT_OK(append_random(s_.seq, 1, 6));
  std::vector<float> q = random_floats(kQHeads * kDim, 3), out(kQHeads * kDim);
  PQKV_ASSERT_OK(s_.seq->attend(1, host_view(q.data(), {kQHeads, kDim}),
                                host_view(out.data(), {kQHeads, kDim}), Stream::host()));
  for (float x : out)
    ASSERT_TRUE(std::isfinite(x));
}

// Finite queries and keys whose scores or outputs pass fp32's range are
// refused at the step, for every selection, with the sequence unchanged.
TEST(ScoreOverflowTest, ScoresPastFp32AreRefusedForEverySelection) {
  for (const SelectionConfig& selection :
       {SelectionConfig{}, SelectionConfig::pq(), SelectionConfig::oracle()}) {
    SequenceOptions o;
    o.selection = selection;
    auto s = open_small_store(ModelSpec::tiny(), o);
    PQKV_ASSERT_OK(append_random(s.seq, 300, 7));
    PQKV_ASSERT_OK(s.seq->finish_prefill());
    const std::vector<float> before = attend_exact(s.seq, 0);
    std::vector<float> out(kQHeads * kDim);
    // Every query head points along token 100's key of its KV head (layer 0's
    // keys as append_random draws them): q . k is scale times the key's L1
    // norm (about 16), past 3.4e38 at both scales.
    const std::vector<float> keys = random_floats(300 * kKvHeads * kDim, 7 * 1000);
    for (float scale : {1e38f, 3e38f}) {
      std::vector<float> q(kQHeads * kDim);
      for (int h = 0; h < kQHeads; ++h) {
        const float* k = keys.data() + (100 * kKvHeads + h / (kQHeads / kKvHeads)) * kDim;
        for (int c = 0; c < kDim; ++c)
          q[h * kDim + c] = k[c] < 0 ? -scale : scale;
      }
      const TensorView qv = host_view(q.data(), {kQHeads, kDim});
      const TensorView ov = host_view(out.data(), {kQHeads, kDim});
      for (int exact = 0; exact < 2; ++exact) {
        const Status st = exact != 0 ? s.seq->attend_exact(0, qv, ov, Stream::host())
                                     : s.seq->attend(0, qv, ov, Stream::host());
        EXPECT_EQ(st.code(), StatusCode::kInvalidArgument)
            << selection.to_string() << " " << scale << " " << exact << " " << st.to_string();
        EXPECT_TRUE(mentions(st, "fp32's range")) << st.to_string();
        EXPECT_TRUE(mentions(st, "query head")) << st.to_string();
      }
    }
    EXPECT_EQ(attend_exact(s.seq, 0), before) << selection.to_string();
  }
}

// Keys a codec cannot fit in fp32 once left every token the same code (PQ at
// 1e20 or 1e-25 selected the first tokens in order) or scored past fp32
// (int4 over a channel spanning -3e38..3e38): refused where the codec is fit.
TEST(ScoreOverflowTest, KeysOutsideTheCodecsRangeAreRefusedAtTheFit) {
  struct Case {
    SelectionConfig selection;
    float scale;        // of every key
    bool wide_channel;  // channel 0 alternates -3e38 and 3e38
    const char* says;
  };
  for (const Case& c : {Case{SelectionConfig::pq(), 1e20f, false, "PQ cannot fit"},
                        Case{SelectionConfig::pq(), 1e-25f, false, "PQ cannot fit"},
                        Case{SelectionConfig{}, 1.0f, true, "cannot fit channel 0"}}) {
    SCOPED_TRACE(c.selection.to_string() + " " + std::to_string(c.scale));
    SequenceOptions o;
    o.selection = c.selection;
    auto s = open_small_store(ModelSpec::tiny(), o);
    const int64_t n = 300;
    for (int l = 0; l < 2; ++l) {
      std::vector<float> k = random_floats(n * kKvHeads * kDim, 50 + l);
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] *= c.scale;
        if (c.wide_channel && i % kDim == 0)
          k[i] = (i / (kDim * kKvHeads)) % 2 == 0 ? 3e38f : -3e38f;
      }
      const std::vector<float> v = random_floats(k.size(), 60 + l);
      PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {n, kKvHeads, kDim}),
                                   host_view(v.data(), {n, kKvHeads, kDim}), Stream::host()));
    }
    const Status st = s.seq->finish_prefill();
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
    EXPECT_TRUE(mentions(st, c.says)) << st.to_string();
  }
  // Just inside PQ's range, it fits.
  SequenceOptions o;
  o.selection = SelectionConfig::pq();
  auto s = open_small_store(ModelSpec::tiny(), o);
  for (int l = 0; l < 2; ++l) {
    std::vector<float> k = random_floats(300 * kKvHeads * kDim, 70 + l);
    for (float& x : k)
      x *= 1e17f;
    PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {300, kKvHeads, kDim}),
                                 host_view(k.data(), {300, kKvHeads, kDim}), Stream::host()));
  }
  PQKV_EXPECT_OK(s.seq->finish_prefill());
}

TEST(ScoreOverflowTest, LargeFiniteScoresStillAttend) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  PQKV_ASSERT_OK(append_random(s.seq, 300, 8));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  // Scores near 1e30: one token takes all the weight, nothing overflows.
  std::vector<float> q = random_floats(kQHeads * kDim, 4), out(kQHeads * kDim);
  for (float& x : q)
    x *= 1e30f;
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {kQHeads, kDim}),
                               host_view(out.data(), {kQHeads, kDim}), Stream::host()));
  for (float x : out)
    ASSERT_TRUE(std::isfinite(x));
}

TEST(ScoreOverflowTest, ValuesNearFp32sLimitAverageToAFiniteOutput) {
  // 200 tokens of values 1e37: their weighted sum passes fp32, their average does not.
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  const int64_t n = 200;
  for (int l = 0; l < 2; ++l) {
    std::vector<float> k(n * kKvHeads * kDim, 0.0f);
    std::vector<float> v(k.size(), 1e37f);
    PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {n, kKvHeads, kDim}),
                                 host_view(v.data(), {n, kKvHeads, kDim}), Stream::host()));
  }
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  const std::vector<float> q = random_floats(kQHeads * kDim, 6);
  std::vector<float> out(kQHeads * kDim);
  const TensorView qv = host_view(q.data(), {kQHeads, kDim});
  const TensorView ov = host_view(out.data(), {kQHeads, kDim});
  for (int exact = 0; exact < 2; ++exact) {
    PQKV_ASSERT_OK(exact != 0 ? s.seq->attend_exact(0, qv, ov, Stream::host())
                              : s.seq->attend(0, qv, ov, Stream::host()));
    for (float x : out)
      ASSERT_NEAR(x, 1e37f, 1e35f) << exact;  // 1e37 rounded to bf16
  }
}

TEST(ScoreOverflowTest, OutputPastTheOutputDtypeIsRefused) {
  // bf16 values of 1e6 fit their storage but not an fp16 output.
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  const int64_t n = 64;
  for (int l = 0; l < 2; ++l) {
    auto k = random_floats(n * kKvHeads * kDim, 30 + l);
    std::vector<float> v(k.size(), 1e6f);
    PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {n, kKvHeads, kDim}),
                                 host_view(v.data(), {n, kKvHeads, kDim}), Stream::host()));
  }
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  std::vector<float> q = random_floats(kQHeads * kDim, 5);
  std::vector<uint16_t> out16(kQHeads * kDim);
  const TensorView ov(out16.data(), DType::kF16, Device::cpu(), {kQHeads, kDim});
  const TensorView qv = host_view(q.data(), {kQHeads, kDim});
  for (int exact = 0; exact < 2; ++exact) {
    const Status st = exact != 0 ? s.seq->attend_exact(0, qv, ov, Stream::host())
                                 : s.seq->attend(0, qv, ov, Stream::host());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
    EXPECT_TRUE(mentions(st, "fp16 output")) << st.to_string();
  }
  std::vector<float> out(kQHeads * kDim);
  PQKV_ASSERT_OK(s.seq->attend(0, qv, host_view(out.data(), {kQHeads, kDim}), Stream::host()));
  EXPECT_NEAR(out[0], 1e6f, 1e4f);
}

TEST(Bf16RangeTest, LargeFiniteKeysAreStoredInBf16) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  auto k = random_floats(4 * kKvHeads * kDim, 1);
  k[3] = 70000.0f;
  PQKV_EXPECT_OK(s.seq->append(0, host_view(k.data(), {4, kKvHeads, kDim}),
                               host_view(k.data(), {4, kKvHeads, kDim}), Stream::host()));
}

TEST(RatioValidationTest, CApiRefusesNaNInfNegativeAndOverOneRatios) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (int which = 0; which < 3; ++which) {
    for (double bad : {nan, inf, -inf, -0.5, 1.5}) {
      pqkv_sequence_options qo;
      pqkv_sequence_options_init(&qo);
      pqkv_token_count* t = which == 0 ? &qo.sink : which == 1 ? &qo.window : &qo.top_k;
      t->ratio = bad;
      pqkv_sequence* seq = nullptr;
      EXPECT_EQ(pqkv_sequence_create(store, "s", &qo, &seq), PQKV_INVALID_ARGUMENT)
          << which << " " << bad;
      EXPECT_NE(std::strstr(pqkv_last_error(), "ratio"), nullptr) << pqkv_last_error();
      EXPECT_EQ(seq, nullptr);
    }
    pqkv_sequence_options qo;
    pqkv_sequence_options_init(&qo);
    (which == 0 ? qo.sink : which == 1 ? qo.window : qo.top_k).tokens = -3;
    pqkv_sequence* seq = nullptr;
    EXPECT_EQ(pqkv_sequence_create(store, "s", &qo, &seq), PQKV_INVALID_ARGUMENT) << which;
  }
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  set_code(&qo.aggregation, 256);  // would wrap to 0 in a uint8_t cast
  pqkv_sequence* seq = nullptr;
  EXPECT_EQ(pqkv_sequence_create(store, "s", &qo, &seq), PQKV_INVALID_ARGUMENT);
  pqkv_sequence_options_init(&qo);
  ASSERT_EQ(pqkv_sequence_create(store, "s", &qo, &seq), PQKV_OK) << pqkv_last_error();
  pqkv_store_close(store);

  set_code(&so.spec.dtype, 258);  // would wrap to fp16 in a uint8_t cast
  EXPECT_EQ(pqkv_store_open(&so, &store), PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "dtype"), nullptr) << pqkv_last_error();
}

TEST(CheckHealthTest, CpuStoreIsHealthyAndBadHostInputNeverEntersIt) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  PQKV_EXPECT_OK(s.seq->check_health());
  auto k = random_floats(4 * kKvHeads * kDim, 1);
  k[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(s.seq
                   ->append(0, host_view(k.data(), {4, kKvHeads, kDim}),
                            host_view(k.data(), {4, kKvHeads, kDim}), Stream::host())
                   .ok());
  PQKV_EXPECT_OK(s.seq->check_health());
}

}  // namespace
}  // namespace pqkv
