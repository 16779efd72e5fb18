#include "model/cuda/causal_attention.cuh"

#include <cfloat>

#include "core/cuda_check.h"
#include "model/cuda/block_reduce.cuh"

namespace pqkv::model::cuda {
namespace {

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
