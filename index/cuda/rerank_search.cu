// Two-stage selection's rerank on the GPU (pq_search.cuh, launch_rerank):
// the first stage's candidates scored with the rerank code through the
// multi-kernel pipeline (scan_pipeline.cuh), with the first stage's
// log-sum-exp, the picks written as their candidates' positions.
#include "core/cuda_check.h"
#include "index/cuda/pq_search.cuh"
#include "index/cuda/scan_pipeline.cuh"
#include "index/cuda/sq_scan.cuh"

namespace pqkv::index::cuda {
using namespace scan;

namespace {

// The rerank's source (launch_rerank): scan index i of a KV head stands for
// candidate position candidates[kv][i], scored by the wrapped code's source.
template <class Inner>
struct CandidateSource {
  Inner inner;
  const int32_t* candidates;  // [kv][pool]
  int64_t pool;
  const int64_t* device_pool;  // the pool read on the device (DeviceSearchRange::end), or null

  template <int kGroupPad>
  size_t smem_bytes() const {
    return inner.template smem_bytes<kGroupPad>();
  }
  template <int kGroupPad>
  __device__ void prepare(int kv, float* smem) const {
    inner.template prepare<kGroupPad>(kv, smem);
  }
  template <int kGroupPad, int kTok>
  __device__ __forceinline__ void scores(int kv, const int64_t (&t)[kTok], const float* smem,
                                         float (&s)[kTok][kGroupPad]) const {
    const int64_t stride = device_pool != nullptr ? *device_pool : pool;
    const int32_t* row = candidates + kv * stride;
    int64_t at[kTok];
#pragma unroll
    for (int i = 0; i < kTok; ++i)
      at[i] = row[t[i]];
    inner.template scores<kGroupPad>(kv, at, smem, s);
  }
};

__global__ void pool_ranges_kernel(const DeviceSearchRange* in, int64_t candidates,
                                   DeviceSearchRange* out) {
  const DeviceSearchRange r = *in;
  const int64_t end = max(r.begin, r.end);
  const int64_t count = end - r.begin;
  const int64_t k = min(max(r.k, int64_t{0}), count);
  const int64_t pool = min(count, max(k, k * candidates));
  out[0] = DeviceSearchRange{r.begin, end, pool};
  out[1] = DeviceSearchRange{0, pool, k};
}

}  // namespace

Status launch_rerank(const RerankArgs& a, const SearchWorkspaceView& ws, cudaStream_t stream) {
  if (a.k == 0 || a.pool == 0) return ok_status();
  return dispatch_group(a.shape, [&]<int kGroupPad>() -> Status {
    const SelectRequest r{0, a.pool, a.k, a.aggregation, a.out, a.range};
    const int64_t* device_pool = a.range != nullptr ? &a.range->end : nullptr;
    if (a.centroids != nullptr) {
      PQKV_RETURN_IF_ERROR(
          launch_pq_tables<kGroupPad>(a.shape, a.queries, a.query_dtype, a.centroids, ws, stream));
      const CandidateSource<PqSource<uint8_t>> src{
          {a.codes, ws.lut, a.head_stride, a.shape.m, a.shape.ksub},
          a.candidates,
          a.pool,
          device_pool};
      return run_scans<kGroupPad>(src, a.shape, r, ws, stream, a.candidates);
    }
    PQKV_RETURN_IF_ERROR(launch_sq_tables_and_clear(a.shape, a.bits, a.queries, a.query_dtype,
                                                    a.scale, a.offset, a.tables, ws, stream));
    // One thread per candidate (scattered rows: no tensor-core tiles).
    const int group = a.shape.q_heads / a.shape.kv_heads;
    const CandidateSource<SqSource> src{
        {a.codes, a.tables, a.head_stride, a.shape.head_dim, a.bits, group},
        a.candidates,
        a.pool,
        device_pool};
    return run_scans<kGroupPad>(src, a.shape, r, ws, stream, a.candidates);
  });
}

Status launch_pool_ranges(const DeviceSearchRange* in, int candidates, DeviceSearchRange* out,
                          cudaStream_t stream) {
  pool_ranges_kernel<<<1, 1, 0, stream>>>(in, candidates, out);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::index::cuda
