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
#include "index/cpu/pq_encode_cpu.h"

namespace pqkv::index::cpu {
namespace {

// The squared L2 distances of one point to every centroid, with the centroids
// transposed to [dim][k] so that the loop over centroids vectorizes. Cloned
// for AVX2, picked at load time where the CPU has it.
__attribute__((target_clones("avx2", "default"))) void distances_to_centroids(
    const float* x, const float* transposed, int dim, int k, float* out) {
  std::fill(out, out + k, 0.0f);
  for (int d = 0; d < dim; ++d) {
    const float v = x[d];
    const float* col = transposed + int64_t{d} * k;
    for (int c = 0; c < k; ++c) {
      const float diff = v - col[c];
      out[c] += diff * diff;
    }
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
  // k-means++ seeding: each next centroid is a training row drawn with
  // probability proportional to its squared distance to the nearest centroid
  // so far (one Lloyd iteration's work; a better start than random rows).
  std::vector<double> nearest(static_cast<size_t>(cap), std::numeric_limits<double>::max());
  std::memcpy(centroids, points.data(), sizeof(float) * dim);
  for (int c = 1; c < k; ++c) {
    const float* last = centroids + int64_t{c - 1} * dim;
    double total = 0;
    for (int64_t i = 0; i < cap; ++i) {
      double d2 = 0;
      for (int d = 0; d < dim; ++d) {
        const double diff = double(points[i * dim + d]) - last[d];
        d2 += diff * diff;
      }
      nearest[i] = std::min(nearest[i], d2);
      total += nearest[i];
    }
    int64_t chosen = c;  // all rows coincide with centroids: any row will do
    if (total > 0) {
      double target = std::uniform_real_distribution<double>(0.0, total)(rng);
      for (chosen = 0; chosen < cap - 1; ++chosen) {
        target -= nearest[chosen];
        if (target < 0) break;
      }
    }
    std::memcpy(centroids + int64_t{c} * dim, points.data() + chosen * dim, sizeof(float) * dim);
  }

  std::vector<float> transposed(static_cast<size_t>(k) * dim);
  std::vector<float> distances(static_cast<size_t>(k));
  std::vector<int32_t> assign(static_cast<size_t>(cap), -1);
  std::vector<double> sums(static_cast<size_t>(k) * dim);
  std::vector<int64_t> counts(static_cast<size_t>(k));
  for (int iter = 0; iter < config.kmeans_iters; ++iter) {
    for (int c = 0; c < k; ++c) {
      for (int d = 0; d < dim; ++d)
        transposed[int64_t{d} * k + c] = centroids[int64_t{c} * dim + d];
    }
    bool changed = false;
    for (int64_t i = 0; i < cap; ++i) {
      distances_to_centroids(points.data() + i * dim, transposed.data(), dim, k, distances.data());
      const auto best = static_cast<int32_t>(std::min_element(distances.begin(), distances.end()) -
                                             distances.begin());
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
      std::vector<float> sub(static_cast<size_t>(shape.dsub()));
      std::vector<float> distances(static_cast<size_t>(shape.ksub()));
      double sum = 0;
      for (int64_t t = 0; t < keys.n; ++t) {
        keys.gather(h, j * shape.dsub(), shape.dsub(), t, t + 1, sub.data());
        float d = 0;
        encoder.nearest(h, j, sub.data(), distances.data(), &d);
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
