#include "index/cpu/kmeans_cpu.h"

#include <faiss/IndexFlat.h>
#include <omp.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "index/cpu/catch_status.h"
#include "index/cpu/pq_encode_cpu.h"

namespace pqkv::index::cpu {
namespace {

// Limits OpenMP in the calling thread (a TBB worker) for a scope, so that
// Faiss's OpenMP loops do not multiply TBB's threads.
class OmpThreadLimit {
 public:
  explicit OmpThreadLimit(int threads) : previous_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~OmpThreadLimit() { omp_set_num_threads(previous_); }
  OmpThreadLimit(const OmpThreadLimit&) = delete;
  OmpThreadLimit& operator=(const OmpThreadLimit&) = delete;

 private:
  int previous_;
};

// Clusters x [n][dsub] into ksub centroids written to `centroids` [ksub][dsub].
void train_subspace(const float* x, int64_t n, const PqShape& shape,
                    const faiss::ClusteringParameters& params, float* centroids) {
  const int dsub = shape.dsub();
  const int ksub = shape.ksub();
  if (n <= ksub) {
    for (int c = 0; c < ksub; ++c) {
      std::memcpy(centroids + int64_t{c} * dsub, x + (c % n) * dsub, sizeof(float) * dsub);
    }
    return;
  }
  faiss::Clustering clustering(dsub, ksub, params);
  faiss::IndexFlatL2 assign(dsub);
  clustering.train(n, x, assign);
  std::copy(clustering.centroids.begin(), clustering.centroids.end(), centroids);
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
    const faiss::ClusteringParameters params = clustering_parameters(config);
    TaskErrors errors;
    tbb::parallel_for(0, keys.kv_heads * shape.m, [&](int task) {
      errors.run("k-means training", [&] {
        const OmpThreadLimit one_thread(1);
        const int h = task / shape.m;
        const int j = task % shape.m;
        std::vector<float> x(static_cast<size_t>(keys.n * shape.dsub()));
        keys.gather(h, j * shape.dsub(), shape.dsub(), 0, keys.n, x.data());
        train_subspace(
            x.data(), keys.n, shape, params,
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
