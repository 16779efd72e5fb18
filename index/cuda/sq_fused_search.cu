#include "index/cuda/sq_fused_search.cuh"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "index/cuda/search_select.cuh"
#include "index/cuda/sq_tile_scores.cuh"

namespace pqkv::index::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The radix passes' lowest bits: 30..20, 19..10, 9..0 (bit 31, the sign, is 0).
constexpr int kShift0 = 20;
constexpr int kShift1 = 10;
// Two blocks an SM: 16 warps keep enough code loads in flight, and each
// block gets about 100 KB of shared memory for its raw scores.
constexpr int kBlocksPerSm = 2;
constexpr size_t kSmemBytes = 100 * 1024;

struct FusedParams {
  const void* queries;  // [q_heads][head_dim]
  DType query_dtype;
  const float* scale;   // [kv][head_dim]
  const float* offset;  // [kv][head_dim]
  int64_t begin;
  int64_t end;
  uint32_t k;
  const DeviceSearchRange* range;  // device-side begin, end and k, or null
  int blocks;                      // per KV head
  int capacity;                    // tokens whose raw scores a block keeps
  uint32_t candidate_cap;          // candidates a block holds past its scores
  int group;
  float scale_log2;  // log2(e) / sqrt(head_dim)
  bool take_max;
  int32_t* out;  // [kv][k]
};

template <int kBits, int kHeadDim, int kGroupPad>
using Tile = SqTileSource<kBits, kHeadDim, kGroupPad>;

// Floats of the staged tables, rounded to 16 bytes; the raw scores follow.
template <class T>
__host__ __device__ constexpr int table_floats() {
  return static_cast<int>((T::smem_bytes() / sizeof(float) + 3) / 4 * 4);
}

// Tokens of raw scores a block keeps for `group` heads, in whole tiles.
template <class T>
int capacity_of(int group) {
  const size_t bytes = kSmemBytes - sizeof(float) * table_floats<T>();
  return static_cast<int>(bytes / (sizeof(float) * group) / kTileTokens * kTileTokens);
}

// Tokens per block for `count` tokens over `blocks` blocks, in whole tiles;
// the host's check and the device-side counts use the same split.
__host__ __device__ __forceinline__ int64_t fused_chunk(int64_t count, int blocks) {
  const int64_t tiles = (count + kTileTokens - 1) / kTileTokens;
  return (tiles + blocks - 1) / blocks * kTileTokens;
}

// Waits until every block of a KV head has arrived (a sense-reversing
// barrier: bar[0] counts arrivals and is reset by the last block, which then
// bumps the generation bar[1]). Every block's global writes before it are
// visible after it to loads that bypass L1 (__ldcg).
__device__ __forceinline__ void kv_barrier(uint32_t* bar, int blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile uint32_t* generation = bar + 1;
    const uint32_t seen = *generation;
    __threadfence();
    if (atomicAdd(bar, 1u) == static_cast<uint32_t>(blocks - 1)) {
      atomicExch(bar, 0u);
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      while (*generation == seen) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// One to bin `bin` of a shared histogram: a single atomic when the warp's
// active lanes share the bin (runs of equal scores), else one per lane.
__device__ __forceinline__ void add_to_bin(uint32_t* hist, uint32_t bin, bool active) {
  const unsigned lanes = __ballot_sync(~0u, active);
  const uint32_t lead = __shfl_sync(~0u, bin, lanes == 0 ? 0 : __ffs(lanes) - 1);
  const unsigned same = __ballot_sync(~0u, active && bin == lead);
  if (!active) return;
  if (same == lanes) {
    if ((threadIdx.x % 32) == __ffs(lanes) - 1) atomicAdd(&hist[bin], __popc(lanes));
  } else {
    atomicAdd(&hist[bin], 1u);
  }
}

// Zeroes this block's share of a global histogram that every block of the KV
// head has read (they have all passed a barrier since).
__device__ __forceinline__ void clear_share(uint32_t* hist, int bins, int blocks) {
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < bins; i += blocks * kThreads)
    hist[i] = 0;
}

// The group's tables as launch_sq_tables makes them (q[c] * scale[c], then
// the offset term summed in channel order, unfused), staged as
// SqTileSource::prepare stages them; `scratch` holds group * head_dim floats.
// How many of the block's keys[0, n) have bits >> shift above and equal to
// `want`, in thread 0 (zeros elsewhere). Called by the whole block; it
// synchronises the block once.
__device__ __forceinline__ uint2 block_counts_against(const uint32_t* keys, int n, int shift,
                                                      uint32_t want, uint2* warp_counts) {
  uint32_t above = 0;
  uint32_t equal = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint32_t top = keys[i] >> shift;
    above += top > want;
    equal += top == want;
  }
  above = __reduce_add_sync(~0u, above);
  equal = __reduce_add_sync(~0u, equal);
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = make_uint2(above, equal);
  __syncthreads();
  uint2 total = make_uint2(0, 0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) {
      total.x += warp_counts[w].x;
      total.y += warp_counts[w].y;
    }
  }
  return total;
}

template <class T, int kHeadDim>
__device__ void stage_tables(const FusedParams& p, int kv, float* smem, float* scratch) {
  constexpr int kTableFloats = table_floats<T>();
  for (int i = threadIdx.x; i < kTableFloats; i += kThreads)
    smem[i] = 0.0f;
  __syncthreads();
  for (int i = threadIdx.x; i < p.group * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim;
    const int c = i % kHeadDim;
    const float x =
        gpu::load_as_float(p.queries, p.query_dtype, int64_t{kv * p.group + g} * kHeadDim + c);
    smem[g * T::kRow + c] = __fmul_rn(x, p.scale[kv * kHeadDim + c]);
    scratch[i] = __fmul_rn(x, p.offset[kv * kHeadDim + c]);
  }
  __syncthreads();
  if (threadIdx.x < p.group) {
    float bias = 0.0f;
    for (int c = 0; c < kHeadDim; ++c)
      bias = __fadd_rn(bias, scratch[threadIdx.x * kHeadDim + c]);
    smem[threadIdx.x * T::kRow + kHeadDim] = bias;
  }
  __syncthreads();
  T::scale_tables(smem);
}

template <int kBits, int kHeadDim, int kGroupPad>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fused_search_kernel(Tile<kBits, kHeadDim, kGroupPad> src, FusedParams p,
                        SearchWorkspaceView ws) {
  using T = Tile<kBits, kHeadDim, kGroupPad>;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  constexpr int kTableFloats = table_floats<T>();
  float* raw = smem + kTableFloats;  // [group][capacity] raw scores, then aggregated bits
  uint32_t* keys = reinterpret_cast<uint32_t*>(raw);
  __shared__ __align__(16) uint32_t hist[kBins];  // read four bins at a time
  __shared__ Softmax2 warp_parts[kWarps][kGroupPad];
  __shared__ float lse_shared[kGroupPad];
  __shared__ SelectState state;
  __shared__ uint32_t cand_slots[2];      // first slot in the list, slots taken
  __shared__ uint2 warp_counts[kWarps];   // (above, equal) the k-th score per warp
  __shared__ uint2 before_parts[kWarps];  // the same over the blocks before, in parts

  // The range: the same in every block, so all of them return here or none.
  int64_t begin = p.begin;
  int64_t end = p.end;
  uint32_t k = p.k;
  if (p.range != nullptr) {
    const DeviceSearchRange r = *p.range;
    begin = r.begin;
    end = max(r.begin, r.end);
    k = static_cast<uint32_t>(min(max(r.k, int64_t{0}), end - begin));
  }
  if (k == 0) return;
  const int kv = blockIdx.y;
  const int b = blockIdx.x;
  const int64_t chunk = fused_chunk(end - begin, p.blocks);
  // Device-side counts past the largest range the launch was sized for would
  // overrun the shared memory: a broken caller contract, stopped loudly.
  if (chunk > p.capacity) __trap();
  const int64_t t0 = begin + b * chunk;
  const int64_t t1 = min(end, t0 + chunk);
  const int n_local = static_cast<int>(max(int64_t{0}, t1 - t0));
  uint32_t* bar = ws.fused_barrier + 2 * kv;
  uint32_t* global_hist = ws.fused_hist + int64_t{kv} * kHistPerHead;
  // The running count of candidates of the KV head, read before any block
  // adds to it (after the second barrier).
  uint32_t* count_of_kv = ws.fused_candidate_count + kv;
  const uint32_t count_base = __ldcg(count_of_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;

  // The first code rows are in flight while the tables are staged.
  constexpr int kStride = kWarps * kTileTokens;
  typename T::Rows rows[2];
  typename T::Rows next[2];
  int64_t base = t0 + warp * kTileTokens;
  if (base < t1) {
    src.load(kv, base, t1, t0, &rows[0]);
    src.load(kv, base + kStride, t1, t0, &rows[1]);
  }
  for (int i = threadIdx.x; i < kBins; i += kThreads)
    hist[i] = 0;
  stage_tables<T, kHeadDim>(p, kv, smem, raw);
  typename T::Fragments frag;
  src.template load_fragments<true>(smem, &frag);

  // 1. Dot products of the block's tokens, kept in shared memory: a lane
  //    holds head nt * 4 + quad of two tokens of a tile. The loop does no
  //    more than that, as its instructions, not the code bytes, bound it.
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
      float d[T::kNt][2];
      src.paired_dots(rows[i], frag, d);
      const int at = static_cast<int>(tile - t0) + lane / 4;
#pragma unroll
      for (int nt = 0; nt < T::kNt; ++nt) {
        const int head = nt * 4 + quad;
        if (head < p.group) {
          raw[head * p.capacity + at] = d[nt][0];
          raw[head * p.capacity + at + 8] = d[nt][1];
        }
      }
    }
    rows[0] = next[0];
    rows[1] = next[1];
  }
  __syncthreads();
  // The scores in log2 units, y = (offset term + dot * unscale) * log2(e) /
  // sqrt(head_dim) with SqTileSource::scores' arithmetic, in place, and each
  // head's softmax statistics.
  {
    Softmax2 acc[kGroupPad];
    float bias[kGroupPad];
    float unscale[kGroupPad];
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      acc[g] = {-INFINITY, 0.0f};
      bias[g] = smem[g * T::kRow + kHeadDim];
      unscale[g] = smem[T::kUnscale + g];
    }
    for (int i = threadIdx.x; i < n_local; i += kThreads) {
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        if (g >= p.group) break;
        float& x = raw[g * p.capacity + i];
        const float y = __fadd_rn(bias[g], x * unscale[g]) * p.scale_log2;
        x = y;
        add_to_softmax(acc[g], y);
      }
    }
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      const Softmax2 v = warp_combine(acc[g]);
      if (lane == 0) warp_parts[warp][g] = v;
    }
  }
  __syncthreads();
  float2* partial = ws.partial + int64_t{kv} * kMaxScanBlocks * kGroupPad;
  if (threadIdx.x < kGroupPad) {
    Softmax2 v = warp_parts[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w)
      v = combine(v, warp_parts[w][threadIdx.x]);
    partial[b * kGroupPad + threadIdx.x] = make_float2(v.max, v.sum);
  }
  kv_barrier(bar, p.blocks);

  // 2. Each head's log-sum-exp (every block folds the partials in the same
  //    order, so all get the same values), the aggregated scores, and the
  //    histogram of their bits 30..20.
  if (warp < kGroupPad) {
    Softmax2 v{-INFINITY, 0.0f};
    for (int i = lane; i < p.blocks; i += 32) {
      const float2 part = __ldcg(&partial[i * kGroupPad + warp]);
      v = combine(v, {part.x, part.y});
    }
    v = warp_combine(v);
    if (lane == 0) lse_shared[warp] = v.max + log2f(v.sum);
  }
  __syncthreads();
  float lse[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g)
    lse[g] = lse_shared[g];
  for (int from = 0; from < n_local; from += kThreads) {
    const int i = from + threadIdx.x;
    const bool active = i < n_local;
    uint32_t bits = 0;
    if (active) {
      float agg = 0.0f;
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        if (g < p.group) {
          const float prob = exp2f(raw[g * p.capacity + i] - lse[g]);
          agg = p.take_max ? fmaxf(agg, prob) : agg + prob;
        }
      }
      // Probabilities are >= 0: bit 31 is the sign of a -0 (or a NaN), dropped.
      bits = __float_as_uint(agg) & 0x7fffffffu;
      keys[i] = bits;  // over head 0's raw score, read above by this thread only
    }
    add_to_bin(hist, bits >> kShift0, active);
  }
  flush_hist(hist, global_hist, kBins);
  kv_barrier(bar, p.blocks);

  // 3. Radix passes over bits 30..20, 19..10 and 9..0 of the aggregated
  //    scores. Pass 0 picks the bucket of the k-th best from the merged
  //    histograms. Every block then counts its scores above that bucket and
  //    appends those in it (the candidates) to a list of the KV head; where
  //    the list fits (p.candidate_cap: the bucket spans a factor of 1.125 in
  //    score), every block finishes the selection on its own from the list
  //    in shared memory, with no further barriers. Else the passes go on as
  //    pass 0 did.
  select_bucket<kBins, kThreads>(global_hist, kShift0, true, k, &state);
  __syncthreads();
  uint2* counts = ws.block_counts + kv * kMaxScanBlocks;
  uint32_t* list = ws.fused_candidates + int64_t{kv} * kFusedCandidates;
  const uint32_t want0 = state.prefix >> kShift0;
  {
    const uint2 total = block_counts_against(keys, n_local, kShift0, want0, warp_counts);
    if (threadIdx.x == 0) {
      // Slots [slot, slot + total.y) of the list, counted from this search's
      // first value of the running count; published with the count above
      // the bucket (slot and count fit 16 bits where the list is used).
      const uint32_t slot = total.y == 0 ? 0u : atomicAdd(count_of_kv, total.y) - count_base;
      counts[b] = make_uint2(total.x, (slot << 16) | (total.y & 0xffffu));
      cand_slots[0] = slot;
      cand_slots[1] = 0;  // candidates placed so far
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_local; i += kThreads) {
      const uint32_t bits = keys[i];
      if ((bits >> kShift0) != want0) continue;
      const uint32_t slot = cand_slots[0] + atomicAdd(&cand_slots[1], 1u);
      if (slot < p.candidate_cap) list[slot] = bits;
    }
  }
  kv_barrier(bar, p.blocks);

  clear_share(global_hist, kBins, p.blocks);
  const uint32_t candidates = __ldcg(count_of_kv) - count_base;
  uint32_t above_before = 0;  // this thread's part of the counts of the blocks before
  uint32_t equal_before = 0;
  uint32_t threshold = 0;
  uint32_t ties = 0;
  if (candidates <= p.candidate_cap) {
    uint32_t* cand = keys + p.capacity;  // past the aggregated scores
    for (uint32_t i = threadIdx.x; i < candidates; i += kThreads)
      cand[i] = __ldcg(&list[i]);
    for (int i = threadIdx.x; i < kBins / 2; i += kThreads)
      hist[i] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < candidates; i += kThreads)
      atomicAdd(&hist[(cand[i] >> kShift1) & (kBins / 2 - 1)], 1u);
    __syncthreads();
    select_bucket<kBins / 2, kThreads, true>(hist, kShift1, false, k, &state);
    __syncthreads();
    for (int i = threadIdx.x; i < kBins / 2; i += kThreads)
      hist[i] = 0;
    __syncthreads();
    const uint32_t want1 = state.prefix >> kShift1;
    for (uint32_t i = threadIdx.x; i < candidates; i += kThreads) {
      const uint32_t bits = cand[i];
      if ((bits >> kShift1) == want1) atomicAdd(&hist[bits & (kBins / 2 - 1)], 1u);
    }
    __syncthreads();
    select_bucket<kBins / 2, kThreads, true>(hist, 0, false, k, &state);
    __syncthreads();
    threshold = state.prefix;
    ties = state.remaining;
    // A warp per block before this one: its count above the bucket, and
    // its candidates (slots it took in the list) against the k-th score.
    for (int before = warp; before < b; before += kWarps) {
      const uint2 record = __ldcg(&counts[before]);
      if (lane == 0) above_before += record.x;
      const uint32_t* from = cand + (record.y >> 16);
      for (uint32_t i = lane; i < (record.y & 0xffffu); i += 32) {
        above_before += from[i] > threshold;
        equal_before += from[i] == threshold;
      }
    }
  } else {
    for (int i = threadIdx.x; i < kBins / 2; i += kThreads)
      hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n_local; i += kThreads) {
      const uint32_t bits = keys[i];
      if ((bits >> kShift0) == want0) atomicAdd(&hist[(bits >> kShift1) & (kBins / 2 - 1)], 1u);
    }
    flush_hist(hist, global_hist + kBins, kBins / 2);
    kv_barrier(bar, p.blocks);

    select_bucket<kBins / 2, kThreads>(global_hist + kBins, kShift1, false, k, &state);
    __syncthreads();
    for (int i = threadIdx.x; i < kBins / 2; i += kThreads)
      hist[i] = 0;
    __syncthreads();
    const uint32_t want1 = state.prefix >> kShift1;
    for (int i = threadIdx.x; i < n_local; i += kThreads) {
      const uint32_t bits = keys[i];
      if ((bits >> kShift1) == want1) atomicAdd(&hist[bits & (kBins / 2 - 1)], 1u);
    }
    flush_hist(hist, global_hist + 2 * kBins, kBins / 2);
    kv_barrier(bar, p.blocks);

    clear_share(global_hist + kBins, kBins / 2, p.blocks);
    select_bucket<kBins / 2, kThreads>(global_hist + 2 * kBins, 0, false, k, &state);
    __syncthreads();
    threshold = state.prefix;
    ties = state.remaining;
    // Each block's counts against the k-th score, published for the blocks after it.
    const uint2 total = block_counts_against(keys, n_local, 0, threshold, warp_counts);
    if (threadIdx.x == 0) counts[b] = total;
    kv_barrier(bar, p.blocks);

    clear_share(global_hist + 2 * kBins, kBins / 2, p.blocks);
    for (int i = threadIdx.x; i < b; i += kThreads) {
      const uint2 c = __ldcg(&counts[i]);
      above_before += c.x;
      equal_before += c.y;
    }
  }

  // 4. The k-th best score is `threshold`; the selection takes every score
  //    above it and the first `ties` equal to it in position order. Each
  //    warp writes the positions of its span of the block's tokens after
  //    those of the blocks and warps before it (ballots; no block-wide scans).
  const int span = (n_local + kThreads - 1) / kThreads * 32;
  const int w0 = min(n_local, warp * span);
  const int w1 = min(n_local, w0 + span);
  {
    uint32_t above = 0;
    uint32_t equal = 0;
    for (int i = w0 + lane; i < w1; i += 32) {
      const uint32_t bits = keys[i];
      above += bits > threshold;
      equal += bits == threshold;
    }
    above = __reduce_add_sync(~0u, above);
    equal = __reduce_add_sync(~0u, equal);
    above_before = __reduce_add_sync(~0u, above_before);
    equal_before = __reduce_add_sync(~0u, equal_before);
    __syncthreads();  // warp_counts of step 3 are read no more
    if (lane == 0) {
      warp_counts[warp] = make_uint2(above, equal);
      before_parts[warp] = make_uint2(above_before, equal_before);
    }
    __syncthreads();
  }
  above_before = 0;
  equal_before = 0;
  for (int w = 0; w < kWarps; ++w) {
    above_before += before_parts[w].x + (w < warp ? warp_counts[w].x : 0u);
    equal_before += before_parts[w].y + (w < warp ? warp_counts[w].y : 0u);
  }
  uint32_t written = above_before + min(equal_before, ties);
  uint32_t ties_seen = equal_before;
  int32_t* row = p.out + int64_t{kv} * k;
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  for (int from = w0; from < w1; from += 32) {
    const int i = from + lane;
    const bool valid = i < w1;
    const uint32_t bits = valid ? keys[i] : 0u;
    const bool is_equal = valid && bits == threshold;
    const unsigned equals = __ballot_sync(~0u, is_equal);
    const bool take =
        valid && (bits > threshold || (is_equal && ties_seen + __popc(equals & lower) < ties));
    const unsigned taken = __ballot_sync(~0u, take);
    if (take) row[written + __popc(taken & lower)] = static_cast<int32_t>(t0 + i);
    written += __popc(taken);
    ties_seen += __popc(equals);
  }
}

// Runs f.template operator()<kBits, kHeadDim, kGroupPad>() for the shape.
template <class F>
auto dispatch(int bits, int head_dim, int group, F&& f) {
  const auto pad = [&]<int kBits, int kHeadDim>() {
    if (group <= 4) return f.template operator()<kBits, kHeadDim, 4>();
    return f.template operator()<kBits, kHeadDim, 8>();
  };
  if (bits == 4) {
    return head_dim == 128 ? pad.template operator()<4, 128>() : pad.template operator()<4, 64>();
  }
  return head_dim == 128 ? pad.template operator()<8, 128>() : pad.template operator()<8, 64>();
}

// Blocks per KV head the fused kernel launches for this shape, 0 if none.
int blocks_per_head(const SqSearchArgs& a, const SearchWorkspaceView& ws) {
  if (a.shape.kv_heads < 1 || a.shape.q_heads % a.shape.kv_heads != 0) return 0;
  const int group = a.shape.q_heads / a.shape.kv_heads;
  if (group < 1 || group > kMaxGroup || !sq_tile_supported(a.bits, a.shape.head_dim)) return 0;
  return dispatch(a.bits, a.shape.head_dim, group, [&]<int kBits, int kHeadDim, int kGroupPad>() {
    using T = Tile<kBits, kHeadDim, kGroupPad>;
    const int per_sm = ws.fused_blocks_per_sm[T::kOccupancySlot];
    const int blocks = std::min(per_sm * ws.sm_count / a.shape.kv_heads, kMaxScanBlocks);
    if (blocks < 1) return 0;
    const int64_t chunk = fused_chunk(a.request.end - a.request.begin, blocks);
    return chunk <= capacity_of<T>(group) ? blocks : 0;
  });
}

}  // namespace

bool sq_fused_covers(const SqSearchArgs& args, const SearchWorkspaceView& ws) {
  return ws.fused_hist != nullptr && args.scale != nullptr && args.offset != nullptr &&
         blocks_per_head(args, ws) > 0;
}

Status launch_sq_fused_search(const SqSearchArgs& a, const SearchWorkspaceView& ws,
                              cudaStream_t stream) {
  const int blocks = ws.fused_hist != nullptr ? blocks_per_head(a, ws) : 0;
  if (blocks == 0 || a.scale == nullptr || a.offset == nullptr) {
    return Status::invalid_argument(
        "the fused search does not cover this shape or range (int" + std::to_string(a.bits) +
        ", head_dim " + std::to_string(a.shape.head_dim) + ", " +
        std::to_string(a.request.end - a.request.begin) +
        " tokens): call launch_sq_search, which falls back to the six-kernel search");
  }
  const SelectRequest& r = a.request;
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  const int group = a.shape.q_heads / a.shape.kv_heads;
  return dispatch(
      a.bits, a.shape.head_dim, group, [&]<int kBits, int kHeadDim, int kGroupPad>() -> Status {
        using T = Tile<kBits, kHeadDim, kGroupPad>;
        FusedParams p{};
        p.queries = a.queries;
        p.query_dtype = a.query_dtype;
        p.scale = a.scale;
        p.offset = a.offset;
        p.begin = r.begin;
        p.end = r.end;
        p.k = static_cast<uint32_t>(r.k);
        p.range = r.range;
        p.blocks = blocks;
        p.capacity = capacity_of<T>(group);
        p.candidate_cap = static_cast<uint32_t>(
            std::min<int64_t>(kFusedCandidates, int64_t{group - 1} * p.capacity));
        p.group = group;
        p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(double(a.shape.head_dim)));
        p.take_max = r.aggregation == GqaAggregation::kMax;
        p.out = r.out;
        const T src{a.codes, nullptr, a.head_stride, group};
        cudaLaunchConfig_t config{};
        config.gridDim =
            dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(a.shape.kv_heads));
        config.blockDim = dim3(kThreads);
        config.dynamicSmemBytes = kSmemBytes;
        config.stream = stream;
        // Cooperative: the driver refuses a grid whose blocks could
        // not all be resident, which the barriers need.
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeCooperative;
        attr[0].val.cooperative = 1;
        config.attrs = attr;
        config.numAttrs = 1;
        PQKV_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(
            &config, fused_search_kernel<kBits, kHeadDim, kGroupPad>, src, p, ws));
        return ok_status();
      });
}

Status sq_fused_occupancies(int* out) {
  int device = 0;
  int optin = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int cooperative = 0;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  const auto one = [&]<int kBits, int kHeadDim, int kGroupPad>() -> Status {
    using T = Tile<kBits, kHeadDim, kGroupPad>;
    out[T::kOccupancySlot] = 0;
    if (cooperative == 0 || optin < static_cast<int>(kSmemBytes)) return ok_status();
    const auto kernel = fused_search_kernel<kBits, kHeadDim, kGroupPad>;
    PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
    int blocks = 0;
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kSmemBytes));
    out[T::kOccupancySlot] = std::min(blocks, kBlocksPerSm);
    return ok_status();
  };
  for (int group : {4, 8}) {
    for (int bits : {4, 8}) {
      for (int head_dim : {64, 128}) {
        PQKV_RETURN_IF_ERROR(dispatch(bits, head_dim, group, one));
      }
    }
  }
  return ok_status();
}

}  // namespace pqkv::index::cuda
