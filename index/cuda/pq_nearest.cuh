// Device helpers shared by encoding and k-means: reading one key sub-vector
// into registers and finding its nearest centroid in shared memory.
//
// Sub-vectors are padded with zeros to kMaxDsub (a compile-time bound, one of
// kDsubBounds) so that register arrays are indexed only by constants; the
// padding adds exact zeros to every distance. Distances are summed dimension by
// dimension in fp32 without fused multiply-adds, the order and rounding of the
// CPU encoder, so that both pick the same centroid for the same codebook.
#pragma once

#include "core/cuda_dtype.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <string>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// The widest sub-space the encode and k-means kernels are built for.
inline constexpr int kMaxSupportedDsub = 128;

// Where key rows come from: keys [rows][kv_heads][head_dim] of `dtype`.
struct KeySource {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int kv_heads = 0;
  int head_dim = 0;
};

__device__ __forceinline__ float load_key(const KeySource& src, int64_t i) {
  return gpu::load_as_float(src.data, src.dtype, i);
}

// Dims [j * dsub, (j + 1) * dsub) of KV head `head` of key row `row`.
template <int kMaxDsub>
__device__ __forceinline__ void load_sub(const KeySource& src, int64_t row, int head, int j,
                                         int dsub, float (&x)[kMaxDsub]) {
  const int64_t base = (row * src.kv_heads + head) * src.head_dim + int64_t{j} * dsub;
#pragma unroll
  for (int d = 0; d < kMaxDsub; ++d)
    x[d] = d < dsub ? load_key(src, base + d) : 0.0f;
}

// Copies the ksub x dsub centroids at `centroids` into shared memory as
// [ksub][kMaxDsub], zero padded. Call with the whole block; ends with a barrier.
template <int kMaxDsub>
__device__ __forceinline__ void stage_centroids(const float* centroids, int ksub, int dsub,
                                                float* smem) {
  for (int i = threadIdx.x; i < ksub * kMaxDsub; i += blockDim.x) {
    const int c = i / kMaxDsub;
    const int d = i % kMaxDsub;
    smem[i] = d < dsub ? centroids[c * dsub + d] : 0.0f;
  }
  __syncthreads();
}

struct Nearest {
  int code;
  float distance;  // squared L2
};

// The lowest-index centroid of the smallest squared distance to x.
template <int kMaxDsub>
__device__ __forceinline__ Nearest nearest_centroid(const float (&x)[kMaxDsub], const float* smem,
                                                    int ksub) {
  Nearest best{0, FLT_MAX};
  for (int c = 0; c < ksub; ++c) {
    const float4* row = reinterpret_cast<const float4*>(smem + c * kMaxDsub);
    float dist = 0.0f;
#pragma unroll
    for (int d4 = 0; d4 < kMaxDsub / 4; ++d4) {
      const float4 v = row[d4];
      const float e0 = x[4 * d4 + 0] - v.x;
      const float e1 = x[4 * d4 + 1] - v.y;
      const float e2 = x[4 * d4 + 2] - v.z;
      const float e3 = x[4 * d4 + 3] - v.w;
      dist = __fadd_rn(dist, __fmul_rn(e0, e0));
      dist = __fadd_rn(dist, __fmul_rn(e1, e1));
      dist = __fadd_rn(dist, __fmul_rn(e2, e2));
      dist = __fadd_rn(dist, __fmul_rn(e3, e3));
    }
    if (dist < best.distance) best = {c, dist};
  }
  return best;
}

// Runs f.template operator()<kMaxDsub>() (returning Status) with the smallest
// bound that holds dsub: the fixed list of instantiations of these kernels.
template <class F>
Status dispatch_dsub(int dsub, F&& f) {
  if (dsub <= 8) return f.template operator()<8>();
  if (dsub <= 16) return f.template operator()<16>();
  if (dsub <= 32) return f.template operator()<32>();
  if (dsub <= 64) return f.template operator()<64>();
  if (dsub <= kMaxSupportedDsub) return f.template operator()<kMaxSupportedDsub>();
  return Status::unimplemented("PQ sub-spaces wider than " + std::to_string(kMaxSupportedDsub) +
                               " dims (dsub=" + std::to_string(dsub) +
                               ") are not built for the GPU; use more sub-spaces");
}

}  // namespace pqkv::index::cuda
