// Nearest-centroid encoding of keys on the GPU, for all (KV head, sub-space)
// pairs of a layer in one launch; also the objective pass of k-means and the
// decoding of codes back to centroid vectors.
//
// Codes live per KV head as [token][m] bytes (see layer_index_cuda.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "index/cuda/pq_nearest.cuh"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

struct PqGeometry {
  int kv_heads = 0;
  int head_dim = 0;
  int m = 0;
  int ksub = 0;
  __host__ __device__ int dsub() const { return head_dim / m; }
};

struct EncodeArgs {
  PqGeometry geo;
  KeySource keys;  // device, rows [0, n)
  int64_t n = 0;
  const float* centroids = nullptr;  // device, [kv_head][m][ksub][dsub]
  // Output codes (device; may be null): row t of the input goes to
  // codes[h * head_stride + (first_token + t) * m + j].
  uint8_t* codes = nullptr;
  int64_t head_stride = 0;
  int64_t first_token = 0;
  // When non-null (device), *first_position is added to first_token when the
  // kernel runs, and codes of tokens at or past max_tokens are not written:
  // encoding at a device-side sequence length, for replayed graphs.
  const int64_t* first_position = nullptr;
  int64_t max_tokens = 0;
  // When non-null (device, [kv_head * m + j]), receives += the sum of squared
  // distances of the rows to their nearest centroids.
  double* objective = nullptr;
};

// Encodes (and/or measures) rows [0, n) of every KV head and sub-space.
Status launch_encode(const EncodeArgs& args, cudaStream_t stream);

}  // namespace pqkv::index::cuda
