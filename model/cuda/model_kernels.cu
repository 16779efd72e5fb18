#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>

#include "core/cuda_check.h"
#include "model/cuda/model_kernels.cuh"

namespace pqkv::model::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load(const float* p, int64_t i) {
  return p[i];
}
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float load(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}
__device__ __forceinline__ void store(__half* p, int64_t i, float v) {
  p[i] = __float2half(v);
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// Block-wide sum or max of one value per thread; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  v = lane < warps ? scratch[lane] : (kMax ? -FLT_MAX : 0.0f);
  for (int offset = 16; offset > 0; offset /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  return v;
}

template <class T>
__global__ void embed_kernel(const int32_t* ids, int64_t tokens, const T* table, int hidden,
                             float* out) {
  const int64_t n = tokens * hidden;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / hidden;
    out[i] = load(table, int64_t{ids[t]} * hidden + i % hidden);
  }
}

__global__ void rms_norm_kernel(const float* x, int n, const float* weight, float eps, float* y) {
  __shared__ float scratch[32];
  const float* row = x + int64_t{blockIdx.x} * n;
  float ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    ss += row[i] * row[i];
  ss = block_reduce<false>(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(n) + eps);
  float* dst = y + int64_t{blockIdx.x} * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    dst[i] = weight[i] * (row[i] * inv);
}

__global__ void rope_kernel(float* x, int64_t tokens, int heads, int head_dim, const float* cos,
                            const float* sin) {
  const int half = head_dim / 2;
  const int64_t n = tokens * heads * half;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int j = static_cast<int>(i % half);
    const int64_t th = i / half;  // token * heads + head
    const int64_t t = th / heads;
    float* v = x + th * head_dim;
    const float c = cos[t * half + j];
    const float s = sin[t * half + j];
    const float a = v[j];
    const float b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
  }
}

__global__ void add_bias_kernel(float* y, int64_t n, int width, const float* bias) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] += bias[i % width];
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += y[i];
  }
}

__global__ void swiglu_kernel(float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

template <class T>
__global__ void convert_kernel(const float* x, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    store(out, i, x[i]);
  }
}

// One block per (query token, query head). Keys are scored a tile of
// blockDim.x at a time with an online softmax; the output accumulates in
// shared memory, each thread owning the dims i = threadIdx.x (mod blockDim.x).
constexpr int kAttnThreads = 128;

__global__ void causal_attention_kernel(AttentionArgs a, float scale) {
  extern __shared__ float smem[];
  float* q = smem;              // [head_dim]
  float* acc = q + a.head_dim;  // [head_dim]
  float* p = acc + a.head_dim;  // [kAttnThreads]
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x / a.q_heads;
  const int h = blockIdx.x % a.q_heads;
  const int g = h / (a.q_heads / a.kv_heads);
  const int d = a.head_dim;
  const int64_t row = int64_t{a.kv_heads} * d;
  const float* qh = a.q + (t * a.q_heads + h) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    q[i] = qh[i];
    acc[i] = 0.0f;
  }
  __syncthreads();
  const int64_t n = a.past + t + 1;
  float running_max = -FLT_MAX;
  float running_sum = 0.0f;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    float s = -FLT_MAX;
    if (j < n) {
      const float* k =
          j < a.past ? a.past_k + j * row + g * d : a.new_k + (j - a.past) * row + g * d;
      float dot = 0.0f;
      for (int i = 0; i < d; ++i) {
        dot += q[i] * k[i];
      }
      s = dot * scale;
    }
    const float tile_max = block_reduce<true>(s, scratch);
    const float new_max = fmaxf(running_max, tile_max);
    const float correction = expf(running_max - new_max);
    const float e = j < n ? expf(s - new_max) : 0.0f;
    p[threadIdx.x] = e;
    const float tile_sum = block_reduce<false>(e, scratch);  // syncs: p is visible
    running_sum = running_sum * correction + tile_sum;
    running_max = new_max;
    const int64_t count = n - base < int64_t{blockDim.x} ? n - base : int64_t{blockDim.x};
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float sum = acc[i] * correction;
      for (int64_t r = 0; r < count; ++r) {
        const int64_t jj = base + r;
        const float* v =
            jj < a.past ? a.past_v + jj * row + g * d : a.new_v + (jj - a.past) * row + g * d;
        sum += p[r] * v[i];
      }
      acc[i] = sum;
    }
    __syncthreads();  // p is rewritten by the next tile
  }
  float* out = a.out + (t * a.q_heads + h) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    out[i] = acc[i] / running_sum;
}

}  // namespace

Status embed(const int32_t* ids, int64_t tokens, const void* table, DType dtype, int hidden,
             float* out, cudaStream_t stream) {
  const unsigned grid = grid_for(tokens * hidden);
  switch (dtype) {
    case DType::kF32:
      embed_kernel<<<grid, kThreads, 0, stream>>>(ids, tokens, static_cast<const float*>(table),
                                                  hidden, out);
      break;
    case DType::kBF16:
      embed_kernel<<<grid, kThreads, 0, stream>>>(
          ids, tokens, static_cast<const __nv_bfloat16*>(table), hidden, out);
      break;
    case DType::kF16:
      embed_kernel<<<grid, kThreads, 0, stream>>>(ids, tokens, static_cast<const __half*>(table),
                                                  hidden, out);
      break;
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status rms_norm(const float* x, int64_t tokens, int n, const float* weight, float eps, float* y,
                cudaStream_t stream) {
  rms_norm_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(x, n, weight, eps, y);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status rope(float* x, int64_t tokens, int heads, int head_dim, const float* cos, const float* sin,
            cudaStream_t stream) {
  rope_kernel<<<grid_for(tokens * heads * head_dim / 2), kThreads, 0, stream>>>(x, tokens, heads,
                                                                                head_dim, cos, sin);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status add_bias(float* y, int64_t tokens, int n, const float* bias, cudaStream_t stream) {
  add_bias_kernel<<<grid_for(tokens * n), kThreads, 0, stream>>>(y, tokens * n, n, bias);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  add_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status swiglu(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  swiglu_kernel<<<grid_for(n), kThreads, 0, stream>>>(gate, up, n);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status convert_from_f32(const float* x, int64_t n, void* out, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32:
      PQKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(out, x, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      return ok_status();
    case DType::kBF16:
      convert_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kF16:
      convert_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, static_cast<__half*>(out));
      break;
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status causal_attention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.head_dim > 512 || args.q_heads % args.kv_heads != 0) {
    return Status::invalid_argument("attention needs head_dim <= 512 and GQA groups");
  }
  const int64_t blocks = args.tokens * args.q_heads;
  if (blocks > 0x7fffffff) return Status::out_of_range("too many query rows in one pass");
  const size_t smem = (2 * args.head_dim + kAttnThreads) * sizeof(float);
  const float scale = 1.0f / sqrtf(static_cast<float>(args.head_dim));
  causal_attention_kernel<<<static_cast<unsigned>(blocks), kAttnThreads, smem, stream>>>(args,
                                                                                         scale);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::model::cuda
