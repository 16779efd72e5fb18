#include "index/cpu/kmeans_cpu.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "index/cpu/catch_status.h"
#include "index/cpu/nearest_centroid_cpu.h"
#include "index/cpu/pq_encode_cpu.h"

namespace pqkv::index::cpu {
namespace {

// k-means++ seeding over the training points, held transposed as
// pt [dim][padded] (padded: a multiple of kSeedBlock; padding points are zero
// and weigh nothing): centroid 0 is point 0, and each next one a point drawn
// with probability proportional to its squared distance to the nearest
// centroid so far. Each round updates those distances in one vectorized sweep
// over the points and keeps per-block sums, so that the draw walks blocks
// first, then one block's points.
constexpr int kSeedBlock = 64;

__attribute__((target_clones("avx2", "default"))) void update_nearest(const float* pt,
                                                                      int64_t padded, int dim,
                                                                      const float* centroid,
                                                                      float* nearest,
                                                                      double* block_sums) {
  for (int64_t b = 0; b < padded; b += kSeedBlock) {
    float acc[kSeedBlock] = {};
    for (int d = 0; d < dim; ++d) {
      const float v = centroid[d];
      const float* row = pt + int64_t{d} * padded + b;
      for (int l = 0; l < kSeedBlock; ++l) {
        const float diff = row[l] - v;
        acc[l] += diff * diff;
      }
    }
    float sum = 0;
    for (int l = 0; l < kSeedBlock; ++l) {
      nearest[b + l] = std::min(nearest[b + l], acc[l]);
      sum += nearest[b + l];
    }
    block_sums[b / kSeedBlock] = sum;
  }
}

void seed_kmeans_plus_plus(const float* points, int64_t cap, int dim, int k, std::mt19937_64& rng,
                           float* centroids) {
  const int64_t padded = (cap + kSeedBlock - 1) / kSeedBlock * kSeedBlock;
  const int64_t blocks = padded / kSeedBlock;
  std::vector<float> pt(static_cast<size_t>(padded) * dim, 0.0f);
  for (int64_t i = 0; i < cap; ++i) {
    for (int d = 0; d < dim; ++d)
      pt[int64_t{d} * padded + i] = points[i * dim + d];
  }
  std::vector<float> nearest(static_cast<size_t>(padded), 0.0f);
  std::fill(nearest.begin(), nearest.begin() + cap, std::numeric_limits<float>::max());
  std::vector<double> block_sums(static_cast<size_t>(blocks));
  std::memcpy(centroids, points, sizeof(float) * dim);
  for (int c = 1; c < k; ++c) {
    update_nearest(pt.data(), padded, dim, centroids + int64_t{c - 1} * dim, nearest.data(),
                   block_sums.data());
    const double total = std::accumulate(block_sums.begin(), block_sums.end(), 0.0);
    int64_t chosen = c;  // all points coincide with centroids: any point will do
    if (total > 0) {
      double target = std::uniform_real_distribution<double>(0.0, total)(rng);
      int64_t b = 0;
      while (b < blocks - 1 && target >= block_sums[b])
        target -= block_sums[b++];
      for (chosen = b * kSeedBlock; chosen < cap - 1; ++chosen) {
        target -= nearest[chosen];
        if (target < 0) break;
      }
    }
    std::memcpy(centroids + int64_t{c} * dim, points + chosen * dim, sizeof(float) * dim);
  }
}

// Lloyd's k-means of x [n][dim] into k centroids [k][dim] (n > k): a seeded
// permutation picks the at most max_points_per_centroid * k rows trained on
// (0: all), k-means++ seeds the centroids among them;
// an empty cluster takes half of the largest one (its centroid nudged apart,
// as Faiss splits clusters); stops early once no assignment changes, where
// every later iteration would give the same centroids.
void lloyd_kmeans(const float* x, int64_t n, int dim, int k, const PqConfig& config,
                  float* centroids) {
  std::mt19937_64 rng(config.seed);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  const int64_t cap = config.max_train_points_per_centroid == 0
                          ? n
                          : std::min<int64_t>(n, int64_t{config.max_train_points_per_centroid} * k);
  // A partial Fisher-Yates shuffle: the first `cap` entries are a uniform sample.
  for (int64_t i = 0; i < cap; ++i) {
    std::uniform_int_distribution<int64_t> pick(i, n - 1);
    std::swap(perm[i], perm[pick(rng)]);
  }
  std::vector<float> points(static_cast<size_t>(cap) * dim);
  for (int64_t i = 0; i < cap; ++i)
    std::memcpy(points.data() + i * dim, x + perm[i] * dim, sizeof(float) * dim);
  seed_kmeans_plus_plus(points.data(), cap, dim, k, rng, centroids);

  const int padded_k = padded_dot_centroids(k);
  std::vector<float> transposed(static_cast<size_t>(padded_k) * dim);
  std::vector<float> half_norms(static_cast<size_t>(padded_k));
  std::vector<int32_t> assign(static_cast<size_t>(cap), -1);
  std::vector<double> sums(static_cast<size_t>(k) * dim);
  std::vector<int64_t> counts(static_cast<size_t>(k));
  for (int iter = 0; iter < config.kmeans_iters; ++iter) {
    prepare_dot_scan(centroids, k, dim, transposed.data(), half_norms.data());
    bool changed = false;
    for (int64_t i = 0; i < cap; ++i) {
      const int32_t best = nearest_centroid_dot(points.data() + i * dim, transposed.data(),
                                                half_norms.data(), dim, padded_k);
      changed |= best != assign[i];
      assign[i] = best;
    }
    if (!changed) break;
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < cap; ++i) {
      ++counts[assign[i]];
      for (int d = 0; d < dim; ++d)
        sums[int64_t{assign[i]} * dim + d] += points[i * dim + d];
    }
    for (int c = 0; c < k; ++c) {
      if (counts[c] == 0) continue;
      for (int d = 0; d < dim; ++d)
        centroids[int64_t{c} * dim + d] =
            static_cast<float>(sums[int64_t{c} * dim + d] / counts[c]);
    }
    constexpr float kNudge = 1.0f / 1024;
    for (int c = 0; c < k; ++c) {
      if (counts[c] != 0) continue;
      const int big =
          static_cast<int>(std::max_element(counts.begin(), counts.end()) - counts.begin());
      for (int d = 0; d < dim; ++d) {
        const float v = centroids[int64_t{big} * dim + d];
        const float sign = d % 2 == 0 ? 1.0f : -1.0f;
        centroids[int64_t{c} * dim + d] = v * (1 + sign * kNudge);
        centroids[int64_t{big} * dim + d] = v * (1 - sign * kNudge);
      }
      counts[c] = counts[big] / 2;
      counts[big] -= counts[c];
    }
  }
}

// Clusters x [n][dsub] into ksub centroids written to `centroids` [ksub][dsub].
void train_subspace(const float* x, int64_t n, const PqShape& shape, const PqConfig& config,
                    float* centroids) {
  const int dsub = shape.dsub();
  const int ksub = shape.ksub();
  if (n <= ksub) {
    for (int c = 0; c < ksub; ++c) {
      std::memcpy(centroids + int64_t{c} * dsub, x + (c % n) * dsub, sizeof(float) * dsub);
    }
    return;
  }
  lloyd_kmeans(x, n, dsub, ksub, config, centroids);
}

// The objective of every (head, sub-space): all keys against the final centroids.
Status compute_objectives(const HostKeys& keys, LayerCodebook& codebook) {
  const PqShape& shape = codebook.shape;
  const PqEncoder encoder(codebook);
  codebook.objective.assign(static_cast<size_t>(keys.kv_heads) * shape.m, 0.0);
  TaskErrors errors;
  tbb::parallel_for(0, keys.kv_heads * shape.m, [&](int task) {
    errors.run("computing the k-means objective", [&] {
      const int h = task / shape.m;
      const int j = task % shape.m;
      std::vector<float> sub(static_cast<size_t>(keys.n) * shape.dsub());
      keys.gather(h, j * shape.dsub(), shape.dsub(), 0, keys.n, sub.data());
      double sum = 0;
      for (int64_t t = 0; t < keys.n; ++t) {
        float d = 0;
        encoder.nearest(h, j, sub.data() + t * shape.dsub(), &d);
        sum += d;
      }
      codebook.objective[task] = sum;
      return ok_status();
    });
  });
  return errors.status();
}

}  // namespace

faiss::ClusteringParameters clustering_parameters(const PqConfig& config) {
  faiss::ClusteringParameters params;
  params.niter = config.kmeans_iters;
  params.nredo = 1;
  params.verbose = false;
  params.seed = static_cast<int>((config.seed ^ (config.seed >> 32)) & 0x7fffffffu);
  params.min_points_per_centroid = 1;
  params.max_points_per_centroid = config.max_train_points_per_centroid == 0
                                       ? std::numeric_limits<int>::max()
                                       : config.max_train_points_per_centroid;
  return params;
}

Result<LayerCodebook> train_codebook(const HostKeys& keys, const PqShape& shape,
                                     const PqConfig& config) {
  PQKV_RETURN_IF_ERROR(shape.validate());
  PQKV_RETURN_IF_ERROR(config.validate(shape.head_dim));
  if (PqShape::from_config(shape.head_dim, config) != shape) {
    return Status::invalid_argument("PQ config " + config.to_string() +
                                    " differs from the codebook shape m=" +
                                    std::to_string(shape.m) + ",b=" + std::to_string(shape.bits));
  }
  if (keys.n == 0) {
    return Status::invalid_argument("k-means needs at least one key to train on, got keys [0, " +
                                    std::to_string(keys.kv_heads) + ", " +
                                    std::to_string(keys.head_dim) +
                                    "]; pass the keys to learn from");
  }
  if (keys.head_dim != shape.head_dim || keys.kv_heads < 1) {
    return Status::invalid_argument(
        "keys [" + std::to_string(keys.n) + ", " + std::to_string(keys.kv_heads) + ", " +
        std::to_string(keys.head_dim) + "] do not match the codebook's head_dim " +
        std::to_string(shape.head_dim));
  }
  return catch_as_status("k-means training", [&]() -> Result<LayerCodebook> {
    LayerCodebook codebook;
    codebook.shape = shape;
    codebook.num_kv_heads = keys.kv_heads;
    codebook.centroids.resize(static_cast<size_t>(keys.kv_heads * codebook.floats_per_head()));
    TaskErrors errors;
    tbb::parallel_for(0, keys.kv_heads * shape.m, [&](int task) {
      errors.run("k-means training", [&] {
        const int h = task / shape.m;
        const int j = task % shape.m;
        std::vector<float> x(static_cast<size_t>(keys.n * shape.dsub()));
        keys.gather(h, j * shape.dsub(), shape.dsub(), 0, keys.n, x.data());
        train_subspace(
            x.data(), keys.n, shape, config,
            codebook.centroids.data() + (int64_t{h} * shape.m + j) * shape.ksub() * shape.dsub());
        return ok_status();
      });
    });
    PQKV_RETURN_IF_ERROR(errors.status());
    PQKV_RETURN_IF_ERROR(compute_objectives(keys, codebook));
    return codebook;
  });
}

}  // namespace pqkv::index::cpu
