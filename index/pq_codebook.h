// PQ codebooks of one layer: one codebook per KV head, m sub-spaces of
// head_dim / m dims, 2^bits centroids each. Codes are one byte per
// (token, sub-space).
#pragma once

#include <cstdint>
#include <vector>

#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index {

struct PqShape {
  int head_dim = 0;
  int m = 0;     // sub-spaces
  int bits = 0;  // 1..8

  int dsub() const { return head_dim / m; }
  int ksub() const { return 1 << bits; }
  bool operator==(const PqShape&) const = default;
  Status validate() const;
  // OK when `config` is valid and trains codebooks of this shape.
  Status check_config(const PqConfig& config) const;
  static PqShape from_config(int head_dim, const PqConfig& config) {
    return {head_dim, config.resolved_m(head_dim), config.bits};
  }
};

// Centroids of every KV head of one layer, fp32, laid out
// [kv_head][sub-space][centroid][dsub]: one sub-space's centroids are contiguous,
// which is what a LUT build reads.
struct LayerCodebook {
  PqShape shape;
  int num_kv_heads = 0;
  std::vector<float> centroids;
  // k-means objective per (kv_head, sub-space) at the end of training: the sum
  // of squared distances of the training keys to their centroids.
  std::vector<double> objective;

  int64_t floats_per_head() const { return int64_t{shape.m} * shape.ksub() * shape.dsub(); }
  const float* head(int kv_head) const { return centroids.data() + kv_head * floats_per_head(); }
  float* head(int kv_head) { return centroids.data() + kv_head * floats_per_head(); }
  // Centroids of one sub-space: [ksub][dsub].
  const float* sub(int kv_head, int j) const {
    return head(kv_head) + int64_t{j} * shape.ksub() * shape.dsub();
  }
  Status validate() const;
  // OK when the codebook is valid and fits an index of `shape` over `kv_heads` heads.
  Status check_fits(const PqShape& shape, int kv_heads) const;
};

}  // namespace pqkv::index
