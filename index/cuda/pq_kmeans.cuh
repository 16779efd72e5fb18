// Batched k-means (L2, Lloyd) on the GPU: every (KV head, sub-space) pair of a
// layer is one problem, and each step of the algorithm is one launch over all
// problems. Convergence needs no host round trip: a problem whose assignments
// no longer change raises a device flag, and later launches skip it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "index/cuda/pq_encode.cuh"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

struct KmeansArgs {
  PqGeometry geo;
  KeySource keys;  // device
  // Training rows: train_rows[i] (device, n_train entries), or rows 0..n_train-1
  // when null.
  const int64_t* train_rows = nullptr;
  int64_t n_train = 0;
  // Initial centroid c of every problem is training row init_rows[c] (device,
  // ksub entries, each < n_train).
  const int32_t* init_rows = nullptr;
  int iters = 0;               // Lloyd iterations at most; 0 keeps the initial centroids
  float* centroids = nullptr;  // device out, [kv_head][m][ksub][dsub]
};

// Enqueues initialisation and `iters` Lloyd iterations on `stream`. Its
// scratch memory is allocated and freed in stream order. An empty cluster takes
// half of the largest one: a copy of its centroid, both nudged apart. Cluster
// sums are float atomics, so two runs with one seed agree up to summation order.
Status launch_kmeans(const KmeansArgs& args, cudaStream_t stream);

}  // namespace pqkv::index::cuda
