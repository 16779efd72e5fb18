// Calibration of the defaults on llama-3.1-8b geometry at 32K tokens: how
// concentrated exact attention is, and where needles rank for their queries.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "pqkv/model_spec.h"
#include "workload/quality_metrics.h"
#include "workload/synthetic_workload.h"

namespace pqkv::workload {
namespace {

// Share of softmax mass held by the top `fraction` of tokens.
double top_share(std::vector<double> p, double fraction) {
  const auto k = static_cast<size_t>(fraction * static_cast<double>(p.size()));
  std::nth_element(p.begin(), p.begin() + static_cast<int64_t>(k), p.end(), std::greater<>());
  double s = 0;
  for (size_t i = 0; i < k; ++i) s += p[i];
  return s;
}

TEST(CalibrationTest, Llama8bAt32kIsConcentratedAndNeedlesLead) {
  const ModelSpec spec = ModelSpec::llama31_8b();
  WorkloadOptions options;
  auto w = SyntheticWorkload::create(spec, options);
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  const int64_t prompt = options.prompt_tokens;
  const int64_t total = prompt + options.num_needles * options.needle_query_interval;
  const int64_t row = static_cast<int64_t>(spec.num_kv_heads) * spec.head_dim;
  std::vector<float> keys(static_cast<size_t>(total * row));
  std::vector<float> values(keys.size());
  std::vector<float> q(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
  const int layer = 0;
  ASSERT_TRUE(w->keys(layer, 0, total, keys.data()).ok());
  ASSERT_TRUE(w->values(layer, 0, total, values.data()).ok());

  // Ordinary decode steps: top-5% share, sink share, recent-window share.
  double top5 = 0, top1 = 0, sinks = 0, recent = 0;
  int samples = 0;
  for (int64_t p = prompt + 1; p < prompt + 4; ++p) {
    if (w->needle_for_query(p)) continue;
    ASSERT_TRUE(w->query(layer, p, q.data()).ok());
    const StepTensors step{q.data(), keys.data(), values.data(), p + 1};
    for (int h = 0; h < spec.num_q_heads; ++h) {
      auto logits = exact_logits(spec, step, h);
      ASSERT_TRUE(logits.ok());
      const auto probs = softmax(*logits);
      top5 += top_share(probs, 0.05);
      top1 += top_share(probs, 0.01);
      for (int t = 0; t < options.sink_tokens; ++t) sinks += probs[static_cast<size_t>(t)];
      for (int64_t t = p + 1 - 64; t <= p; ++t) recent += probs[static_cast<size_t>(t)];
      ++samples;
    }
  }
  top5 /= samples;
  top1 /= samples;
  sinks /= samples;
  recent /= samples;
  std::printf("[calibration] top5%%=%.3f top1%%=%.3f sinks=%.3f last64=%.3f\n", top5, top1, sinks,
              recent);
  EXPECT_GT(top5, 0.70);
  EXPECT_LT(top5, 0.95);

  // Needle steps: rank of the needle among all tokens for the needle heads.
  int worst_rank = 0;
  double needle_mass = 0;
  int needle_samples = 0;
  for (const Needle& n : w->needles()) {
    ASSERT_TRUE(w->query(layer, n.target_position, q.data()).ok());
    const StepTensors step{q.data(), keys.data(), values.data(), n.target_position + 1};
    for (int h = 0; h < spec.num_q_heads; ++h) {
      if (!w->is_needle_head(h)) continue;
      auto logits = exact_logits(spec, step, h);
      ASSERT_TRUE(logits.ok());
      const double own = (*logits)[static_cast<size_t>(n.position)];
      int rank = 0;
      for (int64_t t = options.sink_tokens; t < step.num_tokens; ++t) {
        rank += (*logits)[static_cast<size_t>(t)] > own;
      }
      worst_rank = std::max(worst_rank, rank);
      std::printf("needle %ld h%d rank %d logit %.2f max %.2f topic %d qtopic %d\n", n.position, h, rank, own, *std::max_element(logits->begin()+4, logits->end()), w->token_topic(n.position), w->query_topic(layer, n.target_position));
      needle_mass += softmax(*logits)[static_cast<size_t>(n.position)];
      ++needle_samples;
    }
  }
  std::printf("[calibration] needle worst rank (non-sink)=%d mean needle mass=%.3f\n", worst_rank,
              needle_mass / needle_samples);
  EXPECT_LE(worst_rank, 2);
}

}  // namespace
}  // namespace pqkv::workload
