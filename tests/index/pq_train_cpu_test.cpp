#include <faiss/impl/ProductQuantizer.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "index/cpu/host_keys.h"
#include "index/cpu/kmeans_cpu.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::LayerCodebook;
using index::PqShape;

Result<LayerCodebook> train(const std::vector<float>& keys, int64_t n, int kv_heads, int head_dim,
                            const PqConfig& config) {
  return index::cpu::train_codebook(
      index::cpu::HostKeys{keys.data(), DType::kF32, n, kv_heads, head_dim},
      PqShape::from_config(head_dim, config), config);
}

// Keys of one head, contiguous: [n][head_dim].
std::vector<float> head_keys(const std::vector<float>& keys, int64_t n, int kv_heads, int head_dim,
                             int h) {
  std::vector<float> out(static_cast<size_t>(n) * head_dim);
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(keys.begin() + (t * kv_heads + h) * head_dim, head_dim, out.begin() + t * head_dim);
  }
  return out;
}

// Sum over keys and sub-spaces of the squared distance to the nearest
// centroid, in double.
double objective_of(const LayerCodebook& cb, const std::vector<float>& keys, int64_t n, int h,
                    int kv_heads) {
  const auto& s = cb.shape;
  double total = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < s.m; ++j) {
      const float* x = keys.data() + (t * kv_heads + h) * s.head_dim + j * s.dsub();
      double best = INFINITY;
      for (int c = 0; c < s.ksub(); ++c) {
        double d2 = 0;
        for (int d = 0; d < s.dsub(); ++d) {
          const double diff = double(x[d]) - cb.sub(h, j)[c * s.dsub() + d];
          d2 += diff * diff;
        }
        best = std::min(best, d2);
      }
      total += best;
    }
  }
  return total;
}

TEST(PqTrainCpuTest, ObjectiveWithinTwoPercentOfFaissProductQuantizer) {
  struct Case {
    int head_dim, m, bits, iters;
    int64_t n;
    int max_points;
  };
  for (const Case c :
       {Case{64, 4, 6, 10, 1500, 0}, Case{32, 2, 4, 8, 700, 0}, Case{128, 8, 5, 6, 900, 16}}) {
    SCOPED_TRACE("head_dim=" + std::to_string(c.head_dim) + " m=" + std::to_string(c.m) +
                 " bits=" + std::to_string(c.bits) + " n=" + std::to_string(c.n));
    const int kv_heads = 2;
    const auto keys = clustered_keys(c.n, kv_heads, c.head_dim, 11);
    PqConfig config = small_config(c.m, c.bits, c.iters);
    config.max_train_points_per_centroid = c.max_points;
    auto cb = train(keys, c.n, kv_heads, c.head_dim, config);
    PQKV_ASSERT_OK(cb);
    PQKV_ASSERT_OK(cb->validate());
    ASSERT_EQ(cb->objective.size(), size_t(kv_heads * c.m));
    for (int h = 0; h < kv_heads; ++h) {
      double ours = 0;
      for (int j = 0; j < c.m; ++j)
        ours += cb->objective[h * c.m + j];

      const auto x = head_keys(keys, c.n, kv_heads, c.head_dim, h);
      faiss::ProductQuantizer pq(c.head_dim, c.m, c.bits);
      pq.cp = index::cpu::clustering_parameters(config);
      pq.verbose = false;
      pq.train(c.n, x.data());
      std::vector<uint8_t> codes(static_cast<size_t>(c.n) * pq.code_size);
      pq.compute_codes(x.data(), codes.data(), c.n);
      std::vector<float> decoded(x.size());
      pq.decode(codes.data(), decoded.data(), c.n);
      double faiss_objective = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const double diff = double(x[i]) - decoded[i];
        faiss_objective += diff * diff;
      }
      EXPECT_NEAR(ours, faiss_objective, 0.02 * faiss_objective) << "KV head " << h;
      // The recorded objective is the real one of the final centroids.
      EXPECT_NEAR(ours, objective_of(*cb, keys, c.n, h, kv_heads), 1e-4 * ours);
    }
  }
}

TEST(PqTrainCpuTest, DeterministicAndMoreIterationsDoNotHurt) {
  const int64_t n = 800;
  const auto keys = clustered_keys(n, 3, 32, 5);
  auto a = train(keys, n, 3, 32, small_config(4, 5, 1));
  auto b = train(keys, n, 3, 32, small_config(4, 5, 12));
  auto b2 = train(keys, n, 3, 32, small_config(4, 5, 12));
  PQKV_ASSERT_OK(a);
  PQKV_ASSERT_OK(b);
  PQKV_ASSERT_OK(b2);
  EXPECT_EQ(b->centroids, b2->centroids);
  EXPECT_EQ(b->objective, b2->objective);
  for (size_t i = 0; i < a->objective.size(); ++i) {
    EXPECT_LE(b->objective[i], a->objective[i] * (1 + 1e-6)) << "(head, sub-space) " << i;
  }
}

TEST(PqTrainCpuTest, FewerKeysThanCentroidsGiveAFullCodebookOfRealKeys) {
  const int head_dim = 32;
  const int kv_heads = 2;
  for (const int64_t n : {int64_t{1}, int64_t{5}, int64_t{255}, int64_t{256}, int64_t{257}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto keys = clustered_keys(n, kv_heads, head_dim, 3);
    const auto config = small_config(4, 8);
    auto cb = train(keys, n, kv_heads, head_dim, config);
    PQKV_ASSERT_OK(cb);
    PQKV_ASSERT_OK(cb->validate());
    const auto& s = cb->shape;
    if (n > s.ksub()) continue;  // k-means proper: covered elsewhere
    for (int h = 0; h < kv_heads; ++h) {
      for (int j = 0; j < s.m; ++j) {
        EXPECT_EQ(cb->objective[h * s.m + j], 0.0);
        for (int c = 0; c < s.ksub(); ++c) {
          // Every centroid is the sub-vector of some training key: nothing
          // in the codebook comes from memory the keys did not fill.
          const int64_t t = c % n;
          const float* want = keys.data() + (t * kv_heads + h) * head_dim + j * s.dsub();
          const float* got = cb->sub(h, j) + c * s.dsub();
          ASSERT_TRUE(std::equal(got, got + s.dsub(), want))
              << "head " << h << " sub-space " << j << " centroid " << c;
        }
      }
    }
    // And the index built on them encodes its own keys exactly.
    auto idx = trained_index(keys, n, kv_heads, head_dim, config);
    for (int h = 0; h < kv_heads; ++h) {
      const auto codes = all_codes(*idx, h);
      for (int64_t t = 0; t < n; ++t) {
        for (int j = 0; j < s.m; ++j)
          EXPECT_EQ(codes[t * s.m + j] % n, t);
      }
    }
  }
}

// More keys than centroids but fewer distinct ones: k-means has empty
// clusters to fill and must still give a finite codebook.
TEST(PqTrainCpuTest, RepeatedKeysGiveAFiniteCodebook) {
  const int64_t n = 400;
  const int kv_heads = 2;
  const int head_dim = 32;
  const auto distinct = clustered_keys(3, kv_heads, head_dim, 6);
  std::vector<float> keys(static_cast<size_t>(n) * kv_heads * head_dim);
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(distinct.begin() + (t % 3) * kv_heads * head_dim, kv_heads * head_dim,
                keys.begin() + t * kv_heads * head_dim);
  }
  auto cb = train(keys, n, kv_heads, head_dim, small_config(2, 8));
  PQKV_ASSERT_OK(cb);
  PQKV_EXPECT_OK(cb->validate());
  for (const double o : cb->objective)
    EXPECT_NEAR(o, 0.0, 1e-3);
}

TEST(PqTrainCpuTest, HalfPrecisionKeysTrainLikeTheirFloatValues) {
  const int64_t n = 300;
  const int kv_heads = 2;
  const int head_dim = 64;
  auto keys = clustered_keys(n, kv_heads, head_dim, 9);
  std::vector<uint16_t> bf16(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    bf16[i] = float_to_bf16(keys[i]);
    keys[i] = bf16_to_float(bf16[i]);
  }
  const auto config = small_config(4, 6);
  const PqShape shape = PqShape::from_config(head_dim, config);
  auto from_bf16 = index::cpu::train_codebook(
      index::cpu::HostKeys{bf16.data(), DType::kBF16, n, kv_heads, head_dim}, shape, config);
  auto from_f32 = train(keys, n, kv_heads, head_dim, config);
  PQKV_ASSERT_OK(from_bf16);
  PQKV_ASSERT_OK(from_f32);
  EXPECT_EQ(from_bf16->centroids, from_f32->centroids);
}

TEST(PqTrainCpuTest, NoKeysOrMismatchedConfigIsAnError) {
  const std::vector<float> none;
  auto empty = train(none, 0, 2, 32, small_config(4, 6));
  EXPECT_EQ(empty.status().code(), StatusCode::kInvalidArgument) << empty.status().to_string();

  const auto keys = clustered_keys(10, 2, 32, 1);
  auto mismatched =
      index::cpu::train_codebook(index::cpu::HostKeys{keys.data(), DType::kF32, 10, 2, 32},
                                 PqShape{32, 2, 6}, small_config(4, 6));
  EXPECT_EQ(mismatched.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv::testing
