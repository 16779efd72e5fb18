// Helpers shared by the index suites: keys, trained indexes, and a
// brute-force search reference computed in double from decoded codes.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "index/cpu/layer_index_cpu.h"
#include "index/layer_index.h"
#include "test_util.h"

namespace pqkv::testing {

// Keys [n, kv_heads, head_dim] drawn around a few shared directions, so that
// k-means has structure to find and scores are not all alike.
inline std::vector<float> clustered_keys(int64_t n, int kv_heads, int head_dim, uint64_t seed) {
  const int kCenters = 8;
  const auto centers =
      random_floats(static_cast<size_t>(kCenters) * kv_heads * head_dim, seed, 2.0f);
  auto keys = random_floats(static_cast<size_t>(n) * kv_heads * head_dim, seed + 1);
  std::mt19937_64 rng(seed + 2);
  for (int64_t t = 0; t < n; ++t) {
    const int c = int(rng() % kCenters);
    for (int h = 0; h < kv_heads; ++h) {
      for (int d = 0; d < head_dim; ++d) {
        keys[(t * kv_heads + h) * head_dim + d] += centers[(c * kv_heads + h) * head_dim + d];
      }
    }
  }
  return keys;
}

inline PqConfig small_config(int m, int bits, int iters = 4) {
  PqConfig config;
  config.m = m;
  config.bits = bits;
  config.kmeans_iters = iters;
  config.max_train_points_per_centroid = 0;
  config.seed = 7;
  return config;
}

// An index trained on `keys` and holding them as tokens 0..n-1.
inline std::unique_ptr<index::LayerIndex> trained_index(const std::vector<float>& keys, int64_t n,
                                                        int kv_heads, int head_dim,
                                                        const PqConfig& config) {
  auto made = index::make_layer_index(Device::cpu(), index::PqShape::from_config(head_dim, config),
                                      kv_heads);
  PQKV_EXPECT_OK(made);
  auto idx = std::move(made).value();
  const auto view = host_view(keys.data(), {n, kv_heads, head_dim});
  const Status trained = idx->train(view, config, Stream::host());
  PQKV_EXPECT_OK(trained);
  const Status added = idx->add(view, Stream::host());
  PQKV_EXPECT_OK(added);
  return idx;
}

// All codes of one KV head: [num_tokens][m].
inline std::vector<uint8_t> all_codes(const index::LayerIndex& idx, int kv_head) {
  std::vector<uint8_t> codes(static_cast<size_t>(idx.num_tokens()) * idx.shape().m);
  const Status s = idx.copy_codes(kv_head, 0, idx.num_tokens(), codes.data());
  PQKV_EXPECT_OK(s);
  return codes;
}

// Aggregated scores [kv_heads][end - begin] computed in double: every token
// decoded from its codes, dotted with each query head, softmax, aggregated.
inline std::vector<double> brute_force_scores(const index::LayerIndex& idx,
                                              const index::LayerCodebook& codebook,
                                              const std::vector<float>& queries, int q_heads,
                                              int64_t begin, int64_t end, GqaAggregation agg) {
  const auto& shape = codebook.shape;
  const int kv_heads = codebook.num_kv_heads;
  const int group = q_heads / kv_heads;
  const int64_t count = end - begin;
  std::vector<double> out(static_cast<size_t>(kv_heads) * count, 0.0);
  for (int kv = 0; kv < kv_heads; ++kv) {
    const auto codes = all_codes(idx, kv);
    for (int g = 0; g < group; ++g) {
      const float* q = queries.data() + size_t(kv * group + g) * shape.head_dim;
      std::vector<double> s(static_cast<size_t>(count));
      for (int64_t t = begin; t < end; ++t) {
        double dot = 0;
        for (int j = 0; j < shape.m; ++j) {
          const float* c = codebook.sub(kv, j) + size_t(codes[t * shape.m + j]) * shape.dsub();
          for (int d = 0; d < shape.dsub(); ++d)
            dot += double(q[j * shape.dsub() + d]) * c[d];
        }
        s[t - begin] = dot / std::sqrt(double(shape.head_dim));
      }
      if (count == 0) continue;
      const double max = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (auto& v : s)
        z += (v = std::exp(v - max));
      for (int64_t i = 0; i < count; ++i) {
        double& o = out[static_cast<size_t>(kv) * count + i];
        const double p = s[i] / z;
        o = (agg == GqaAggregation::kMax) ? std::max(o, p) : o + p;
      }
    }
  }
  return out;
}

// Expects `picked` (kept positions) to be the top-kept of `scores` (positions
// begin + i) up to `tolerance`: the reference's own top set, except where the
// scores tie within the tolerance at the boundary.
inline void expect_top_k(const std::vector<double>& scores, int64_t begin, int64_t kept,
                         const int32_t* picked, double tolerance, const std::string& where) {
  const int64_t count = int64_t(scores.size());
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  std::vector<bool> in_ref(static_cast<size_t>(count), false);
  std::vector<bool> in_ours(static_cast<size_t>(count), false);
  for (int64_t i = 0; i < kept; ++i)
    in_ref[order[i]] = true;
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t slot = picked[i] - begin;
    ASSERT_TRUE(slot >= 0 && slot < count)
        << where << ": position " << picked[i] << " out of range";
    ASSERT_FALSE(in_ours[slot]) << where << ": position " << picked[i] << " twice";
    in_ours[slot] = true;
  }
  if (kept == 0) return;
  const double kth = scores[order[kept - 1]];
  for (int64_t i = 0; i < count; ++i) {
    if (in_ours[i] != in_ref[i]) {
      EXPECT_NEAR(scores[i], kth, tolerance)
          << where << ": position " << begin + i << (in_ours[i] ? " picked" : " left out")
          << " though it does not tie with the k-th best";
    }
  }
}

}  // namespace pqkv::testing
