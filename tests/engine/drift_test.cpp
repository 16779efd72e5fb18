// Drift options of a sequence (SequenceOptions::refit_threshold and
// refit_min_tokens): validation, drift statistics, refits started by
// appends, and the same through the C ABI.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "engine/c_handles.h"
#include "engine/inspector.h"
#include "engine_test_util.h"
#include "pqkv/pqkv.h"

namespace pqkv::testing {
namespace {

SequenceOptions refit_options(double threshold, int64_t min_tokens) {
  SequenceOptions o;
  o.selection.code = KeyCode::kInt8;
  o.refit_threshold = threshold;
  o.refit_min_tokens = min_tokens;
  return o;
}

TEST(DriftOptionsTest, ValidationNamesTheField) {
  const ModelSpec spec = ModelSpec::tiny();
  PQKV_EXPECT_OK(refit_options(0, 512).validate(spec));
  PQKV_EXPECT_OK(refit_options(1.5, 1).validate(spec));
  for (double bad : {0.5, 1.0, -2.0, std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    const Status s = refit_options(bad, 512).validate(spec);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("refit_threshold"), std::string::npos) << s.to_string();
  }
  const Status s = refit_options(2, 0).validate(spec);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("refit_min_tokens"), std::string::npos) << s.to_string();

  auto store = Store::open(cpu_store_options(spec));
  PQKV_ASSERT_OK(store);
  EXPECT_EQ((*store)->create_sequence("bad", refit_options(0.9, 512)).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(DriftOptionsTest, StatsNeedAnIndexAndALayerInRange) {
  SmallStore s = open_small_store(ModelSpec::tiny(), refit_options(2, 64));
  EXPECT_EQ(s.seq->drift_stats(0).status().code(), StatusCode::kFailedPrecondition);
  PQKV_ASSERT_OK(append_random(s.seq, 256, 1));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  EXPECT_EQ(s.seq->drift_stats(2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.seq->drift_stats(-1).status().code(), StatusCode::kInvalidArgument);
  auto d = s.seq->drift_stats(1);
  PQKV_ASSERT_OK(d);
  EXPECT_TRUE(d->tracking);
  EXPECT_EQ(d->tokens_since_fit, 0);
  EXPECT_EQ(d->refits, 0);
}

TEST(DriftOptionsTest, DriftedAppendsStartARefitOffTheDecodePath) {
  const uint64_t seed = 41;
  SCOPED_TRACE("seed " + std::to_string(seed));
  SmallStore s = open_small_store(ModelSpec::tiny(), refit_options(2, 64));
  PQKV_ASSERT_OK(append_random(s.seq, 2048, seed));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  // In-distribution tokens: no refit however many.
  for (int t = 0; t < 96; ++t)
    PQKV_ASSERT_OK(append_random(s.seq, 1, seed + 1 + t));
  engine::Inspector::wait_refits(*s.seq);
  auto d = s.seq->drift_stats(0);
  PQKV_ASSERT_OK(d);
  EXPECT_EQ(d->tokens_since_fit, 96);
  EXPECT_LT(d->max_error_ratio, 1.5);
  EXPECT_EQ(d->refits, 0);
  // Drifted tokens: the first one passes the threshold (64 tokens since the
  // fit are in), and the refit starts in that append without waiting.
  PQKV_ASSERT_OK(append_moved(s.seq, 1, seed + 200, 3.0f, 4.0f));
  for (int l = 0; l < 2; ++l) {
    d = s.seq->drift_stats(l);
    PQKV_ASSERT_OK(d);
    EXPECT_GT(d->max_error_ratio, 2.0);
    EXPECT_TRUE(d->refit_running || d->refits == 1) << "layer " << l;
  }
  engine::Inspector::wait_refits(*s.seq);
  // The next append swaps the refit in: fit on every key but the sink.
  PQKV_ASSERT_OK(append_moved(s.seq, 1, seed + 201, 3.0f, 4.0f));
  for (int l = 0; l < 2; ++l) {
    d = s.seq->drift_stats(l);
    PQKV_ASSERT_OK(d);
    EXPECT_EQ(d->refits, 1) << "layer " << l;
    EXPECT_FALSE(d->refit_running);
    EXPECT_TRUE(d->last_refit_error.empty()) << d->last_refit_error;
    EXPECT_EQ(d->fit_tokens, 2048 + 96 + 1 - 32);
    EXPECT_EQ(d->tokens_since_fit, 1);
  }
  // Decoding goes on over the new codes.
  std::vector<float> q = random_floats(4 * 32, seed + 400);
  std::vector<float> out(q.size());
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                               Stream::host()));
}

TEST(DriftOptionsTest, CAbiRoundTrip) {
  pqkv_sequence_options o;
  pqkv_sequence_options_init(&o);
  EXPECT_EQ(o.refit_threshold, 0.0);
  EXPECT_EQ(o.refit_min_tokens, 512);
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();

  pqkv_sequence* seq = nullptr;
  for (double bad : {0.5, 1.0, -2.0, std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    o.refit_threshold = bad;
    EXPECT_EQ(pqkv_sequence_create(store, "bad", &o, &seq), PQKV_INVALID_ARGUMENT) << bad;
    EXPECT_NE(std::string(pqkv_last_error()).find("refit_threshold"), std::string::npos);
    EXPECT_EQ(seq, nullptr);
  }
  o.refit_threshold = 2.0;
  for (int64_t bad : {int64_t{-1}, std::numeric_limits<int64_t>::min()}) {
    o.refit_min_tokens = bad;
    EXPECT_EQ(pqkv_sequence_create(store, "bad", &o, &seq), PQKV_INVALID_ARGUMENT) << bad;
    EXPECT_NE(std::string(pqkv_last_error()).find("refit_min_tokens"), std::string::npos);
  }
  o.refit_min_tokens = std::numeric_limits<int64_t>::max();  // never refits: allowed
  ASSERT_EQ(pqkv_sequence_create(store, "huge", &o, &seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_drop(store, "huge"), PQKV_OK);
  o.refit_threshold = 1.75;
  o.refit_min_tokens = 0;  // a zeroed field keeps the default
  ASSERT_EQ(pqkv_sequence_create(store, "s", &o, &seq), PQKV_OK) << pqkv_last_error();
  auto cpp = capi::resolve_sequence(seq, "seq");  // the C handle's Sequence
  PQKV_ASSERT_OK(cpp);
  EXPECT_EQ(cpp->seq->options().refit_threshold, 1.75);
  EXPECT_EQ(cpp->seq->options().refit_min_tokens, 512);

  pqkv_drift_stats stats;
  EXPECT_EQ(pqkv_sequence_drift_stats(seq, 0, &stats), PQKV_FAILED_PRECONDITION);
  const int64_t n = 128;
  const auto keys = random_floats(static_cast<size_t>(n) * 2 * 32, 3);
  for (int l = 0; l < 2; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, keys.data(), keys.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_drift_stats(seq, 1, &stats), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(stats.tracking, 1);
  EXPECT_EQ(stats.fit_tokens, n - 32);
  EXPECT_EQ(stats.tokens_since_fit, 0);
  EXPECT_EQ(stats.refits, 0);
  EXPECT_EQ(pqkv_sequence_drift_stats(seq, 5, &stats), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_sequence_drift_stats(seq, 0, nullptr), PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);
}

}  // namespace
}  // namespace pqkv::testing
