// The multi-kernel search's pipeline, shared by the one-stage searches
// (pq_search.cu) and two-stage selection's rerank (rerank_search.cu): score
// sources, the softmax-statistics, score, radix, count and write kernels, and
// run_scans that launches them (pq_search.cuh describes the passes). Device
// code only; everything here is a template or inline, in namespace `scan`.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "index/cuda/pq_search.cuh"
#include "index/cuda/search_select.cuh"
#include "index/cuda/sq_scan.cuh"
#include "index/cuda/sq_tile_scores.cuh"

namespace pqkv::index::cuda::scan {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCountersPerHead = 4;
// Counters of the last-block-done pattern, one per scan kernel.
constexpr int kStatsCounter = 0;
constexpr int kScoreCounter = 1;
constexpr int kRadixCounter = 2;  // + pass - 1
// Scan blocks per SM, over all KV heads.
constexpr int kScanBlocksPerSm = 4;
// Tokens each thread scores per loop trip, their code loads in flight together.
constexpr int kScanUnroll = 2;

// Where a scan is: tokens [begin, end) of every KV head, block b of a head
// taking [begin + b * chunk, begin + (b + 1) * chunk).
struct ScanParams {
  int64_t begin;
  int64_t end;
  int64_t chunk;
  int blocks;
  int spread;  // blocks a range is spread over at most (chunk_for)
  int group;
  float scale_log2;  // log2(e) / sqrt(head_dim): softmax in base 2
  uint32_t k;
  bool take_max;
  const DeviceSearchRange* range;  // device-side begin, end and k, or null
};

// Tokens per block for `count` tokens spread over at most `spread` blocks:
// whole tiles of kThreads. The host and the device-side counts use the same
// split, so the same range gives the same blocks' partial results.
__host__ __device__ __forceinline__ int64_t chunk_for(int64_t count, int spread) {
  const int64_t tiles = (count + kThreads - 1) / kThreads;
  return (tiles + spread - 1) / spread * kThreads;
}

// Reads device-side counts into `p` (blocks past the range then find it
// empty); false when there is nothing to select, and the kernel exits.
__device__ __forceinline__ bool resolve_range(ScanParams& p) {
  if (p.range == nullptr) return true;
  const DeviceSearchRange r = *p.range;
  p.begin = r.begin;
  p.end = max(r.begin, r.end);
  const int64_t count = p.end - p.begin;
  const int64_t k = min(max(r.k, int64_t{0}), count);
  p.k = static_cast<uint32_t>(k);
  if (k == 0) return false;
  p.chunk = chunk_for(count, p.spread);
  return true;
}

// ---- score sources: raw q.k scores of the heads of one KV head for token t ----

template <class Code>
struct PqSource {
  const Code* codes;
  const float* lut;  // global [kv][m][ksub][kGroupPad]
  int64_t head_stride;
  int m;
  int ksub;

  template <int kGroupPad>
  size_t smem_bytes() const {
    return sizeof(float) * m * ksub * kGroupPad;
  }
  // Stages this KV head's LUTs in shared memory; ends with a barrier.
  template <int kGroupPad>
  __device__ void prepare(int kv, float* smem) const {
    const int n4 = m * ksub * kGroupPad / 4;
    const float4* src = reinterpret_cast<const float4*>(lut) + int64_t{kv} * n4;
    for (int i = threadIdx.x; i < n4; i += blockDim.x)
      reinterpret_cast<float4*>(smem)[i] = src[i];
    __syncthreads();
  }
  // Raw scores of kTok tokens at once (their code loads in flight together),
  // summed over sub-spaces in order, as the CPU reference does.
  template <int kGroupPad, int kTok>
  __device__ __forceinline__ void scores(int kv, const int64_t (&t)[kTok], const float* smem,
                                         float (&s)[kTok][kGroupPad]) const {
#pragma unroll
    for (int i = 0; i < kTok; ++i) {
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g)
        s[i][g] = 0.0f;
    }
    const Code* head = codes + kv * head_stride;
    for (int j = 0; j < m; ++j) {
      int c[kTok];
#pragma unroll
      for (int i = 0; i < kTok; ++i)
        c[i] = static_cast<int>(head[t[i] * m + j]);
#pragma unroll
      for (int i = 0; i < kTok; ++i) {
        const float4* e = reinterpret_cast<const float4*>(smem + (j * ksub + c[i]) * kGroupPad);
#pragma unroll
        for (int g4 = 0; g4 < kGroupPad / 4; ++g4) {
          const float4 v = e[g4];
          s[i][4 * g4 + 0] += v.x;
          s[i][4 * g4 + 1] += v.y;
          s[i][4 * g4 + 2] += v.z;
          s[i][4 * g4 + 3] += v.w;
        }
      }
    }
  }
};

struct DenseSource {
  const float* raw;  // [q_heads][end - begin]
  int64_t stride;
  int64_t begin;
  int group;

  template <int kGroupPad>
  size_t smem_bytes() const {
    return 0;
  }
  template <int kGroupPad>
  __device__ void prepare(int, float*) const {}
  template <int kGroupPad, int kTok>
  __device__ __forceinline__ void scores(int kv, const int64_t (&t)[kTok], const float*,
                                         float (&s)[kTok][kGroupPad]) const {
#pragma unroll
    for (int i = 0; i < kTok; ++i) {
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        s[i][g] = g < group ? raw[(int64_t{kv} * group + g) * stride + (t[i] - begin)] : 0.0f;
      }
    }
  }
};

// ---- small device helpers ----

__device__ __forceinline__ void block_range(const ScanParams& p, int64_t* t0, int64_t* t1) {
  *t0 = p.begin + blockIdx.x * p.chunk;
  *t1 = min(p.end, *t0 + p.chunk);
}

// True in every thread of the last block of KV head `kv` to reach this point;
// the block's global writes are visible to that block. Call with the whole
// block. One fence per block: after the barrier, thread 0's fence is
// cumulative over the writes of the block's other threads.
__device__ __forceinline__ bool last_block_done(uint32_t* counter, int blocks) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(counter, 1u) == static_cast<uint32_t>(blocks - 1);
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Adds one to bin `bin` of a shared histogram, one atomic per distinct bin in
// the warp (scores crowd into few top-bit buckets).
__device__ __forceinline__ void add_to_bin(uint32_t* hist, uint32_t bin, bool active) {
  const unsigned lanes = __ballot_sync(~0u, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(lanes, bin);
  if ((threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// The end of a stats pass, once warp_parts[w][g] holds warp w's softmax of
// head g: the block's partial goes to global memory, and the last block of
// the KV head combines every block's into each head's log-sum-exp.
template <int kGroupPad>
__device__ void finish_stats(const Softmax2 (&warp_parts)[kWarps][kGroupPad], const ScanParams& p,
                             const SearchWorkspaceView& ws, int kv) {
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float2* partial = ws.partial + int64_t{kv} * kMaxScanBlocks * kGroupPad;
  if (threadIdx.x < kGroupPad) {
    Softmax2 v = warp_parts[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w)
      v = combine(v, warp_parts[w][threadIdx.x]);
    partial[blockIdx.x * kGroupPad + threadIdx.x] = make_float2(v.max, v.sum);
  }
  if (!last_block_done(&ws.counters[kv * kCountersPerHead + kStatsCounter], p.blocks)) return;
  if (warp < kGroupPad) {
    Softmax2 v{-INFINITY, 0.0f};
    for (int b = lane; b < p.blocks; b += 32) {
      const float2 part = __ldcg(&partial[b * kGroupPad + warp]);
      v = combine(v, {part.x, part.y});
    }
    v = warp_combine(v);
    if (lane == 0) ws.lse[kv * kGroupPad + warp] = v.max + log2f(v.sum);
  }
}

// The end of a score pass: the block's histogram goes to global memory, and
// the last block of the KV head finds the bucket of the k-th best score.
__device__ inline void finish_scores(const uint32_t* hist, const ScanParams& p,
                                     const SearchWorkspaceView& ws, int kv) {
  uint32_t* global_hist = ws.hist + int64_t{kv} * kHistPerHead;
  flush_hist(hist, global_hist, kBins);
  if (!last_block_done(&ws.counters[kv * kCountersPerHead + kScoreCounter], p.blocks)) return;
  select_bucket<kBins, kThreads>(global_hist, 21, true, p.k, &ws.state[kv]);
}

// A token's aggregated score over the GQA group from its raw scores: each
// head's softmax probability, summed over the group (or their maximum).
template <int kGroupPad>
__device__ __forceinline__ float aggregate(const float (&s)[kGroupPad],
                                           const float (&lse)[kGroupPad], const ScanParams& p) {
  float agg = 0.0f;
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    if (g < p.group) {
      const float prob = exp2f(s[g] * p.scale_log2 - lse[g]);
      agg = p.take_max ? fmaxf(agg, prob) : agg + prob;
    }
  }
  return agg;
}

// ---- kernels ----

// Centroids per LUT block: one block per (KV head, sub-space, slice of them).
constexpr int kLutCentroids = 64;

// LUT entries of one (KV head, sub-space) and kLutCentroids centroids for every
// query head of the group, from centroids and queries staged in shared memory
// (rows padded by one float against bank conflicts). Also clears `zero`.
template <int kGroupPad>
__global__ void __launch_bounds__(kThreads)
    lut_kernel(SearchShape shape, const void* queries, DType dtype, const float* centroids,
               float* lut, uint32_t* zero, int zero_words) {
  extern __shared__ float4 smem_raw[];
  const int blocks = gridDim.x * gridDim.y;
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  for (int i = block * blockDim.x + threadIdx.x; i < zero_words; i += blocks * blockDim.x) {
    zero[i] = 0;
  }
  const int group = shape.q_heads / shape.kv_heads;
  const int dsub = shape.head_dim / shape.m;
  const int row = dsub + 1;
  const int kv = blockIdx.x / shape.m;
  const int j = blockIdx.x % shape.m;
  const int c0 = blockIdx.y * kLutCentroids;
  const int centroids_here = min(kLutCentroids, shape.ksub - c0);
  float* cent = reinterpret_cast<float*>(smem_raw);  // [kLutCentroids][row]
  float* q = cent + kLutCentroids * row;             // [group][row]
  const float* src = centroids + ((int64_t{kv} * shape.m + j) * shape.ksub + c0) * dsub;
  for (int i = threadIdx.x; i < centroids_here * dsub; i += blockDim.x) {
    cent[(i / dsub) * row + i % dsub] = src[i];
  }
  for (int i = threadIdx.x; i < group * dsub; i += blockDim.x) {
    const int g = i / dsub;
    const int64_t at = int64_t{kv * group + g} * shape.head_dim + j * dsub + i % dsub;
    q[g * row + i % dsub] = gpu::load_as_float(queries, dtype, at);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < centroids_here * group; e += blockDim.x) {
    const int c = e / group;
    const int g = e % group;
    const float* x = q + g * row;
    const float* y = cent + c * row;
    float dot = 0.0f;  // in order and unfused, as the CPU reference
    for (int d = 0; d < dsub; ++d)
      dot = __fadd_rn(dot, __fmul_rn(x[d], y[d]));
    lut[((int64_t{kv} * shape.m + j) * shape.ksub + c0 + c) * kGroupPad + g] = dot;
  }
}

template <class Source, int kGroupPad>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(Source src, ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  __shared__ Softmax2 warp_parts[kWarps][kGroupPad];
  const int kv = blockIdx.y;
  src.template prepare<kGroupPad>(kv, smem);
  Softmax2 acc[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g)
    acc[g] = {-INFINITY, 0.0f};
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  for (int64_t base = t0 + threadIdx.x; base < t1; base += kThreads * kScanUnroll) {
    int64_t t[kScanUnroll];
    bool valid[kScanUnroll];
#pragma unroll
    for (int i = 0; i < kScanUnroll; ++i) {
      valid[i] = base + i * kThreads < t1;
      t[i] = valid[i] ? base + i * kThreads : base;
    }
    float s[kScanUnroll][kGroupPad];
    src.template scores<kGroupPad>(kv, t, smem, s);
#pragma unroll
    for (int i = 0; i < kScanUnroll; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g)
        add_to_softmax(acc[g], s[i][g] * p.scale_log2);
    }
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    const Softmax2 v = warp_combine(acc[g]);
    if (lane == 0) warp_parts[warp][g] = v;
  }
  finish_stats<kGroupPad>(warp_parts, p, ws, kv);
}

template <class Source, int kGroupPad>
__global__ void __launch_bounds__(kThreads)
    score_kernel(Source src, ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  __shared__ uint32_t hist[kBins];
  const int kv = blockIdx.y;
  for (int b = threadIdx.x; b < kBins; b += kThreads)
    hist[b] = 0;
  src.template prepare<kGroupPad>(kv, smem);
  __syncthreads();  // the histogram is cleared (dense sources stage nothing)
  float lse[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g)
    lse[g] = ws.lse[kv * kGroupPad + g];
  uint32_t* scores = ws.scores + kv * ws.score_stride;
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  // Whole warps iterate together so that the histogram can aggregate per warp.
  for (int64_t base = t0; base < t1; base += kThreads * kScanUnroll) {
    int64_t t[kScanUnroll];
    bool valid[kScanUnroll];
#pragma unroll
    for (int i = 0; i < kScanUnroll; ++i) {
      const int64_t at = base + i * kThreads + threadIdx.x;
      valid[i] = at < t1;
      t[i] = valid[i] ? at : t0;
    }
    float s[kScanUnroll][kGroupPad];
    src.template scores<kGroupPad>(kv, t, smem, s);
#pragma unroll
    for (int i = 0; i < kScanUnroll; ++i) {
      uint32_t bits = 0;
      if (valid[i]) {
        bits = __float_as_uint(aggregate<kGroupPad>(s[i], lse, p));
        scores[t[i] - p.begin] = bits;
      }
      add_to_bin(hist, bits >> 21, valid[i]);
    }
  }
  finish_scores(hist, p, ws, kv);
}

// Runs f(tile, scores) for the tiles of 16 tokens of [t0, t1) that this
// warp takes (w, w + kWarps, ...), two tiles at a time, the next two tiles'
// code rows loaded while the current ones are scored. Whole warps call f.
template <class Tile, class F>
__device__ __forceinline__ void for_each_tile(const Tile& src, int kv, int64_t t0, int64_t t1,
                                              const typename Tile::Fragments& frag,
                                              const float* smem, F&& f) {
  constexpr int kStride = kWarps * kTileTokens;
  const int warp = threadIdx.x / 32;
  typename Tile::Rows rows[2];
  typename Tile::Rows next[2];
  int64_t base = t0 + warp * kTileTokens;
  if (base >= t1) return;
  src.load(kv, base, t1, t0, &rows[0]);
  src.load(kv, base + kStride, t1, t0, &rows[1]);
  for (; base < t1; base += 2 * kStride) {
    const int64_t ahead = base + 2 * kStride;
    if (ahead < t1) {
      src.load(kv, ahead, t1, t0, &next[0]);
      src.load(kv, ahead + kStride, t1, t0, &next[1]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t tile = base + i * kStride;
      if (tile >= t1) break;
      float s[Tile::kNt][4];
      src.scores(rows[i], frag, smem, s);
      f(tile, s);
    }
    rows[0] = next[0];
    rows[1] = next[1];
  }
}

// The two scans over tiles of 16 tokens scored by a warp on tensor cores
// (SqTileSource, sq_tile_scores.cuh): the same softmax statistics, scores,
// histogram and block split as stats_kernel and score_kernel.
template <class Tile, int kGroupPad>
__global__ void __launch_bounds__(kThreads)
    stats_tile_kernel(Tile src, ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  __shared__ Softmax2 warp_parts[kWarps][kGroupPad];
  const int kv = blockIdx.y;
  src.prepare(kv, smem);
  typename Tile::Fragments frag;
  src.load_fragments(smem, &frag);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  // Lanes of quad 0 and 1 own heads nt * 4 + 2 * quad + e (quads 2 and 3 hold copies).
  Softmax2 acc[Tile::kNt][2];
#pragma unroll
  for (int nt = 0; nt < Tile::kNt; ++nt) {
    acc[nt][0] = {-INFINITY, 0.0f};
    acc[nt][1] = {-INFINITY, 0.0f};
  }
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  for_each_tile(src, kv, t0, t1, frag, smem, [&](int64_t tile, const float(&s)[Tile::kNt][4]) {
    if (quad >= 2) return;
    const bool first = tile + lane / 4 < t1;
    const bool second = tile + lane / 4 + 8 < t1;
#pragma unroll
    for (int nt = 0; nt < Tile::kNt; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (first) add_to_softmax(acc[nt][e], s[nt][e] * p.scale_log2);
        if (second) add_to_softmax(acc[nt][e], s[nt][2 + e] * p.scale_log2);
      }
    }
  });
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    const bool owner = quad == (g % 4) / 2;
    const Softmax2 v = warp_combine(owner ? acc[g / 4][g % 2] : Softmax2{-INFINITY, 0.0f});
    if (lane == 0) warp_parts[warp][g] = v;
  }
  finish_stats<kGroupPad>(warp_parts, p, ws, kv);
}

template <class Tile, int kGroupPad>
__global__ void __launch_bounds__(kThreads)
    score_tile_kernel(Tile src, ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  __shared__ uint32_t hist[kBins];
  const int kv = blockIdx.y;
  for (int b = threadIdx.x; b < kBins; b += kThreads)
    hist[b] = 0;
  src.prepare(kv, smem);  // ends with a barrier: the histogram is cleared too
  typename Tile::Fragments frag;
  src.load_fragments(smem, &frag);
  float lse[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g)
    lse[g] = ws.lse[kv * kGroupPad + g];
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  uint32_t* scores = ws.scores + kv * ws.score_stride;
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  for_each_tile(src, kv, t0, t1, frag, smem, [&](int64_t tile, const float(&s)[Tile::kNt][4]) {
    // Quad 0 aggregates token lane / 4, quad 1 token lane / 4 + 8: each
    // gathers its token's score of every head from the lane that owns it.
    const int second = quad % 2;
    float mine[kGroupPad];
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      const int owner = (lane & ~3) | ((g % 4) / 2);
      const float of_first = __shfl_sync(~0u, s[g / 4][g % 2], owner);
      const float of_second = __shfl_sync(~0u, s[g / 4][2 + g % 2], owner);
      mine[g] = second ? of_second : of_first;
    }
    const int64_t t = tile + lane / 4 + 8 * second;
    const bool active = quad < 2 && t < t1;
    uint32_t bits = 0;
    if (active) {
      bits = __float_as_uint(aggregate<kGroupPad>(mine, lse, p));
      scores[t - p.begin] = bits;
    }
    add_to_bin(hist, bits >> 21, active);
  });
  finish_scores(hist, p, ws, kv);
}

// Pass 1 histograms bits 20..10 of the scores whose bits 31..21 match; pass 2
// bits 9..0 of those whose bits 31..10 match.
template <int kPass>
__global__ void __launch_bounds__(kThreads) radix_kernel(ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  constexpr int kMatchShift = kPass == 1 ? 21 : 10;
  constexpr int kShift = kPass == 1 ? 10 : 0;
  constexpr int kPassBins = kPass == 1 ? 2048 : 1024;
  __shared__ uint32_t hist[kBins];
  const int kv = blockIdx.y;
  for (int b = threadIdx.x; b < kPassBins; b += kThreads)
    hist[b] = 0;
  __syncthreads();
  const uint32_t want = ws.state[kv].prefix >> kMatchShift;
  const uint32_t* scores = ws.scores + kv * ws.score_stride;
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
    const uint32_t bits = scores[t - p.begin];
    if ((bits >> kMatchShift) == want) atomicAdd(&hist[(bits >> kShift) & (kPassBins - 1)], 1u);
  }
  uint32_t* global_hist = ws.hist + int64_t{kv} * kHistPerHead + kPass * kBins;
  flush_hist(hist, global_hist, kPassBins);
  if (!last_block_done(&ws.counters[kv * kCountersPerHead + kRadixCounter + kPass - 1], p.blocks)) {
    return;
  }
  select_bucket<kPassBins, kThreads>(global_hist, kShift, false, p.k, &ws.state[kv]);
}

// Per block: how many scores beat the k-th best, and how many equal it.
template <int = 0>
__global__ void __launch_bounds__(kThreads) count_kernel(ScanParams p, SearchWorkspaceView ws) {
  if (!resolve_range(p)) return;
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int kv = blockIdx.y;
  const uint32_t threshold = ws.state[kv].prefix;
  const uint32_t* scores = ws.scores + kv * ws.score_stride;
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  uint32_t above = 0;
  uint32_t equal = 0;
  for (int64_t t = t0 + threadIdx.x; t < t1; t += kThreads) {
    const uint32_t bits = scores[t - p.begin];
    above += bits > threshold;
    equal += bits == threshold;
  }
  above = Reduce(storage).Sum(above);
  __syncthreads();
  equal = Reduce(storage).Sum(equal);
  if (threadIdx.x == 0)
    ws.block_counts[kv * kMaxScanBlocks + blockIdx.x] = make_uint2(above, equal);
}

// Writes the selected positions of each block's tokens in position order:
// those above the k-th score, and ties while the tie budget lasts. With
// `candidates` ([kv][end - begin], a rerank's) a pick's position is its
// candidate's.
template <int = 0>
__global__ void __launch_bounds__(kThreads)
    write_kernel(ScanParams p, SearchWorkspaceView ws, int32_t* out, const int32_t* candidates) {
  if (!resolve_range(p)) return;
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } storage;
  const int kv = blockIdx.y;
  const uint32_t threshold = ws.state[kv].prefix;
  const uint32_t ties = ws.state[kv].remaining;
  const uint2* counts = ws.block_counts + kv * kMaxScanBlocks;
  uint32_t above_before = 0;
  uint32_t equal_before = 0;
  for (int b = threadIdx.x; b < blockIdx.x; b += kThreads) {
    above_before += counts[b].x;
    equal_before += counts[b].y;
  }
  above_before = Reduce(storage.reduce).Sum(above_before);
  __syncthreads();
  equal_before = Reduce(storage.reduce).Sum(equal_before);
  __shared__ uint32_t block_before[2];
  if (threadIdx.x == 0) {
    block_before[0] = above_before + min(equal_before, ties);  // positions written before
    block_before[1] = equal_before;                            // ties seen before
  }
  __syncthreads();
  uint32_t written = block_before[0];
  uint32_t ties_seen = block_before[1];
  const uint32_t* scores = ws.scores + kv * ws.score_stride;
  int32_t* row = out + int64_t{kv} * p.k;
  int64_t t0, t1;
  block_range(p, &t0, &t1);
  for (int64_t base = t0; base < t1; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const uint32_t bits = t < t1 ? scores[t - p.begin] : 0u;
    const uint32_t is_equal = t < t1 && bits == threshold;
    uint32_t tie_rank = 0;
    uint32_t tile_ties = 0;
    Scan(storage.scan).ExclusiveSum(is_equal, tie_rank, tile_ties);
    __syncthreads();
    const uint32_t take = t < t1 && (bits > threshold || (is_equal && ties_seen + tie_rank < ties));
    uint32_t slot = 0;
    uint32_t tile_taken = 0;
    Scan(storage.scan).ExclusiveSum(take, slot, tile_taken);
    __syncthreads();
    if (take) {
      row[written + slot] = candidates != nullptr
                                ? candidates[kv * (p.end - p.begin) + (t - p.begin)]
                                : static_cast<int32_t>(t);
    }
    written += tile_taken;
    ties_seen += tile_ties;
  }
}

// A rerank passes its `candidates` ([kv][pool] positions, scan index i of a
// KV head standing for candidates[kv][i]): the score pass then reads the
// log-sum-exp already in ws.lse (the first stage's normaliser) instead of
// computing it, and the picks are written as their candidates' positions.
template <int kGroupPad, class Source>
Status run_scans(const Source& src, const SearchShape& shape, const SelectRequest& r,
                 const SearchWorkspaceView& ws, cudaStream_t stream,
                 const int32_t* candidates = nullptr) {
  ScanParams p{};
  p.begin = r.begin;
  p.end = r.end;
  p.range = r.range;
  const int64_t count = r.end - r.begin;
  // A few blocks per SM over all KV heads: every block pays for staging its
  // LUT and for its share of the histogram and counter traffic.
  int64_t spread = (int64_t{kScanBlocksPerSm} * ws.sm_count + shape.kv_heads - 1) / shape.kv_heads;
  if constexpr (requires { Source::kNt; }) {
    // As many blocks as the GPU holds at once and no more, so that no second
    // wave runs with most SMs idle (the tile kernels take about 80 registers
    // a thread, three blocks an SM).
    spread = int64_t{ws.tile_blocks_per_sm[Source::kOccupancySlot]} * ws.sm_count / shape.kv_heads;
  }
  p.spread = static_cast<int>(std::clamp<int64_t>(spread, 1, kMaxScanBlocks));
  p.chunk = chunk_for(count, p.spread);
  // With device-side counts every block is launched; those past the range idle.
  p.blocks = r.range != nullptr ? p.spread : static_cast<int>((count + p.chunk - 1) / p.chunk);
  p.group = shape.q_heads / shape.kv_heads;
  p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(double(shape.head_dim)));
  p.k = static_cast<uint32_t>(r.k);
  p.take_max = r.aggregation == GqaAggregation::kMax;
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(shape.kv_heads));
  if constexpr (requires { Source::kNt; }) {
    // Tensor-core tiles: their tables take a few KB of shared memory.
    constexpr size_t smem = Source::smem_bytes();
    stats_tile_kernel<Source, kGroupPad><<<grid, kThreads, smem, stream>>>(src, p, ws);
    PQKV_CUDA_CHECK_LAUNCH();
    score_tile_kernel<Source, kGroupPad><<<grid, kThreads, smem, stream>>>(src, p, ws);
    PQKV_CUDA_CHECK_LAUNCH();
  } else {
    const size_t smem = src.template smem_bytes<kGroupPad>();
    if (smem > 40 * 1024) {
      // The score kernel also holds an 8 KB histogram.
      PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(stats_kernel<Source, kGroupPad>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem)));
      PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(score_kernel<Source, kGroupPad>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem)));
    }
    if (candidates == nullptr) {
      stats_kernel<Source, kGroupPad><<<grid, kThreads, smem, stream>>>(src, p, ws);
      PQKV_CUDA_CHECK_LAUNCH();
    }
    score_kernel<Source, kGroupPad><<<grid, kThreads, smem, stream>>>(src, p, ws);
    PQKV_CUDA_CHECK_LAUNCH();
  }
  radix_kernel<1><<<grid, kThreads, 0, stream>>>(p, ws);
  PQKV_CUDA_CHECK_LAUNCH();
  radix_kernel<2><<<grid, kThreads, 0, stream>>>(p, ws);
  PQKV_CUDA_CHECK_LAUNCH();
  count_kernel<><<<grid, kThreads, 0, stream>>>(p, ws);
  PQKV_CUDA_CHECK_LAUNCH();
  write_kernel<><<<grid, kThreads, 0, stream>>>(p, ws, r.out, candidates);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

// Builds each (query head, sub-space) LUT of a PQ scan into ws.lut; the same
// launch clears the selection's histograms and counters.
template <int kGroupPad>
Status launch_pq_tables(const SearchShape& shape, const void* queries, DType query_dtype,
                        const float* centroids, const SearchWorkspaceView& ws,
                        cudaStream_t stream) {
  const int zero_words = shape.kv_heads * (kHistPerHead + kCountersPerHead);
  const int group = shape.q_heads / shape.kv_heads;
  const int row = shape.head_dim / shape.m + 1;
  const size_t smem = sizeof(float) * (kLutCentroids + group) * row;
  const dim3 grid(static_cast<unsigned>(shape.kv_heads * shape.m),
                  static_cast<unsigned>((shape.ksub + kLutCentroids - 1) / kLutCentroids));
  lut_kernel<kGroupPad><<<grid, kThreads, smem, stream>>>(shape, queries, query_dtype, centroids,
                                                          ws.lut, ws.hist, zero_words);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

// Builds the scalar code's per-query tables (launch_sq_tables) and clears the
// selection's histograms and counters.
inline Status launch_sq_tables_and_clear(const SearchShape& shape, int bits, const void* queries,
                                         DType query_dtype, const float* scale, const float* offset,
                                         float* tables, const SearchWorkspaceView& ws,
                                         cudaStream_t stream) {
  SqTablesArgs t;
  t.geo = {shape.kv_heads, shape.head_dim, bits};
  t.q_heads = shape.q_heads;
  t.queries = queries;
  t.query_dtype = query_dtype;
  t.scale = scale;
  t.offset = offset;
  t.tables = tables;
  PQKV_RETURN_IF_ERROR(launch_sq_tables(t, stream));
  const size_t zero_bytes = sizeof(uint32_t) * shape.kv_heads * (kHistPerHead + kCountersPerHead);
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws.hist, 0, zero_bytes, stream));
  return ok_status();
}

inline Status check_group(const SearchShape& shape) {
  if (shape.kv_heads < 1 || shape.q_heads % shape.kv_heads != 0 ||
      shape.q_heads / shape.kv_heads > kMaxGroup) {
    return Status::unimplemented("the GPU search is built for 1.." + std::to_string(kMaxGroup) +
                                 " query heads per KV head, got " + std::to_string(shape.q_heads) +
                                 " query heads over " + std::to_string(shape.kv_heads));
  }
  return ok_status();
}

// Runs f.template operator()<kGroupPad>(): groups of up to 4 heads pad to 4, others to 8.
template <class F>
Status dispatch_group(const SearchShape& shape, F&& f) {
  PQKV_RETURN_IF_ERROR(check_group(shape));
  if (shape.q_heads / shape.kv_heads <= 4) return f.template operator()<4>();
  return f.template operator()<8>();
}

}  // namespace pqkv::index::cuda::scan
#endif
