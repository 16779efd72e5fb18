#include "index/cuda/pq_encode.cuh"

#include <algorithm>

#include "core/cuda_check.h"

namespace pqkv::index::cuda {
namespace {

constexpr int kEncodeThreads = 128;

// One thread per row; grid.y walks the (KV head, sub-space) pairs, whose
// centroids a block stages in shared memory once.
template <int kMaxDsub>
__global__ void __launch_bounds__(kEncodeThreads) encode_kernel(EncodeArgs a) {
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  __shared__ double block_objective;
  const int p = blockIdx.y;
  const int head = p / a.geo.m;
  const int j = p % a.geo.m;
  const int dsub = a.geo.dsub();
  stage_centroids<kMaxDsub>(a.centroids + int64_t{p} * a.geo.ksub * dsub, a.geo.ksub, dsub, smem);
  if (threadIdx.x == 0) block_objective = 0.0;
  __syncthreads();

  const int64_t row = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  float distance = 0.0f;
  if (row < a.n) {
    float x[kMaxDsub];
    load_sub<kMaxDsub>(a.keys, row, head, j, dsub, x);
    const Nearest best = nearest_centroid<kMaxDsub>(x, smem, a.geo.ksub);
    distance = best.distance;
    if (a.codes != nullptr) {
      const int64_t first =
          a.first_token + (a.first_position != nullptr ? *a.first_position : int64_t{0});
      const int64_t token = first + row;
      if (a.first_position == nullptr || token < a.max_tokens)
        a.codes[head * a.head_stride + token * a.geo.m + j] = static_cast<uint8_t>(best.code);
    }
  }
  if (a.objective != nullptr) {
    double sum = distance;
    for (int offset = 16; offset > 0; offset /= 2)
      sum += __shfl_down_sync(~0u, sum, offset);
    if (threadIdx.x % 32 == 0) atomicAdd(&block_objective, sum);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&a.objective[p], block_objective);
  }
}

}  // namespace

Status launch_encode(const EncodeArgs& args, cudaStream_t stream) {
  if (args.n == 0) return ok_status();
  return dispatch_dsub(args.geo.dsub(), [&]<int kMaxDsub>() -> Status {
    const size_t smem = size_t{4} * args.geo.ksub * kMaxDsub;
    if (smem > 48 * 1024) {
      PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(encode_kernel<kMaxDsub>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem)));
    }
    const dim3 grid(static_cast<unsigned>((args.n + kEncodeThreads - 1) / kEncodeThreads),
                    static_cast<unsigned>(args.geo.kv_heads * args.geo.m));
    encode_kernel<kMaxDsub><<<grid, kEncodeThreads, smem, stream>>>(args);
    PQKV_CUDA_CHECK_LAUNCH();
    return ok_status();
  });
}

}  // namespace pqkv::index::cuda
