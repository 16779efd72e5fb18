#include "workload/synthetic_workload.h"

#include <faiss/VectorTransform.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pqkv/model_spec.h"
#include "test_util.h"
#include "workload/quality_metrics.h"

namespace pqkv::workload {
namespace {

WorkloadOptions small_options() {
  WorkloadOptions o;
  o.prompt_tokens = 4096;
  o.num_needles = 4;
  return o;
}

std::vector<float> keys_of(const SyntheticWorkload& w, int layer, int64_t begin, int64_t end) {
  const ModelSpec& s = w.spec();
  std::vector<float> out(static_cast<size_t>((end - begin) * s.num_kv_heads * s.head_dim));
  PQKV_EXPECT_OK(w.keys(layer, begin, end, out.data()));
  return out;
}

std::vector<float> values_of(const SyntheticWorkload& w, int layer, int64_t begin, int64_t end) {
  const ModelSpec& s = w.spec();
  std::vector<float> out(static_cast<size_t>((end - begin) * s.num_kv_heads * s.head_dim));
  PQKV_EXPECT_OK(w.values(layer, begin, end, out.data()));
  return out;
}

std::vector<float> query_of(const SyntheticWorkload& w, int layer, int64_t position) {
  std::vector<float> out(static_cast<size_t>(w.spec().num_q_heads * w.spec().head_dim));
  PQKV_EXPECT_OK(w.query(layer, position, out.data()));
  return out;
}

double dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i)
    s += static_cast<double>(a[i]) * b[i];
  return s;
}

TEST(SyntheticWorkloadTest, DeterministicAndRangesConcatenate) {
  auto w = SyntheticWorkload::create(ModelSpec::tiny(), small_options());
  PQKV_ASSERT_OK(w);
  const auto whole = keys_of(*w, 1, 0, 700);
  EXPECT_EQ(whole, keys_of(*w, 1, 0, 700));
  auto parts = keys_of(*w, 1, 0, 257);
  const auto tail = keys_of(*w, 1, 257, 700);
  parts.insert(parts.end(), tail.begin(), tail.end());
  EXPECT_EQ(whole, parts);

  const auto values = values_of(*w, 1, 0, 700);
  auto value_parts = values_of(*w, 1, 0, 3);
  const auto value_tail = values_of(*w, 1, 3, 700);
  value_parts.insert(value_parts.end(), value_tail.begin(), value_tail.end());
  EXPECT_EQ(values, value_parts);
  EXPECT_EQ(query_of(*w, 1, 4100), query_of(*w, 1, 4100));

  // A second generator from the same seed agrees; another seed or layer does not.
  auto same = SyntheticWorkload::create(ModelSpec::tiny(), small_options());
  PQKV_ASSERT_OK(same);
  EXPECT_EQ(whole, keys_of(*same, 1, 0, 700));
  WorkloadOptions other = small_options();
  other.seed = 2;
  auto different = SyntheticWorkload::create(ModelSpec::tiny(), other);
  PQKV_ASSERT_OK(different);
  EXPECT_NE(whole, keys_of(*different, 1, 0, 700));
  EXPECT_NE(whole, keys_of(*w, 0, 0, 700));
  // Far positions work without generating what lies before them.
  EXPECT_EQ(keys_of(*w, 0, 2'000'000, 2'000'003), keys_of(*w, 0, 2'000'000, 2'000'003));
}

TEST(SyntheticWorkloadTest, RopePreservesNormAndDependsOnRelativeDistance) {
  const RotaryEmbedding rope(128, RopeOptions{});
  for (int i = 1; i < 64; ++i)
    EXPECT_LT(rope.frequency(i), rope.frequency(i - 1));
  EXPECT_DOUBLE_EQ(rope.frequency(0), 1.0);
  // The lowest frequencies are divided by the Llama 3.1 scaling factor.
  EXPECT_NEAR(rope.frequency(63), std::pow(500000.0, -126.0 / 128) / 8, 1e-12);

  const auto a = testing::random_floats(128, 7);
  const auto b = testing::random_floats(128, 8);
  const auto dot_at = [&](int64_t pa, int64_t pb) {
    auto ra = a;
    auto rb = b;
    rope.rotate(pa, ra.data(), 1);
    rope.rotate(pb, rb.data(), 1);
    EXPECT_NEAR(dot(ra.data(), ra.data(), 128), dot(a.data(), a.data(), 128), 1e-3);
    return dot(ra.data(), rb.data(), 128);
  };
  const double base = dot_at(900, 100);
  EXPECT_NEAR(dot_at(1'800, 1'000), base, 1e-3);
  EXPECT_NEAR(dot_at(1'000'800, 1'000'000), base, 1e-3);
  EXPECT_GT(std::abs(dot_at(901, 100) - base), 1e-2);  // distance, not position, matters
}

TEST(SyntheticWorkloadTest, KeysAndQueriesAreRotatedAtTheirPositions) {
  WorkloadOptions plain = small_options();
  plain.apply_rope = false;
  auto rotated = SyntheticWorkload::create(ModelSpec::tiny(), small_options());
  auto unrotated = SyntheticWorkload::create(ModelSpec::tiny(), plain);
  PQKV_ASSERT_OK(rotated);
  PQKV_ASSERT_OK(unrotated);
  const ModelSpec spec = ModelSpec::tiny();
  const RotaryEmbedding rope(spec.head_dim, RopeOptions{});
  const int64_t begin = 5000;
  const auto expected = keys_of(*rotated, 0, begin, begin + 40);
  auto keys = keys_of(*unrotated, 0, begin, begin + 40);
  const int64_t row = static_cast<int64_t>(spec.num_kv_heads) * spec.head_dim;
  for (int64_t t = 0; t < 40; ++t)
    rope.rotate(begin + t, keys.data() + t * row, spec.num_kv_heads);
  EXPECT_LT(testing::relative_error(keys, expected), 1e-6);
  auto q = query_of(*unrotated, 0, 4104);
  rope.rotate(4104, q.data(), spec.num_q_heads);
  EXPECT_LT(testing::relative_error(q, query_of(*rotated, 0, 4104)), 1e-6);
}

TEST(SyntheticWorkloadTest, OutlierChannelsStandOut) {
  const ModelSpec spec = ModelSpec::llama31_8b();
  auto w = SyntheticWorkload::create(spec, small_options());
  PQKV_ASSERT_OK(w);
  const int64_t n = 2048;
  const auto keys = keys_of(*w, 3, 0, n);
  for (int g = 0; g < spec.num_kv_heads; ++g) {
    std::vector<double> mean_abs(static_cast<size_t>(spec.head_dim), 0.0);
    for (int64_t t = 0; t < n; ++t) {
      for (int i = 0; i < spec.head_dim; ++i) {
        mean_abs[static_cast<size_t>(i)] +=
            std::abs(keys[static_cast<size_t>((t * spec.num_kv_heads + g) * spec.head_dim + i)]) /
            n;
      }
    }
    std::sort(mean_abs.begin(), mean_abs.end(), std::greater<>());
    const double median = mean_abs[mean_abs.size() / 2];
    const int channels = w->options().outlier_channels;
    EXPECT_GT(mean_abs[static_cast<size_t>(channels - 1)], 5 * median) << "KV head " << g;
    EXPECT_LT(mean_abs[static_cast<size_t>(channels)], 3 * median) << "KV head " << g;
  }
}

TEST(SyntheticWorkloadTest, SinksAndRecencyDrawAttention) {
  const ModelSpec spec = ModelSpec::llama31_8b();
  auto w = SyntheticWorkload::create(spec, small_options());
  PQKV_ASSERT_OK(w);
  const int64_t p = w->options().prompt_tokens + 1;
  ASSERT_FALSE(w->needle_for_query(p).has_value());
  const auto keys = keys_of(*w, 0, 0, p + 1);
  const auto values = values_of(*w, 0, 0, p + 1);
  const auto q = query_of(*w, 0, p);
  const StepTensors step{q.data(), keys.data(), values.data(), p + 1};
  const int sinks = w->options().sink_tokens;
  double sink_mass = 0, recent_mass = 0, middle_mass = 0;
  for (int h = 0; h < spec.num_q_heads; ++h) {
    auto logits = exact_logits(spec, step, h);
    PQKV_ASSERT_OK(logits);
    const auto probs = softmax(*logits);
    for (int64_t t = 0; t <= p; ++t) {
      const double x = probs[static_cast<size_t>(t)];
      if (t < sinks) {
        sink_mass += x;
      } else if (t > p - 8) {
        recent_mass += x;
      } else {
        middle_mass += x;
      }
    }
  }
  const double middle_tokens = static_cast<double>(p + 1 - sinks - 8);
  // Per token, a sink draws hundreds of times the attention of a middle token,
  // and one of the last 8 tokens tens of times.
  EXPECT_GT(sink_mass / sinks, 300 * middle_mass / middle_tokens);
  EXPECT_GT(recent_mass / 8, 20 * middle_mass / middle_tokens);
}

TEST(SyntheticWorkloadTest, NeedlesAreFoundByExactTopK) {
  const ModelSpec spec = ModelSpec::llama31_8b();
  auto w = SyntheticWorkload::create(spec, small_options());
  PQKV_ASSERT_OK(w);
  ASSERT_EQ(w->needles().size(), 4u);
  const Needle last = w->needles().back();
  const auto keys = keys_of(*w, 0, 0, last.target_position + 1);
  const auto values = values_of(*w, 0, 0, last.target_position + 1);
  for (const Needle& needle : w->needles()) {
    ASSERT_EQ(w->needle_for_query(needle.target_position)->position, needle.position);
    EXPECT_LT(needle.position, w->options().prompt_tokens);
    const auto q = query_of(*w, 0, needle.target_position);
    const StepTensors step{q.data(), keys.data(), values.data(), needle.target_position + 1};
    // 1% of the context beside 4 sinks and a 64-token window.
    const BudgetPolicy::Counts counts{4, 64, step.num_tokens / 100};
    for (GqaAggregation a : {GqaAggregation::kSoftmaxSum, GqaAggregation::kMax}) {
      for (int g = 0; g < spec.num_kv_heads; ++g) {
        auto oracle = oracle_positions(spec, step, g, counts, a);
        PQKV_ASSERT_OK(oracle);
        EXPECT_TRUE(std::binary_search(oracle->begin(), oracle->end(), needle.position))
            << "needle at " << needle.position << ", KV head " << g << ", "
            << gqa_aggregation_name(a);
      }
    }
  }
}

TEST(SyntheticWorkloadTest, UnstructuredKeysAreLowRank) {
  // The unstructured part alone, before rotation.
  WorkloadOptions o = small_options();
  o.apply_rope = false;
  o.outlier_channels = 0;
  o.sink_tokens = 0;
  o.recency_logit = 0;
  o.topic_logit = 0;
  o.num_needles = 0;
  const ModelSpec spec = ModelSpec::llama31_8b();
  auto w = SyntheticWorkload::create(spec, o);
  PQKV_ASSERT_OK(w);
  const int64_t n = 4096;
  const int d = spec.head_dim;
  const auto keys = keys_of(*w, 2, 0, n);
  std::vector<float> head(static_cast<size_t>(n * d));
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(keys.data() + t * spec.num_kv_heads * d + 5 * d, d, head.data() + t * d);
  }
  faiss::PCAMatrix pca(d, d);
  pca.train(n, head.data());
  double total = 0, top_rank = 0, top_eighth = 0;
  const auto rank = static_cast<size_t>(o.key_rank_fraction * d);
  for (size_t i = 0; i < pca.eigenvalues.size(); ++i) {
    total += pca.eigenvalues[i];
    top_rank += i < rank ? pca.eigenvalues[i] : 0;
    top_eighth += i < static_cast<size_t>(d / 8) ? pca.eigenvalues[i] : 0;
  }
  // 1 - key_residual^2 of the variance in the subspace, most of it in its first half.
  EXPECT_GT(top_rank / total, 0.93);
  EXPECT_GT(top_eighth / total, 0.7);
  // Per-channel variance spans more than an order of magnitude; the total is d * std^2.
  std::vector<double> var(static_cast<size_t>(d), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < d; ++i)
      var[static_cast<size_t>(i)] += static_cast<double>(head[t * d + i]) * head[t * d + i] / n;
  }
  const auto [lo, hi] = std::minmax_element(var.begin(), var.end());
  EXPECT_GT(*hi / *lo, 10.0);
  double sum = 0;
  for (double v : var)
    sum += v;
  EXPECT_NEAR(sum / d, o.key_noise_std * o.key_noise_std, 0.1);
}

TEST(SyntheticWorkloadTest, NeedlesBelongToARareClass) {
  const ModelSpec spec = ModelSpec::llama31_8b();
  auto w = SyntheticWorkload::create(spec, small_options());
  PQKV_ASSERT_OK(w);
  const WorkloadOptions& o = w->options();
  int64_t members = 0;
  const int64_t n = 40000;
  for (int64_t t = 0; t < n; ++t)
    members += w->is_class_token(t);
  EXPECT_NEAR(static_cast<double>(members) / n, o.needle_class_fraction,
              0.25 * o.needle_class_fraction);
  for (const Needle& needle : w->needles())
    EXPECT_TRUE(w->is_class_token(needle.position));

  // A needle head gives class tokens about needle_class_logit over the
  // others, and its needle needle_logit more.
  const Needle needle = w->needles()[1];
  const auto keys = keys_of(*w, 0, 0, needle.target_position + 1);
  const auto values = values_of(*w, 0, 0, needle.target_position + 1);
  const auto q = query_of(*w, 0, needle.target_position);
  const StepTensors step{q.data(), keys.data(), values.data(), needle.target_position + 1};
  for (int h = 0; h < spec.num_q_heads; ++h) {
    if (!w->is_needle_head(h)) continue;
    auto logits = exact_logits(spec, step, h);
    PQKV_ASSERT_OK(logits);
    double class_sum = 0, other_sum = 0, class_max = -1e30;
    int64_t class_count = 0, other_count = 0;
    for (int64_t t = o.sink_tokens; t < o.prompt_tokens; ++t) {
      const double x = (*logits)[static_cast<size_t>(t)];
      if (t == needle.position) continue;
      if (w->is_class_token(t)) {
        class_sum += x;
        class_max = std::max(class_max, x);
        ++class_count;
      } else {
        other_sum += x;
        ++other_count;
      }
    }
    const double lift = class_sum / class_count - other_sum / other_count;
    EXPECT_NEAR(lift, o.needle_class_logit, 2.0) << "query head " << h;
    EXPECT_GT((*logits)[static_cast<size_t>(needle.position)], class_max) << "query head " << h;
  }
}

TEST(SyntheticWorkloadTest, BadInputReturnsStatus) {
  ModelSpec bad = ModelSpec::tiny();
  bad.num_kv_heads = 3;
  EXPECT_EQ(SyntheticWorkload::create(bad, {}).status().code(), StatusCode::kInvalidArgument);
  WorkloadOptions o;
  o.num_topics = 0;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());
  o = {};
  o.recency_pair_fraction = 0.8;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());
  o = {};
  o.prompt_tokens = 8;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());
  o = {};
  o.key_residual = 1.0f;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());
  o = {};
  o.needle_class_fraction = 1.5;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());
  o = {};
  o.rope.theta = 0;
  EXPECT_FALSE(SyntheticWorkload::create(ModelSpec::tiny(), o).ok());

  auto w = SyntheticWorkload::create(ModelSpec::tiny(), small_options());
  PQKV_ASSERT_OK(w);
  std::vector<float> out(4096);
  EXPECT_EQ(w->keys(0, 10, 5, out.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(w->values(0, -1, 5, out.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(w->keys(2, 0, 5, out.data()).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(w->query(-1, 0, out.data()).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(w->keys(0, 0, 5, nullptr).code(), StatusCode::kInvalidArgument);
  PQKV_EXPECT_OK(w->keys(0, 5, 5, nullptr));  // an empty range writes nothing
}

}  // namespace
}  // namespace pqkv::workload
