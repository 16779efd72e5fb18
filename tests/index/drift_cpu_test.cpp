// Drift tracking and refits of the CPU index: the error ratio of keys added
// after the fit, a refit that matches a fresh build, and searches that stay
// valid while a refit is built on another thread.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <set>
#include <thread>
#include <vector>

#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::SearchRequest;

constexpr int kKvHeads = 2;
constexpr int kHeadDim = 32;
constexpr int kQHeads = 4;

struct CodeCase {
  const char* name;
  SelectionConfig selection;
  // The largest ratio in-distribution keys may show: PQ fits its own keys
  // better than new ones (k-means overfits a little).
  double in_distribution_max;
};

std::vector<CodeCase> code_cases() {
  SelectionConfig int8;
  int8.code = KeyCode::kInt8;
  return {
      {"int4", SelectionConfig{}, 1.3}, {"int8", int8, 1.3}, {"pq", SelectionConfig::pq(), 1.6}};
}

std::unique_ptr<index::LayerIndex> make_index(const SelectionConfig& selection) {
  auto made =
      index::make_layer_index(Device::cpu(), kHeadDim, kKvHeads, small_config(4, 6), selection);
  PQKV_EXPECT_OK(made);
  return std::move(made).value();
}

TensorView keys_view(const std::vector<float>& keys, int64_t begin, int64_t n) {
  return host_view(keys.data() + begin * kKvHeads * kHeadDim, {n, kKvHeads, kHeadDim});
}

// Keys of tokens [begin, begin + n), as refit takes them.
std::vector<float> slice(const std::vector<float>& keys, int64_t begin, int64_t n) {
  const int64_t row = kKvHeads * kHeadDim;
  return std::vector<float>(keys.begin() + begin * row, keys.begin() + (begin + n) * row);
}

// Keys moved away from the fit's: scaled by 2 and offset by 3 in every dim.
std::vector<float> drifted(std::vector<float> keys) {
  for (float& v : keys)
    v = 2.0f * v + 3.0f;
  return keys;
}

// Positions [kv_heads, k] of a search of the last `count` tokens.
std::vector<int32_t> search(index::LayerIndex& index, const std::vector<float>& queries,
                            int64_t k) {
  std::vector<int32_t> out(static_cast<size_t>(kKvHeads * k));
  SearchRequest request;
  request.queries = host_view(queries.data(), {kQHeads, kHeadDim});
  request.begin = 0;
  request.end = index.num_tokens();
  request.k = k;
  PQKV_EXPECT_OK(index.search(request, out.data(), Stream::host(), nullptr));
  return out;
}

TEST(DriftCpuTest, RatioStaysNearOneInDistributionAndRisesOnDriftedKeys) {
  const uint64_t seed = 11;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto keys = clustered_keys(3072, kKvHeads, kHeadDim, seed);
  for (const CodeCase& c : code_cases()) {
    SCOPED_TRACE(c.name);
    auto index = make_index(c.selection);
    PQKV_ASSERT_OK(index->train(keys_view(keys, 0, 2048), small_config(4, 6), Stream::host()));
    // The first add encodes the fit's context: not counted.
    PQKV_ASSERT_OK(index->add(keys_view(keys, 0, 2048), Stream::host()));
    DriftStats d = index->drift_stats();
    EXPECT_TRUE(d.tracking);
    EXPECT_EQ(d.fit_tokens, 2048);
    EXPECT_EQ(d.tokens_since_fit, 0);
    EXPECT_EQ(d.max_error_ratio, 0.0);
    // New keys from the same distribution.
    PQKV_ASSERT_OK(index->add(keys_view(keys, 2048, 1024), Stream::host()));
    d = index->drift_stats();
    EXPECT_EQ(d.tokens_since_fit, 1024);
    ASSERT_EQ(d.head_error_ratio.size(), size_t{kKvHeads});
    for (double r : d.head_error_ratio) {
      EXPECT_GT(r, 0.7);
      EXPECT_LT(r, c.in_distribution_max);
    }
    // Drifted keys: clipped (scalar codes) or far from every centroid (PQ).
    auto index2 = make_index(c.selection);
    PQKV_ASSERT_OK(index2->train(keys_view(keys, 0, 2048), small_config(4, 6), Stream::host()));
    PQKV_ASSERT_OK(index2->add(keys_view(keys, 0, 2048), Stream::host()));
    const auto moved = drifted(keys);
    PQKV_ASSERT_OK(index2->add(keys_view(moved, 2048, 1024), Stream::host()));
    d = index2->drift_stats();
    EXPECT_GT(d.mean_error_ratio, 5.0);
    EXPECT_GE(d.max_error_ratio, d.mean_error_ratio);
  }
}

TEST(DriftCpuTest, ExactKeysTrackNothing) {
  const auto keys = clustered_keys(256, kKvHeads, kHeadDim, 3);
  auto index = make_index(SelectionConfig::oracle());
  PQKV_ASSERT_OK(index->train(keys_view(keys, 0, 256), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(keys, 0, 256), Stream::host()));
  EXPECT_FALSE(index->drift_stats().tracking);
}

TEST(DriftCpuTest, RefitMatchesAFreshBuildAndResetsTheRatio) {
  const uint64_t seed = 21;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto base = clustered_keys(1536, kKvHeads, kHeadDim, seed);
  // Tokens [0, 1024) as trained, [1024, 1536) drifted.
  std::vector<float> keys = base;
  const auto moved = drifted(base);
  std::copy(moved.begin() + 1024 * kKvHeads * kHeadDim, moved.end(),
            keys.begin() + 1024 * kKvHeads * kHeadDim);
  SelectionConfig int8;
  int8.code = KeyCode::kInt8;
  auto index = make_index(int8);
  PQKV_ASSERT_OK(index->train(keys_view(keys, 0, 1024), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(keys, 0, 1024), Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(keys, 1024, 512), Stream::host()));
  EXPECT_GT(index->drift_stats().max_error_ratio, 5.0);

  // No runner: built and swapped in within the call.
  PQKV_ASSERT_OK(index->refit(slice(keys, 0, 1536), 16, PqConfig{}, nullptr));
  DriftStats d = index->drift_stats();
  EXPECT_EQ(d.refits, 1);
  EXPECT_FALSE(d.refit_running);
  EXPECT_EQ(d.fit_tokens, 1520);
  EXPECT_EQ(d.tokens_since_fit, 0);
  EXPECT_GE(d.last_refit_ms, 0.0);
  EXPECT_TRUE(d.last_refit_error.empty());

  // The same as an index trained on tokens [16, 1536) holding every token.
  auto fresh = make_index(int8);
  PQKV_ASSERT_OK(fresh->train(keys_view(keys, 16, 1520), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(fresh->add(keys_view(keys, 0, 1536), Stream::host()));
  const auto queries = random_floats(kQHeads * kHeadDim, seed + 5);
  EXPECT_EQ(search(*index, queries, 40), search(*fresh, queries, 40));
  auto a = index->snapshot();
  auto b = fresh->snapshot();
  PQKV_ASSERT_OK(a);
  PQKV_ASSERT_OK(b);
  EXPECT_EQ(a->stages[0].codes, b->stages[0].codes);
  EXPECT_EQ(a->stages[0].codec_state, b->stages[0].codec_state);

  // Keys like the refit's own now quantize as well as its fit's.
  PQKV_ASSERT_OK(index->add(keys_view(keys, 1024, 256), Stream::host()));
  d = index->drift_stats();
  EXPECT_EQ(d.tokens_since_fit, 256);
  EXPECT_LT(d.max_error_ratio, 1.5);
}

TEST(DriftCpuTest, SearchesDuringARefitSeeTheOldOrTheNewState) {
  const uint64_t seed = 31;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto base = clustered_keys(2048, kKvHeads, kHeadDim, seed);
  const auto keys = drifted(base);  // drifted relative to the fit on `base`
  SelectionConfig int8;
  int8.code = KeyCode::kInt8;
  auto index = make_index(int8);
  PQKV_ASSERT_OK(index->train(keys_view(base, 0, 1024), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(base, 0, 1024), Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(keys, 1024, 256), Stream::host()));

  std::function<void()> job;
  std::vector<float> all(base.begin(), base.begin() + 1024 * kKvHeads * kHeadDim);
  all.insert(all.end(), keys.begin() + 1024 * kKvHeads * kHeadDim,
             keys.begin() + 1280 * kKvHeads * kHeadDim);
  PQKV_ASSERT_OK(index->refit(slice(all, 0, 1280), 0, PqConfig{},
                              [&](std::function<void()> j) { job = std::move(j); }));
  ASSERT_TRUE(job);
  EXPECT_TRUE(index->drift_stats().refit_running);
  EXPECT_EQ(index->refit(slice(all, 0, 1280), 0, PqConfig{}, nullptr).code(),
            StatusCode::kFailedPrecondition);

  // The refit is built on another thread while this one adds and searches.
  std::thread worker(job);
  const auto queries = random_floats(kQHeads * kHeadDim, seed + 7);
  const int64_t k = 32;
  for (int64_t t = 1280; t < 1536; t += 8) {
    PQKV_ASSERT_OK(index->add(keys_view(keys, t, 8), Stream::host()));
    const auto got = search(*index, queries, k);
    for (int h = 0; h < kKvHeads; ++h) {
      std::set<int32_t> seen(got.begin() + h * k, got.begin() + (h + 1) * k);
      EXPECT_EQ(seen.size(), size_t{k}) << "duplicate positions at token " << t;
      EXPECT_GE(*seen.begin(), 0);
      EXPECT_LT(*seen.rbegin(), index->num_tokens());
    }
  }
  worker.join();
  // The next search swaps the refit in, with the keys added meanwhile.
  const auto after = search(*index, queries, k);
  DriftStats d = index->drift_stats();
  EXPECT_EQ(d.refits, 1);
  EXPECT_FALSE(d.refit_running);
  EXPECT_EQ(d.fit_tokens, 1280);
  EXPECT_EQ(d.tokens_since_fit, 256);
  EXPECT_EQ(index->num_tokens(), 1536);

  std::vector<float> every = all;
  every.insert(every.end(), keys.begin() + 1280 * kKvHeads * kHeadDim,
               keys.begin() + 1536 * kKvHeads * kHeadDim);
  auto fresh = make_index(int8);
  PQKV_ASSERT_OK(fresh->train(keys_view(every, 0, 1280), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(fresh->add(keys_view(every, 0, 1536), Stream::host()));
  EXPECT_EQ(after, search(*fresh, queries, k));
}

TEST(DriftCpuTest, RefitChecksItsArguments) {
  const auto keys = clustered_keys(128, kKvHeads, kHeadDim, 5);
  SelectionConfig int8;
  int8.code = KeyCode::kInt8;
  auto untrained = make_index(int8);
  EXPECT_EQ(untrained->refit(slice(keys, 0, 128), 0, PqConfig{}, nullptr).code(),
            StatusCode::kFailedPrecondition);
  auto index = make_index(int8);
  PQKV_ASSERT_OK(index->train(keys_view(keys, 0, 128), PqConfig{}, Stream::host()));
  PQKV_ASSERT_OK(index->add(keys_view(keys, 0, 128), Stream::host()));
  const Status short_keys = index->refit(slice(keys, 0, 100), 0, PqConfig{}, nullptr);
  EXPECT_EQ(short_keys.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(short_keys.message().find("[0, 128)"), std::string::npos) << short_keys.to_string();
  EXPECT_EQ(index->refit(slice(keys, 0, 128), 128, PqConfig{}, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(index->refit(slice(keys, 0, 128), -1, PqConfig{}, nullptr).code(),
            StatusCode::kInvalidArgument);
  // Keys with a NaN: the refit fails on its own thread; the old state stays.
  auto bad = slice(keys, 0, 128);
  bad[5 * kKvHeads * kHeadDim + 3] = std::numeric_limits<float>::quiet_NaN();
  PQKV_ASSERT_OK(index->refit(std::move(bad), 0, PqConfig{}, nullptr));
  DriftStats d = index->drift_stats();
  EXPECT_EQ(d.refits, 0);
  EXPECT_FALSE(d.refit_running);
  EXPECT_NE(d.last_refit_error.find("NaN or Inf at token 5"), std::string::npos)
      << d.last_refit_error;
  PQKV_ASSERT_OK(index->refit(slice(keys, 0, 128), 0, PqConfig{}, nullptr));
  d = index->drift_stats();
  EXPECT_EQ(d.refits, 1);
  EXPECT_TRUE(d.last_refit_error.empty());
  // A restored index has no fit keys to compare with.
  auto snap = index->snapshot();
  PQKV_ASSERT_OK(snap);
  auto restored = make_index(int8);
  PQKV_ASSERT_OK(restored->restore(*snap, Stream::host()));
  EXPECT_FALSE(restored->drift_stats().tracking);
  PQKV_ASSERT_OK(restored->refit(slice(keys, 0, 128), 0, PqConfig{}, nullptr));
  EXPECT_TRUE(restored->drift_stats().tracking);
}

}  // namespace
}  // namespace pqkv::testing
