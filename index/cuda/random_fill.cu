#include "index/cuda/random_fill.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"

namespace pqkv::index::cuda {
namespace {

constexpr int kThreads = 256;

// splitmix64: a counter-based generator, so every element is independent.
__device__ __forceinline__ uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_kernel(void* data, DType dtype, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t r = mix(seed ^ mix(static_cast<uint64_t>(i)));
    const float a = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
    const float b = static_cast<float>((r >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    const float v = (a + b - 1.0f) * scale;
    gpu::store_from_float(data, dtype, i, v);
  }
}

template <class Code>
__global__ void codes_kernel(Code* codes, int64_t n, int ksub, uint64_t seed) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    codes[i] = static_cast<Code>(mix(seed ^ mix(static_cast<uint64_t>(i))) % ksub);
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 8192));
}

template <class Code>
Status fill_codes(Code* codes, int64_t n, int ksub, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return ok_status();
  codes_kernel<<<blocks_for(n), kThreads, 0, stream>>>(codes, n, ksub, seed);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace

Status fill_random(void* data, DType dtype, int64_t n, uint64_t seed, float scale,
                   cudaStream_t stream) {
  if (n == 0) return ok_status();
  fill_kernel<<<blocks_for(n), kThreads, 0, stream>>>(data, dtype, n, seed, scale);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status fill_random_codes(uint8_t* codes, int64_t n, int ksub, uint64_t seed, cudaStream_t stream) {
  return fill_codes(codes, n, ksub, seed, stream);
}

Status fill_random_codes(int64_t* codes, int64_t n, int ksub, uint64_t seed, cudaStream_t stream) {
  return fill_codes(codes, n, ksub, seed, stream);
}

}  // namespace pqkv::index::cuda
