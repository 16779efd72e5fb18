// A generation whose keys drift (WorkloadOptions::drift_*): the drift itself,
// and refits (SequenceOptions::refit_threshold) that bring recall against
// exact top-K back.
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "engine/inspector.h"
#include "pqkv/store.h"
#include "test_util.h"
#include "workload/quality_metrics.h"
#include "workload/synthetic_workload.h"

namespace pqkv::workload {
namespace {

constexpr int64_t kPrompt = 2048;
constexpr int64_t kGenerated = 2048;

WorkloadOptions drifting(uint64_t seed) {
  WorkloadOptions o;
  o.seed = seed;
  o.prompt_tokens = kPrompt;
  o.num_needles = 2;
  o.drift_start = kPrompt;
  o.drift_tokens = kGenerated;
  o.drift_scale = 2.0f;
  o.drift_offset = 3.0f;
  o.drift_outlier_growth = 2.0f;
  return o;
}

TEST(DriftWorkloadTest, KeysMoveFromDriftStartOnly) {
  const ModelSpec spec = ModelSpec::tiny();
  WorkloadOptions still = drifting(5);
  still.drift_start = -1;
  auto a = SyntheticWorkload::create(spec, still);
  auto b = SyntheticWorkload::create(spec, drifting(5));
  PQKV_ASSERT_OK(a);
  PQKV_ASSERT_OK(b);
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  std::vector<float> ka(static_cast<size_t>((kPrompt + kGenerated) * row));
  std::vector<float> kb(ka.size());
  PQKV_ASSERT_OK(a->keys(0, 0, kPrompt + kGenerated, ka.data()));
  PQKV_ASSERT_OK(b->keys(0, 0, kPrompt + kGenerated, kb.data()));
  // The prompt is untouched; the last tokens are far away.
  EXPECT_TRUE(std::equal(ka.begin(), ka.begin() + kPrompt * row, kb.begin()));
  double moved = 0;
  for (int64_t i = (kPrompt + kGenerated - 64) * row; i < (kPrompt + kGenerated) * row; ++i)
    moved += std::abs(ka[i] - kb[i]);
  EXPECT_GT(moved / (64.0 * row), 1.0);
  WorkloadOptions bad = drifting(5);
  bad.drift_tokens = 0;
  EXPECT_EQ(SyntheticWorkload::create(spec, bad).status().code(), StatusCode::kInvalidArgument);
}

struct Recall {
  double mean = 0;
  double min = 1;
};

// Attention-mass recall over the second half of the generation (every 8th
// step), with refits waited for at each step so that the run does not hang
// on timing.
Recall second_half_recall(const SyntheticWorkload& wl, const std::vector<std::vector<float>>& keys,
                          const std::vector<std::vector<float>>& values, double threshold,
                          int* refits) {
  const ModelSpec& spec = wl.spec();
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  StoreOptions so;
  so.spec = spec;
  auto store = Store::open(so);
  PQKV_EXPECT_OK(store);
  SequenceOptions o;  // int4 keys, the default
  o.budget = BudgetPolicy::ratio_of_context(0.1);
  o.refit_threshold = threshold;
  o.refit_min_tokens = 256;
  auto made = (*store)->create_sequence("s", o);
  PQKV_EXPECT_OK(made);
  Sequence& seq = **made;
  const auto view = [&](const std::vector<float>& v, int64_t begin, int64_t n) {
    return host_view(v.data() + begin * row, {n, spec.num_kv_heads, spec.head_dim});
  };
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_EXPECT_OK(
        seq.append(l, view(keys[l], 0, kPrompt), view(values[l], 0, kPrompt), Stream::host()));
  PQKV_EXPECT_OK(seq.finish_prefill());
  Recall recall;
  int samples = 0;
  std::vector<float> q(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
  std::vector<float> out(q.size());
  for (int64_t pos = kPrompt; pos < kPrompt + kGenerated; ++pos) {
    for (int l = 0; l < spec.num_layers; ++l)
      PQKV_EXPECT_OK(seq.append(l, view(keys[l], pos, 1), view(values[l], pos, 1), Stream::host()));
    engine::Inspector::wait_refits(seq);
    if (pos < kPrompt + kGenerated / 2 || pos % 8 != 0) continue;
    for (int l = 0; l < spec.num_layers; ++l) {
      PQKV_EXPECT_OK(wl.query(l, pos, q.data()));
      AttendTrace trace;
      PQKV_EXPECT_OK(seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                Stream::host(), &trace));
      const StepTensors step{q.data(), keys[l].data(), values[l].data(), pos + 1};
      auto quality = evaluate_step(spec, step, trace.attended, trace.budget, o.aggregation);
      PQKV_EXPECT_OK(quality);
      recall.mean += quality->mass_recall;
      recall.min = std::min(recall.min, quality->mass_recall);
      ++samples;
    }
  }
  *refits = 0;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto d = seq.drift_stats(l);
    PQKV_EXPECT_OK(d);
    *refits += d->refits;
  }
  recall.mean /= samples;
  return recall;
}

TEST(DriftWorkloadTest, RefitsRestoreRecallOnADriftingGeneration) {
  const uint64_t seed = 17;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const ModelSpec spec = ModelSpec::tiny();
  auto wl = SyntheticWorkload::create(spec, drifting(seed));
  PQKV_ASSERT_OK(wl);
  const int64_t total = kPrompt + kGenerated;
  std::vector<std::vector<float>> keys(spec.num_layers), values(spec.num_layers);
  for (int l = 0; l < spec.num_layers; ++l) {
    keys[l].resize(static_cast<size_t>(total) * spec.num_kv_heads * spec.head_dim);
    values[l].resize(keys[l].size());
    PQKV_ASSERT_OK(wl->keys(l, 0, total, keys[l].data()));
    PQKV_ASSERT_OK(wl->values(l, 0, total, values[l].data()));
  }
  int refits_off = 0;
  int refits_on = 0;
  const Recall off = second_half_recall(*wl, keys, values, 0.0, &refits_off);
  const Recall on = second_half_recall(*wl, keys, values, 2.0, &refits_on);
  EXPECT_EQ(refits_off, 0);
  EXPECT_GT(refits_on, 0);
  const std::string got = "recall without refits: mean " + std::to_string(off.mean) + ", min " +
                          std::to_string(off.min) + "; with " + std::to_string(refits_on) +
                          " refits: mean " + std::to_string(on.mean) + ", min " +
                          std::to_string(on.min);
  EXPECT_GT(on.mean, off.mean + 0.002) << got;
  EXPECT_GT(on.min, off.min + 0.1) << got;
  std::cout << got << "\n";
}

}  // namespace
}  // namespace pqkv::workload
