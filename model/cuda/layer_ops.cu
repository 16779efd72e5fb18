#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "model/cuda/block_reduce.cuh"
#include "model/cuda/layer_ops.cuh"

namespace pqkv::model::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <class T>
__global__ void embed_kernel(const int32_t* ids, int64_t tokens, const T* table, int hidden,
                             float* out) {
  const int64_t n = tokens * hidden;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / hidden;
    out[i] = gpu::to_float(table[int64_t{ids[t]} * hidden + i % hidden]);
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
    out[i] = gpu::from_float<T>(x[i]);
  }
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

}  // namespace pqkv::model::cuda
