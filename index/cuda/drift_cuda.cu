#include "index/cuda/drift_cuda.cuh"

#include <algorithm>
#include <cfloat>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"

namespace pqkv::index::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks of a launch at most: enough to fill the GPU for a refit's
// thousands of keys; a decode token's KV heads need one.
constexpr int64_t kMaxBlocks = 512;

// Offsets into the state (drift_state_doubles).
struct StateLayout {
  int kv;
  __device__ double* fit(double* s) const { return s; }
  __device__ double* floor(double* s) const { return s + kv; }
  __device__ double* since(double* s) const { return s + 2 * kv; }
  // tokens since the fit, publish sequence, blocks done, generation
  __device__ unsigned long long* counters(double* s) const {
    return reinterpret_cast<unsigned long long*>(s + 3 * kv);
  }
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v += __shfl_down_sync(~0u, v, offset);
  return v;
}

// The value a scalar code of `x` decodes to, as sq_scan.cu's encoder rounds.
__device__ __forceinline__ float scalar_decoded(float x, float scale, float offset, int bits) {
  const float levels = static_cast<float>((1 << bits) - 1);
  const float q = fminf(fmaxf(rintf((x - offset) / scale), 0.0f), levels);
  return offset + scale * q;
}

// The level stored for channel c of a scalar code.
__device__ __forceinline__ int scalar_level(const uint8_t* code, int c, int bits) {
  if (bits == 8) return code[c];
  const uint8_t b = code[c / 2];
  return c % 2 == 0 ? (b & 15) : (b >> 4);
}

// Writes the state to the mirror between two increments of the sequence
// number. One thread; the kernels that call it are ordered on one stream.
__device__ void publish(double* state, int kv, DriftMirror* mirror) {
  if (mirror == nullptr) return;
  const StateLayout l{kv};
  unsigned long long* counters = l.counters(state);
  const unsigned long long seq = counters[1] + 1;  // odd: being written
  counters[1] = seq + 1;
  mirror->seq = seq;
  __threadfence_system();
  mirror->generation = counters[3];
  mirror->tokens_since_fit = *reinterpret_cast<volatile unsigned long long*>(&counters[0]);
  const volatile double* v = state;
  for (int i = 0; i < 3 * kv; ++i)
    mirror->values[i] = v[i];
  __threadfence_system();
  mirror->seq = seq + 1;
}

// blockIdx.y: KV head; warps take fit rows in turn, lanes the channels.
__global__ void __launch_bounds__(kThreads) drift_fit_kernel(DriftFitArgs a) {
  __shared__ double part[kWarps][2];
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const DriftCodec& c = a.codec;
  const int d = c.head_dim;
  double norm = 0;
  double error = 0;
  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < a.n;
       row += int64_t{gridDim.x} * kWarps) {
    const int64_t base = (row * c.kv_heads + head) * d;
    for (int ch = lane; ch < d; ch += 32) {
      const float x = gpu::load_as_float(a.keys, a.dtype, base + ch);
      norm += static_cast<double>(x) * x;
      if (c.bits != 0) {
        const int64_t p = int64_t{head} * d + ch;
        const double e =
            static_cast<double>(x) - scalar_decoded(x, c.scale[p], c.offset[p], c.bits);
        error += e * e;
      }
    }
  }
  norm = warp_sum(norm);
  error = warp_sum(error);
  if (lane == 0) {
    part[warp][0] = norm;
    part[warp][1] = error;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) {
    norm += part[w][0];
    error += part[w][1];
  }
  atomicAdd(&a.sums[head], norm);
  if (c.bits != 0) atomicAdd(&a.sums[c.kv_heads + head], error);
}

__global__ void drift_start_kernel(DriftStartArgs a) {
  const StateLayout l{a.kv_heads};
  const double n = static_cast<double>(a.n);
  for (int h = threadIdx.x; h < a.kv_heads; h += blockDim.x) {
    double error = 0;
    if (a.objective != nullptr) {
      for (int j = 0; j < a.m; ++j)
        error += a.objective[h * a.m + j];
    } else {
      error = a.sums[a.kv_heads + h];
    }
    l.fit(a.state)[h] = error / n;
    l.floor(a.state)[h] = fmax(kDriftRelativeErrorFloor * a.sums[h] / n, DBL_MIN);
    l.since(a.state)[h] = 0;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  l.counters(a.state)[0] = 0;
  l.counters(a.state)[2] = 0;
  l.counters(a.state)[3] = a.generation;
  __threadfence();
  publish(a.state, a.kv_heads, a.mirror);
}

// Warps take (token, KV head) pairs in turn, lanes the channels; the last
// block to finish counts the tokens and publishes.
__global__ void __launch_bounds__(kThreads) drift_measure_kernel(DriftMeasureArgs a) {
  const DriftCodec& c = a.codec;
  const StateLayout l{c.kv_heads};
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int d = c.head_dim;
  const int64_t first =
      a.first_token + (a.first_position != nullptr ? *a.first_position : int64_t{0});
  const int64_t n = a.first_position == nullptr
                        ? a.n
                        : std::min<int64_t>(a.n, std::max<int64_t>(a.max_tokens - first, 0));
  const int code_size = c.m > 0 ? c.m : d * c.bits / 8;
  const int dsub = c.m > 0 ? d / c.m : 1;
  const int64_t pairs = n * c.kv_heads;
  for (int64_t p = int64_t{blockIdx.x} * kWarps + warp; p < pairs;
       p += int64_t{gridDim.x} * kWarps) {
    const int64_t t = p / c.kv_heads;
    const int head = static_cast<int>(p % c.kv_heads);
    const uint8_t* code = a.codes + head * a.head_stride + (first + t) * code_size;
    const int64_t base = (t * c.kv_heads + head) * d;
    double error = 0;
    for (int ch = lane; ch < d; ch += 32) {
      const float x = gpu::load_as_float(a.keys, a.dtype, base + ch);
      float decoded;
      if (c.m > 0) {
        const int j = ch / dsub;
        decoded = c.centroids[((int64_t{head} * c.m + j) * c.ksub + code[j]) * dsub + ch % dsub];
      } else {
        const int64_t q = int64_t{head} * d + ch;
        decoded = c.offset[q] + c.scale[q] * static_cast<float>(scalar_level(code, ch, c.bits));
      }
      const double e = static_cast<double>(x) - decoded;
      error += e * e;
    }
    error = warp_sum(error);
    if (lane == 0) atomicAdd(&l.since(a.state)[head], error);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  __threadfence();
  unsigned long long* counters = l.counters(a.state);
  if (atomicAdd(&counters[2], 1ULL) != gridDim.x - 1) return;
  // Every block's sums have landed (each fenced before counting itself).
  counters[2] = 0;
  counters[0] += static_cast<unsigned long long>(n);
  __threadfence();
  publish(a.state, c.kv_heads, a.mirror);
}

__global__ void keys_to_float_kernel(const void* keys, DType dtype, int64_t count, float* out) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = gpu::load_as_float(keys, dtype, i);
}

unsigned blocks_for(int64_t items, int per_block) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((items + per_block - 1) / per_block, 1, kMaxBlocks));
}

}  // namespace

int64_t drift_state_doubles(int kv_heads) {
  return 3 * int64_t{kv_heads} + 4;
}

int64_t drift_mirror_bytes(int kv_heads) {
  return static_cast<int64_t>(offsetof(DriftMirror, values)) +
         3 * int64_t{kv_heads} * static_cast<int64_t>(sizeof(double));
}

Status launch_drift_fit(const DriftFitArgs& args, cudaStream_t stream) {
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(args.sums, 0, sizeof(double) * 2 * args.codec.kv_heads, stream));
  if (args.n == 0) return ok_status();
  const dim3 grid(blocks_for(args.n, kWarps), static_cast<unsigned>(args.codec.kv_heads));
  drift_fit_kernel<<<grid, kThreads, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_drift_start(const DriftStartArgs& args, cudaStream_t stream) {
  drift_start_kernel<<<1, 32, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_drift_measure(const DriftMeasureArgs& args, cudaStream_t stream) {
  if (args.n == 0) return ok_status();
  drift_measure_kernel<<<blocks_for(args.n * args.codec.kv_heads, kWarps), kThreads, 0, stream>>>(
      args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_keys_to_float(const void* keys, DType dtype, int64_t n, int64_t row_elements,
                            float* out, int64_t first_row, cudaStream_t stream) {
  const int64_t count = n * row_elements;
  if (count == 0) return ok_status();
  keys_to_float_kernel<<<blocks_for(count, kThreads), kThreads, 0, stream>>>(
      keys, dtype, count, out + first_row * row_elements);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::index::cuda
