#include "index/cuda/pq_kmeans.cuh"

#include "core/cuda_check.h"
#include "core/cuda_handles.h"

namespace pqkv::index::cuda {
namespace {

constexpr int kAssignThreads = 128;
constexpr int kUpdateThreads = 256;
// Relative nudge that separates a split cluster's two centroids.
constexpr float kSplitNudge = 1.0f / 1024.0f;

struct KmeansState {
  int32_t* assign = nullptr;      // [problem][n_train], -1 before the first pass
  float* sums = nullptr;          // [problem][ksub][dsub]
  int32_t* counts = nullptr;      // [problem][ksub]
  uint32_t* changes = nullptr;    // [problem]: assignments changed in the last pass
  uint32_t* converged = nullptr;  // [problem]: set once a pass changed nothing
};

__device__ __forceinline__ int64_t training_row(const KmeansArgs& a, int64_t i) {
  return a.train_rows != nullptr ? a.train_rows[i] : i;
}

__global__ void init_kernel(KmeansArgs a) {
  const int p = blockIdx.x;
  const int head = p / a.geo.m;
  const int j = p % a.geo.m;
  const int dsub = a.geo.dsub();
  float* out = a.centroids + int64_t{p} * a.geo.ksub * dsub;
  for (int i = threadIdx.x; i < a.geo.ksub * dsub; i += blockDim.x) {
    const int c = i / dsub;
    const int64_t row = training_row(a, a.init_rows[c]);
    out[i] = load_key(
        a.keys, (row * a.keys.kv_heads + head) * a.keys.head_dim + int64_t{j} * dsub + i % dsub);
  }
}

// Assigns each training row to its nearest centroid and accumulates the
// per-centroid sums of the next update.
template <int kMaxDsub>
__global__ void __launch_bounds__(kAssignThreads) assign_kernel(KmeansArgs a, KmeansState s) {
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  const int p = blockIdx.y;
  if (s.converged[p]) return;
  const int head = p / a.geo.m;
  const int j = p % a.geo.m;
  const int dsub = a.geo.dsub();
  const int ksub = a.geo.ksub;
  stage_centroids<kMaxDsub>(a.centroids + int64_t{p} * ksub * dsub, ksub, dsub, smem);

  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  bool changed = false;
  if (i < a.n_train) {
    float x[kMaxDsub];
    load_sub<kMaxDsub>(a.keys, training_row(a, i), head, j, dsub, x);
    const Nearest best = nearest_centroid<kMaxDsub>(x, smem, ksub);
    int32_t& slot = s.assign[int64_t{p} * a.n_train + i];
    changed = slot != best.code;
    slot = best.code;
    float* sum = s.sums + (int64_t{p} * ksub + best.code) * dsub;
#pragma unroll
    for (int d = 0; d < kMaxDsub; ++d) {
      if (d < dsub) atomicAdd(sum + d, x[d]);
    }
    atomicAdd(&s.counts[p * ksub + best.code], 1);
  }
  const unsigned changed_in_warp = __popc(__ballot_sync(~0u, changed));
  if (threadIdx.x % 32 == 0 && changed_in_warp > 0) atomicAdd(&s.changes[p], changed_in_warp);
}

// New centroids from the sums, empty clusters split off the largest, and the
// accumulators cleared for the next pass. One block per problem.
__global__ void __launch_bounds__(kUpdateThreads) update_kernel(KmeansArgs a, KmeansState s) {
  const int p = blockIdx.x;
  if (s.converged[p]) return;
  if (s.changes[p] == 0) {
    // The centroids are already the means of these assignments: a fixed point.
    if (threadIdx.x == 0) s.converged[p] = 1;
    return;
  }
  const int dsub = a.geo.dsub();
  const int ksub = a.geo.ksub;
  float* centroids = a.centroids + int64_t{p} * ksub * dsub;
  float* sums = s.sums + int64_t{p} * ksub * dsub;
  int32_t* counts = s.counts + p * ksub;
  for (int i = threadIdx.x; i < ksub * dsub; i += blockDim.x) {
    const int count = counts[i / dsub];
    if (count > 0) centroids[i] = sums[i] / static_cast<float>(count);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int c = 0; c < ksub; ++c) {
      if (counts[c] != 0) continue;
      int big = 0;
      for (int o = 1; o < ksub; ++o) {
        if (counts[o] > counts[big]) big = o;
      }
      if (counts[big] < 2) break;  // nothing left to split
      float* from = centroids + big * dsub;
      float* to = centroids + c * dsub;
      for (int d = 0; d < dsub; ++d) {
        const float sign = d % 2 == 0 ? 1.0f : -1.0f;
        to[d] = from[d] * (1.0f + sign * kSplitNudge);
        from[d] = from[d] * (1.0f - sign * kSplitNudge);
      }
      counts[c] = counts[big] / 2;
      counts[big] -= counts[c];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ksub * dsub; i += blockDim.x)
    sums[i] = 0.0f;
  for (int i = threadIdx.x; i < ksub; i += blockDim.x)
    counts[i] = 0;
  if (threadIdx.x == 0) s.changes[p] = 0;
}

}  // namespace

Status launch_kmeans(const KmeansArgs& args, cudaStream_t stream) {
  const int problems = args.geo.kv_heads * args.geo.m;
  const int dsub = args.geo.dsub();
  init_kernel<<<problems, kUpdateThreads, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  if (args.iters == 0 || args.n_train == 0) return ok_status();

  PQKV_ASSIGN_OR_RETURN(auto assign,
                        gpu::DeviceArray<int32_t>::allocate(problems * args.n_train, stream));
  PQKV_ASSIGN_OR_RETURN(auto sums, gpu::DeviceArray<float>::allocate(
                                       int64_t{problems} * args.geo.ksub * dsub, stream));
  PQKV_ASSIGN_OR_RETURN(
      auto counts, gpu::DeviceArray<int32_t>::allocate(int64_t{problems} * args.geo.ksub, stream));
  PQKV_ASSIGN_OR_RETURN(auto flags, gpu::DeviceArray<uint32_t>::allocate(2 * problems, stream));
  const KmeansState state{assign.get(), sums.get(), counts.get(), flags.get(),
                          flags.get() + problems};
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(assign.get(), 0xff, assign.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sums.get(), 0, sums.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(counts.get(), 0, counts.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flags.get(), 0, flags.bytes(), stream));

  return dispatch_dsub(dsub, [&]<int kMaxDsub>() -> Status {
    const size_t smem = size_t{4} * args.geo.ksub * kMaxDsub;
    if (smem > 48 * 1024) {
      PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(assign_kernel<kMaxDsub>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem)));
    }
    const dim3 grid(static_cast<unsigned>((args.n_train + kAssignThreads - 1) / kAssignThreads),
                    static_cast<unsigned>(problems));
    for (int it = 0; it < args.iters; ++it) {
      assign_kernel<kMaxDsub><<<grid, kAssignThreads, smem, stream>>>(args, state);
      PQKV_CUDA_CHECK_LAUNCH();
      update_kernel<<<problems, kUpdateThreads, 0, stream>>>(args, state);
      PQKV_CUDA_CHECK_LAUNCH();
    }
    return ok_status();
  });
}

}  // namespace pqkv::index::cuda
