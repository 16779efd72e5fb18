// The nearest-centroid scans of the CPU k-means and encoder against a plain
// loop: every k the codes allow (padding included), odd dimensions, ties.
#include "index/cpu/nearest_centroid_cpu.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "test_util.h"

namespace pqkv::index::cpu {
namespace {

using pqkv::testing::random_floats;

// The squared distance summed in the encoder's order and rounding.
float reference_distance(const float* x, const float* c, int dim) {
  float sum = 0;
  for (int d = 0; d < dim; ++d) {
    const float diff = x[d] - c[d];
    sum += diff * diff;
  }
  return sum;
}

TEST(NearestCentroidCpuTest, BothScansFindTheNearestCentroid) {
  const uint64_t seed = 42;
  for (const int k : {2, 16, 17, 100, 256}) {
    for (const int dim : {1, 3, 8, 16}) {
      SCOPED_TRACE("seed=" + std::to_string(seed) + " k=" + std::to_string(k) +
                   " dim=" + std::to_string(dim));
      const auto centroids = random_floats(static_cast<size_t>(k) * dim, seed + k * 31 + dim);
      const auto points = random_floats(static_cast<size_t>(50) * dim, seed + k * 37 + dim);
      std::vector<float> transposed(static_cast<size_t>(dim) * padded_centroids(k));
      transpose_centroids(centroids.data(), k, dim, transposed.data());
      std::vector<float> dot(static_cast<size_t>(dim) * padded_dot_centroids(k));
      std::vector<float> half_norms(static_cast<size_t>(padded_dot_centroids(k)));
      prepare_dot_scan(centroids.data(), k, dim, dot.data(), half_norms.data());
      for (int i = 0; i < 50; ++i) {
        const float* x = points.data() + int64_t{i} * dim;
        int want = 0;
        float want_d = reference_distance(x, centroids.data(), dim);
        for (int c = 1; c < k; ++c) {
          const float d = reference_distance(x, centroids.data() + int64_t{c} * dim, dim);
          if (d < want_d) {
            want = c;
            want_d = d;
          }
        }
        float got_d = -1;
        EXPECT_EQ(nearest_centroid(x, transposed.data(), dim, padded_centroids(k), &got_d), want)
            << "point " << i;
        EXPECT_EQ(got_d, want_d) << "point " << i;
        // The dot-product scan rounds differently: its pick is the nearest up
        // to that rounding.
        const int dot_pick =
            nearest_centroid_dot(x, dot.data(), half_norms.data(), dim, padded_dot_centroids(k));
        ASSERT_GE(dot_pick, 0);
        ASSERT_LT(dot_pick, k);
        EXPECT_NEAR(reference_distance(x, centroids.data() + int64_t{dot_pick} * dim, dim), want_d,
                    1e-4f * (1 + want_d))
            << "point " << i;
      }
    }
  }
}

TEST(NearestCentroidCpuTest, TiesGoToTheLowestIndex) {
  const int dim = 4;
  const int k = 40;
  // Centroids 5, 21 and 37 coincide and are the nearest to x.
  std::vector<float> centroids(static_cast<size_t>(k) * dim, 10.0f);
  for (const int c : {5, 21, 37}) {
    for (int d = 0; d < dim; ++d)
      centroids[c * dim + d] = 1.0f;
  }
  const std::vector<float> x(dim, 1.5f);
  std::vector<float> transposed(static_cast<size_t>(dim) * padded_centroids(k));
  transpose_centroids(centroids.data(), k, dim, transposed.data());
  float d2 = 0;
  EXPECT_EQ(nearest_centroid(x.data(), transposed.data(), dim, padded_centroids(k), &d2), 5);
  EXPECT_FLOAT_EQ(d2, 1.0f);
  std::vector<float> dot(static_cast<size_t>(dim) * padded_dot_centroids(k));
  std::vector<float> half_norms(static_cast<size_t>(padded_dot_centroids(k)));
  prepare_dot_scan(centroids.data(), k, dim, dot.data(), half_norms.data());
  EXPECT_EQ(
      nearest_centroid_dot(x.data(), dot.data(), half_norms.data(), dim, padded_dot_centroids(k)),
      5);
}

}  // namespace
}  // namespace pqkv::index::cpu
