// Drift tracking on the GPU (LayerIndexCuda::drift_stats): per KV head the
// mean squared quantization error of the keys a codec was fit on and the
// summed error of every key encoded since, as LayerIndexCpu measures them
// (index/cpu/layer_index_cpu_refit.cpp). The state lives in device memory,
// and the kernels that change it also publish a copy to pinned host memory
// (DriftMirror), so the host reads drift without a sync or a copy on the
// decode path; a sequence number (odd while a publish is being written) lets
// the host tell a torn read from a whole one.
//
// Errors are ||key - decoded code||^2: PQ decodes a code to its centroids,
// scalar codes to offset + scale * level (sq_scan.cuh's code layout). The
// fit's error of PQ is k-means's objective over the fit keys (pq_encode.cuh),
// so the fit pass here measures norms, and scalar codes' error, only.
//
// All pointers are device memory of one GPU unless marked otherwise; every
// launcher enqueues on the stream it is given and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/status.h"
#include "pqkv/tensor_view.h"

namespace pqkv::index::cuda {

// Errors below this share of the fit keys' mean squared norm count as none
// (both means of a ratio get it added); the CPU index's kRelativeErrorFloor.
inline constexpr double kDriftRelativeErrorFloor = 1e-3;

// The codec whose codes are measured: PQ (m > 0) or scalar codes (bits 8 or 4).
struct DriftCodec {
  int kv_heads = 0;
  int head_dim = 0;
  int m = 0;                         // PQ sub-spaces; 0 for scalar codes
  int ksub = 0;                      // PQ centroids per sub-space
  const float* centroids = nullptr;  // PQ: [kv_head][m][ksub][dsub]
  int bits = 0;                      // scalar codes: 8 or 4
  const float* scale = nullptr;      // scalar codes: [kv_head][head_dim]
  const float* offset = nullptr;     // scalar codes: [kv_head][head_dim]
};

// The device-side state of one index, in one allocation of
// drift_state_doubles(kv_heads) doubles: per KV head the fit's mean error,
// the error floor and the summed error of keys since the fit, then four
// counters (tokens since the fit, the publish sequence, blocks done, the
// fit's generation).
int64_t drift_state_doubles(int kv_heads);

// What the host reads (pinned, mapped host memory of drift_mirror_bytes(kv_heads)
// bytes): `seq` is odd while a kernel writes, then the generation of the fit
// the figures are of (DriftStartArgs::generation), the tokens since the fit
// and, per KV head, fit error, floor and summed error since, [3][kv_heads].
struct DriftMirror {
  volatile uint64_t seq;
  volatile uint64_t generation;
  volatile uint64_t tokens_since_fit;
  volatile double values[1];  // [3 * kv_heads]
};
int64_t drift_mirror_bytes(int kv_heads);

// Sums over rows [0, n) of fit keys [n][kv_heads][head_dim] of `dtype`, per KV
// head: sums[h] += ||key||^2 and, for scalar codes, sums[kv_heads + h] +=
// ||key - decoded code||^2 (the code the encoder would write). `sums` must be
// zeroed first (launch_drift_fit zeroes it).
struct DriftFitArgs {
  DriftCodec codec;
  const void* keys = nullptr;
  DType dtype = DType::kF32;
  int64_t n = 0;
  double* sums = nullptr;  // [2 * kv_heads]
};
// Zeroes args.sums, then adds the fit keys' sums into it.
Status launch_drift_fit(const DriftFitArgs& args, cudaStream_t stream);

// Starts tracking a fit: per KV head fit error = error sum / n (PQ: the sum
// of k-means's objective over the head's sub-spaces), floor =
// kDriftRelativeErrorFloor * norm sum / n; errors and tokens since the fit
// are zeroed; the state is marked with `generation` (the host's count of
// fits, so that it tells figures of an earlier fit from this one's).
// Publishes to `mirror` when it is not null.
struct DriftStartArgs {
  int kv_heads = 0;
  int m = 0;                          // PQ: sub-spaces of `objective`; 0 for scalar codes
  const double* sums = nullptr;       // [2 * kv_heads], from launch_drift_fit
  const double* objective = nullptr;  // PQ: [kv_head * m + j], over the n fit keys
  int64_t n = 0;                      // fit keys, >= 1
  uint64_t generation = 0;
  double* state = nullptr;        // out, drift_state_doubles(kv_heads)
  DriftMirror* mirror = nullptr;  // pinned host memory, or null
};
Status launch_drift_start(const DriftStartArgs& args, cudaStream_t stream);

// Adds the error of keys rows [0, n) encoded as tokens first_token + t
// (plus *first_position when that is not null; codes at or past max_tokens
// were not written and are skipped) to the state's sums, counts n more tokens
// and publishes to `mirror`. Reads the codes the encoder wrote.
struct DriftMeasureArgs {
  DriftCodec codec;
  const void* keys = nullptr;  // [n][kv_heads][head_dim] of `dtype`
  DType dtype = DType::kF32;
  int64_t n = 0;
  const uint8_t* codes = nullptr;  // [kv_head][head_stride bytes], [token][code_size]
  int64_t head_stride = 0;
  int64_t first_token = 0;
  const int64_t* first_position = nullptr;
  int64_t max_tokens = 0;
  double* state = nullptr;
  DriftMirror* mirror = nullptr;  // pinned host memory
};
Status launch_drift_measure(const DriftMeasureArgs& args, cudaStream_t stream);

// out[first_row * row_elements + i] = float(keys[i]) for i < n * row_elements:
// the keys a refit re-encodes when it is swapped in.
Status launch_keys_to_float(const void* keys, DType dtype, int64_t n, int64_t row_elements,
                            float* out, int64_t first_row, cudaStream_t stream);

}  // namespace pqkv::index::cuda
