#include "index/cuda/pq_search.cuh"

#include <algorithm>
#include <string>

#include "core/cuda_check.h"
#include "index/cuda/pq_fused_search.cuh"
#include "index/cuda/scan_pipeline.cuh"
#include "index/cuda/search_select.cuh"
#include "index/cuda/sq_fused_search.cuh"
#include "index/cuda/sq_scan.cuh"
#include "index/cuda/sq_tile_scores.cuh"

namespace pqkv::index::cuda {
using namespace scan;

namespace {

// Blocks of both tensor-core scans of one instantiation that an SM holds at
// once (the smaller of the two kernels' occupancies) on the current device.
template <class Source, int kGroupPad>
Status tile_occupancy(int* out) {
  int stats = 0;
  int score = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &stats, stats_tile_kernel<Source, kGroupPad>, kThreads, Source::smem_bytes()));
  PQKV_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &score, score_tile_kernel<Source, kGroupPad>, kThreads, Source::smem_bytes()));
  out[Source::kOccupancySlot] = std::max(1, std::min(stats, score));
  return ok_status();
}

Status tile_occupancies(int* out) {
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<4, 64, 4>, 4>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<4, 64, 8>, 8>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<4, 128, 4>, 4>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<4, 128, 8>, 8>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<8, 64, 4>, 4>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<8, 64, 8>, 8>(out)));
  PQKV_RETURN_IF_ERROR((tile_occupancy<SqTileSource<8, 128, 4>, 4>(out)));
  return tile_occupancy<SqTileSource<8, 128, 8>, 8>(out);
}

}  // namespace

Result<SearchWorkspace> SearchWorkspace::allocate(int kv_heads, int m, int ksub, int64_t max_tokens,
                                                  cudaStream_t stream) {
  SearchWorkspace w;
  int device = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&w.view_.sm_count, cudaDevAttrMultiProcessorCount, device));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone) {
    PQKV_RETURN_IF_ERROR(tile_occupancies(w.view_.tile_blocks_per_sm));
  }
  const int64_t lut_floats = int64_t{kv_heads} * m * ksub * kMaxGroup;
  const int64_t lse_floats = int64_t{kv_heads} * kMaxGroup;
  PQKV_ASSIGN_OR_RETURN(w.floats_,
                        gpu::DeviceArray<float>::allocate(lut_floats + lse_floats, stream));
  // A multiple of 4 words keeps the histograms after the scores 16-byte aligned.
  const int64_t stride = (std::max<int64_t>(max_tokens, 1) + 3) / 4 * 4;
  const int64_t hist_words = int64_t{kv_heads} * (kHistPerHead + kCountersPerHead);
  const int64_t state_words = int64_t{kv_heads} * 2;
  // The candidate lists start 16-byte aligned (read four at a time): up to 3
  // words of padding after the counts.
  const int64_t fused_words = int64_t{kv_heads} * (kFusedHistPerHead + 3 + kFusedCandidates) + 3;
  const int64_t fused_at = (kv_heads * stride + hist_words + state_words + 3) / 4 * 4;
  PQKV_ASSIGN_OR_RETURN(w.words_,
                        gpu::DeviceArray<uint32_t>::allocate(fused_at + fused_words, stream));
  PQKV_ASSIGN_OR_RETURN(w.partial_, gpu::DeviceArray<float2>::allocate(
                                        int64_t{kv_heads} * kMaxScanBlocks * kMaxGroup, stream));
  PQKV_ASSIGN_OR_RETURN(w.block_counts_, gpu::DeviceArray<uint2>::allocate(
                                             int64_t{kv_heads} * kMaxScanBlocks, stream));
  // LUT padding lanes are read (and ignored) by the scans: keep them finite.
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(w.floats_.get(), 0, w.floats_.bytes(), stream));
  SearchWorkspaceView& v = w.view_;
  v.lut = w.floats_.get();
  v.lse = v.lut + lut_floats;
  v.scores = w.words_.get();
  v.score_stride = stride;
  v.hist = v.scores + kv_heads * stride;
  v.counters = v.hist + int64_t{kv_heads} * kHistPerHead;
  v.state = reinterpret_cast<SelectState*>(v.counters + int64_t{kv_heads} * kCountersPerHead);
  // 16-byte aligned: the bucket choice reads the histograms four bins at a time.
  v.fused_hist = v.scores + fused_at;
  v.fused_barrier = v.fused_hist + int64_t{kv_heads} * kFusedHistPerHead;
  v.fused_candidate_count = v.fused_barrier + int64_t{kv_heads} * 2;
  v.fused_candidates = v.fused_hist + (int64_t{kv_heads} * (kFusedHistPerHead + 3) + 3) / 4 * 4;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(v.fused_hist, 0, sizeof(uint32_t) * fused_words, stream));
  if (capture == cudaStreamCaptureStatusNone) {
    PQKV_RETURN_IF_ERROR(sq_fused_occupancies(v.fused_blocks_per_sm));
    PQKV_RETURN_IF_ERROR(pq_fused_occupancies(v.pq_fused_blocks_per_sm));
  }
  v.partial = w.partial_.get();
  v.block_counts = w.block_counts_.get();
  return std::move(w);
}

Status launch_pq_search(const PqSearchArgs& a, const SearchWorkspaceView& ws, cudaStream_t stream) {
  const SelectRequest& r = a.request;
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  if (a.fused && pq_fused_covers(a, ws)) return launch_pq_fused_search(a, ws, stream);
  return dispatch_group(a.shape, [&]<int kGroupPad>() -> Status {
    PQKV_RETURN_IF_ERROR(
        launch_pq_tables<kGroupPad>(a.shape, a.queries, a.query_dtype, a.centroids, ws, stream));
    if (a.codes != nullptr) {
      const PqSource<uint8_t> src{a.codes, ws.lut, a.head_stride, a.shape.m, a.shape.ksub};
      return run_scans<kGroupPad>(src, a.shape, r, ws, stream);
    }
    const PqSource<int64_t> src{a.codes_int64, ws.lut, a.head_stride, a.shape.m, a.shape.ksub};
    return run_scans<kGroupPad>(src, a.shape, r, ws, stream);
  });
}

Status launch_sq_search(const SqSearchArgs& a, const SearchWorkspaceView& ws, cudaStream_t stream) {
  const SelectRequest& r = a.request;
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  if (a.fused && a.tensor_cores && sq_fused_covers(a, ws))
    return launch_sq_fused_search(a, ws, stream);
  return dispatch_group(a.shape, [&]<int kGroupPad>() -> Status {
    PQKV_RETURN_IF_ERROR(launch_sq_tables_and_clear(a.shape, a.bits, a.queries, a.query_dtype,
                                                    a.scale, a.offset, a.tables, ws, stream));
    const int group = a.shape.q_heads / a.shape.kv_heads;
    if (a.tensor_cores && sq_tile_supported(a.bits, a.shape.head_dim)) {
      const auto tiles = [&]<int kBits, int kHeadDim>() -> Status {
        const SqTileSource<kBits, kHeadDim, kGroupPad> src{a.codes, a.tables, a.head_stride, group};
        return run_scans<kGroupPad>(src, a.shape, r, ws, stream);
      };
      if (a.bits == 4) {
        return a.shape.head_dim == 128 ? tiles.template operator()<4, 128>()
                                       : tiles.template operator()<4, 64>();
      }
      return a.shape.head_dim == 128 ? tiles.template operator()<8, 128>()
                                     : tiles.template operator()<8, 64>();
    }
    const SqSource src{a.codes, a.tables, a.head_stride, a.shape.head_dim, a.bits, group};
    return run_scans<kGroupPad>(src, a.shape, r, ws, stream);
  });
}

Status launch_dense_select(const SearchShape& shape, const float* raw, const SelectRequest& r,
                           const SearchWorkspaceView& ws, cudaStream_t stream) {
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  return dispatch_group(shape, [&]<int kGroupPad>() -> Status {
    const size_t zero_bytes = sizeof(uint32_t) * shape.kv_heads * (kHistPerHead + kCountersPerHead);
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws.hist, 0, zero_bytes, stream));
    const DenseSource src{raw, r.end - r.begin, r.begin, shape.q_heads / shape.kv_heads};
    return run_scans<kGroupPad>(src, shape, r, ws, stream);
  });
}

}  // namespace pqkv::index::cuda
