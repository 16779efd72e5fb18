// Device code of the persistent searches (sq_fused_search.cu for int4/int8
// keys, pq_fused_search.cu for PQ codes): once a block holds the raw scores of
// its slice of tokens for every head of the GQA group in shared memory,
// finish_search() does the rest on chip, with barriers between the blocks of
// a KV head: per-head softmax statistics, GQA aggregation, radix top-k (the
// bucket choice of search_select.cuh) and the positions' writes.
//
// Every block of a KV head calls it with the same FusedSelect; all blocks of
// the launch must be resident (a cooperative launch), since they wait on each
// other.
#pragma once

#if defined(__CUDACC__)
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(PQKV_FUSED_CLOCKS)
#include <cstdio>
#include <cstdlib>
#include <vector>
#endif

#include "core/cuda_check.h"
#include "index/cuda/search_select.cuh"

namespace pqkv::index::cuda::fused {

#if defined(PQKV_FUSED_CLOCKS)
// Benchmark-only instrumentation: thread 0 of every block stamps the global
// timer and its SM's clock at each phase; the last search's stamps are
// printed (min / median / max over the blocks) when the process exits.
namespace clocks {
inline constexpr int kStamps = 16;
inline constexpr int kKv = 8;
static __device__ unsigned long long g_stamps[kKv][kMaxScanBlocks][kStamps][2];

__device__ __forceinline__ void stamp(int i) {
  if (threadIdx.x != 0 || blockIdx.y >= kKv) return;
  unsigned long long t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  auto& row = g_stamps[blockIdx.y][blockIdx.x];
  if (i == 0) {
    for (int j = 1; j < kStamps; ++j)
      row[j][0] = row[j][1] = 0;
  }
  row[i][0] = t;
  row[i][1] = clock64();
}

static void report() {
  static unsigned long long h[kKv][kMaxScanBlocks][kStamps][2];
  if (cudaDeviceSynchronize() != cudaSuccess ||
      cudaMemcpyFromSymbol(h, g_stamps, sizeof(h)) != cudaSuccess) {
    return;
  }
  int khz = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
  unsigned long long t0 = ~0ull;
  for (auto& kv : h)
    for (auto& b : kv)
      if (b[0][0] != 0) t0 = std::min(t0, b[0][0]);
  if (t0 == ~0ull) return;
  std::fprintf(stderr, "fused phase stamps (us from the first block's start; clock MHz %d)\n",
               khz / 1000);
  std::fprintf(
      stderr, "stamp  blocks  timer min / med / max   | own-clock delta from previous med / max\n");
  for (int i = 0; i < kStamps; ++i) {
    std::vector<double> at, d;
    for (auto& kv : h) {
      for (auto& b : kv) {
        if (b[0][0] == 0 || b[i][0] == 0) continue;
        at.push_back((b[i][0] - t0) * 1e-3);
        int prev = i - 1;
        while (prev >= 0 && b[prev][0] == 0)
          --prev;
        if (prev >= 0) d.push_back(double(b[i][1] - b[prev][1]) / (khz * 1e-3));
      }
    }
    if (at.empty()) continue;
    std::sort(at.begin(), at.end());
    std::sort(d.begin(), d.end());
    std::fprintf(stderr, "%5d  %6zu  %7.2f %7.2f %7.2f   | %7.2f %7.2f\n", i, at.size(), at.front(),
                 at[at.size() / 2], at.back(), d.empty() ? 0.0 : d[d.size() / 2],
                 d.empty() ? 0.0 : d.back());
  }
}

static void report_at_exit() {
  static const bool registered = [] { return std::atexit(report) == 0; }();
  (void)registered;
}
}  // namespace clocks
#define PQKV_STAMP(i) ::pqkv::index::cuda::fused::clocks::stamp(i)
#define PQKV_STAMP_REPORT() ::pqkv::index::cuda::fused::clocks::report_at_exit()
#else
#define PQKV_STAMP(i) ((void)0)
#define PQKV_STAMP_REPORT() ((void)0)
#endif

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
// Bins of the radix passes after the first (11 bits each at most).
inline constexpr int kPassBins = 2048;
// Tokens of a block's slice are a multiple of this (the int4/int8 scan's
// tiles of 16 tokens; the PQ scan takes the same split).
inline constexpr int kSliceTokens = 16;

// What every block of a search needs past its scan.
struct FusedSelect {
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

// Tokens per block for `count` tokens over `blocks` blocks, in whole slices;
// the host's check and the device-side counts use the same split.
__host__ __device__ __forceinline__ int64_t fused_chunk(int64_t count, int blocks) {
  const int64_t slices = (count + kSliceTokens - 1) / kSliceTokens;
  return (slices + blocks - 1) / blocks * kSliceTokens;
}

// The range of this block after device-side counts are read: false (in
// every block alike) when there is nothing to select.
struct BlockRange {
  int64_t begin;
  int64_t end;
  uint32_t k;
  int64_t t0;  // this block's tokens [t0, t1)
  int64_t t1;
  int n_local;
};

__device__ __forceinline__ bool resolve_block_range(const FusedSelect& p, BlockRange* r) {
  r->begin = p.begin;
  r->end = p.end;
  r->k = p.k;
  if (p.range != nullptr) {
    const DeviceSearchRange d = *p.range;
    r->begin = d.begin;
    r->end = max(d.begin, d.end);
    r->k = static_cast<uint32_t>(min(max(d.k, int64_t{0}), r->end - r->begin));
  }
  if (r->k == 0) return false;
  const int64_t chunk = fused_chunk(r->end - r->begin, p.blocks);
  // Device-side counts past the largest range the launch was sized for would
  // overrun the shared memory: a broken caller contract, stopped loudly.
  if (chunk > p.capacity) __trap();
  r->t0 = r->begin + blockIdx.x * chunk;
  r->t1 = min(r->end, r->t0 + chunk);
  r->n_local = static_cast<int>(max(int64_t{0}, r->t1 - r->t0));
  return true;
}

// Waits until every block of a KV head has arrived (a sense-reversing
// barrier: bar[0] counts arrivals and is reset by the last block, which then
// bumps the generation bar[1]). Every block's global writes before it are
// visible after it to loads that bypass L1 (__ldcg): the arrival is an
// acquire-release atomic and the new generation a release reduction, so no
// full fence sits on the last block's path.
__device__ __forceinline__ void kv_barrier(uint32_t* bar, int blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* generation = bar + 1;
    uint32_t seen = 0;
    uint32_t arrived = 0;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(generation) : "memory");
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(arrived)
                 : "l"(bar)
                 : "memory");
    if (arrived == static_cast<uint32_t>(blocks - 1)) {
      // The reset is ordered before the new generation: a block that sees
      // the generation and arrives at the next barrier counts from 0.
      asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(bar) : "memory");
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(generation) : "memory");
    } else {
      uint32_t now = seen;
      while (now == seen) {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                     : "=r"(now)
                     : "l"(generation)
                     : "memory");
      }
    }
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

// The first radix pass's bucket of an aggregated score's bits (bit 31 is 0;
// scores are at most 8, the largest group): bits 30..17 less a base,
// clamped to [0, 4095]. That is 64 buckets an octave (a bucket spans a
// factor of at most 1.011 in score) over the 64 octaves below 8, with every
// score under 2^-61 in bucket 0 (and NaNs in 4095). Bits 30..20 alone, the
// first version's 2048 buckets, left 64K candidates (of 131K tokens) in the
// k-th best's bucket with random int4 codes. A bucket is exact when its
// scores share the bits above kShift; the two edge buckets are not.
struct FirstKey {
  static constexpr int kBins = 4096;
  static constexpr int kShift = 17;
  // 8.0 (0x41000000) lands in bucket kBins - 2.
  static constexpr int kBase = (0x41000000 >> kShift) - (kBins - 2);

  __device__ __forceinline__ static uint32_t of(uint32_t bits) {
    const int v = static_cast<int>(bits >> kShift) - kBase;
    return static_cast<uint32_t>(min(max(v, 0), kBins - 1));
  }
  __device__ __forceinline__ static bool exact(uint32_t bucket) {
    return bucket > 0 && bucket < kBins - 1;
  }
};

// How many of the block's keys[0, n) have key(keys[i]) above and equal to
// `want`, in thread 0 (zeros elsewhere). Called by the whole block; it
// synchronises the block once.
template <class Key>
__device__ __forceinline__ uint2 block_counts_against(const uint32_t* keys, int n, uint32_t want,
                                                      uint2* warp_counts, Key key) {
  uint32_t above = 0;
  uint32_t equal = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint32_t top = key(keys[i]);
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

// The radix passes after the first, over the scores of bucket `bucket`:
// pass i histograms bits [shift[i], shift[i] + width[i]) of the scores that
// match the prefix found so far (pass 0: those in the bucket).
struct RefinePasses {
  int count;
  int shift[3];
  int width[3];
};

__device__ __forceinline__ RefinePasses refine_passes(uint32_t bucket) {
  if (FirstKey::exact(bucket)) {
    // Bits 16..7, then 6..0.
    constexpr int kFirst = FirstKey::kShift - 10;
    return {2, {kFirst, 0, 0}, {10, kFirst, 0}};
  }
  // An edge bucket: all 31 bits, 11 + 10 + 10.
  return {3, {20, 10, 0}, {11, 10, 10}};
}

// The prefix the refinement starts from: the bucket's shared top bits, or
// none for an edge bucket.
__device__ __forceinline__ uint32_t refine_prefix(uint32_t bucket) {
  if (!FirstKey::exact(bucket)) return 0;
  return static_cast<uint32_t>(static_cast<int>(bucket) + FirstKey::kBase) << FirstKey::kShift;
}

// True when `bits` takes part in refinement pass `i` (prefix: the state's).
__device__ __forceinline__ bool in_pass(uint32_t bits, const RefinePasses& r, int i,
                                        uint32_t bucket, uint32_t prefix) {
  if (i == 0) return FirstKey::of(bits) == bucket;
  const int above = r.shift[i - 1];
  return (bits >> above) == (prefix >> above);
}

// Head g's score in log2 units from its raw score (monotone in `raw`).
__device__ __forceinline__ float log2_score(float raw, float bias, float unscale,
                                            float scale_log2) {
  return __fadd_rn(bias, raw * unscale) * scale_log2;
}

// Everything after the scan, run by every block of KV head blockIdx.y once
// raw[g * p.capacity + i] holds the raw score of head g for token r.t0 + i
// (i < r.n_local; synchronised by the caller), and raw_hi[g] and raw_lo[g]
// the largest and smallest raw score of head g this thread saw in the scan
// (-inf and +inf for heads it saw none of). Head g's score in log2 units is
// log2_score(raw, bias[g], unscale[g], p.scale_log2). Then each
// head's log-sum-exp, the aggregated scores (their bits over head 0's raw
// scores), and the radix selection: the first pass picks the bucket
// (FirstKey) of the k-th best from the merged histograms. Every block then
// counts its scores above that bucket and appends those in it (the
// candidates) to a list of the KV head; where the list fits
// (p.candidate_cap), every block finishes the selection on its own from the
// list in shared memory, past its scores, with no further barriers (two
// refinement passes, three for an edge bucket). Else the same passes run
// over every block's scores, and a count, with a barrier each. Last, each
// warp writes the selected positions of its span of the block's tokens after
// those of the blocks and warps before it. Block 0 also leaves each head's
// log-sum-exp in ws.lse[kv][g], as the multi-kernel search does, for a
// two-stage rerank. The caller's blocks need 16 KB of static shared memory
// here for the first histogram.
template <int kGroupPad>
__device__ __forceinline__ void finish_search(const FusedSelect& p, const BlockRange& r,
                                              const SearchWorkspaceView& ws, float* raw,
                                              const float (&bias)[kGroupPad],
                                              const float (&unscale)[kGroupPad],
                                              const float (&raw_hi)[kGroupPad],
                                              const float (&raw_lo)[kGroupPad]) {
  using Key = FirstKey;
  constexpr int kBins0 = Key::kBins;
  static_assert(kBins0 + 3 * kPassBins <= kFusedHistPerHead, "the global histograms of a KV head");
  uint32_t* keys = reinterpret_cast<uint32_t*>(raw);
  __shared__ __align__(16) uint32_t hist[kBins0];  // read four bins at a time
  __shared__ Softmax2 warp_parts[kWarps][kGroupPad];
  __shared__ float lse_shared[kGroupPad];
  __shared__ SelectState state;
  __shared__ uint32_t cand_slots[2];      // first slot in the list, slots taken
  __shared__ uint2 warp_counts[kWarps];   // (above, equal) the k-th score per warp
  __shared__ uint2 before_parts[kWarps];  // the same over the blocks before, in parts

  const int kv = blockIdx.y;
  const int b = blockIdx.x;
  const int n_local = r.n_local;
  const uint32_t k = r.k;
  uint32_t* bar = ws.fused_barrier + 2 * kv;
  uint32_t* global_hist = ws.fused_hist + int64_t{kv} * kFusedHistPerHead;
  // The running count of candidates of the KV head, read before any block
  // adds to it (after the second barrier).
  uint32_t* count_of_kv = ws.fused_candidate_count + kv;
  const uint32_t count_base = __ldcg(count_of_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  PQKV_STAMP(2);

  // Each head's softmax statistics over the block: the maximum score comes
  // from the scan's extremes of the raw scores (the log2 score is monotone in
  // the raw one, rising with unscale >= 0, else falling), so a single pass
  // that waits on nothing sums the exponentials against it.
  {
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      float h = raw_hi[g];
      float l = raw_lo[g];
      for (int offset = 16; offset > 0; offset /= 2) {
        h = fmaxf(h, __shfl_xor_sync(~0u, h, offset));
        l = fminf(l, __shfl_xor_sync(~0u, l, offset));
      }
      if (lane == 0) warp_parts[warp][g] = {h, l};
    }
    __syncthreads();
    if (threadIdx.x < kGroupPad) {
      const int g = threadIdx.x;
      float h = warp_parts[0][g].max;
      float l = warp_parts[0][g].sum;
      for (int w = 1; w < kWarps; ++w) {
        h = fmaxf(h, warp_parts[w][g].max);
        l = fminf(l, warp_parts[w][g].sum);
      }
      const float x = unscale[g] >= 0.0f ? h : l;
      lse_shared[g] =
          n_local > 0 && g < p.group ? log2_score(x, bias[g], unscale[g], p.scale_log2) : -INFINITY;
    }
    __syncthreads();
    float top[kGroupPad];
    float sum[kGroupPad];
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      top[g] = lse_shared[g];
      sum[g] = 0.0f;
    }
#pragma unroll 4
    for (int i = threadIdx.x; i < n_local; i += kThreads) {
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        if (g < p.group) {
          const float y = log2_score(raw[g * p.capacity + i], bias[g], unscale[g], p.scale_log2);
          sum[g] += exp2f(y - top[g]);
        }
      }
    }
    __syncthreads();  // warp_parts are read above
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      float total = sum[g];
      for (int offset = 16; offset > 0; offset /= 2)
        total += __shfl_xor_sync(~0u, total, offset);
      if (lane == 0) warp_parts[warp][g] = {top[g], total};
    }
  }
  for (int i = threadIdx.x; i < kBins0; i += kThreads)
    hist[i] = 0;
  __syncthreads();
  PQKV_STAMP(3);
  float2* partial = ws.partial + int64_t{kv} * kMaxScanBlocks * kGroupPad;
  if (threadIdx.x < kGroupPad) {
    Softmax2 v = warp_parts[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w)
      v = combine(v, warp_parts[w][threadIdx.x]);
    partial[b * kGroupPad + threadIdx.x] = make_float2(v.max, v.sum);
  }
  kv_barrier(bar, p.blocks);
  PQKV_STAMP(4);

  // Each head's log-sum-exp (every block folds the partials in the same
  // order, so all get the same values), the aggregated scores, and the
  // histogram of their top bits.
  if (warp < kGroupPad) {
    Softmax2 v{-INFINITY, 0.0f};
    for (int i = lane; i < p.blocks; i += 32) {
      const float2 part = __ldcg(&partial[i * kGroupPad + warp]);
      v = combine(v, {part.x, part.y});
    }
    v = warp_combine(v);
    if (lane == 0) {
      lse_shared[warp] = v.max + log2f(v.sum);
      // Left for a rerank of these picks as the multi-kernel search leaves it.
      if (b == 0) ws.lse[kv * kGroupPad + warp] = lse_shared[warp];
    }
  }
  __syncthreads();
  PQKV_STAMP(5);
  float lse[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g)
    lse[g] = lse_shared[g];
    // The aggregated scores first, then their histogram: a loop without the
    // shared atomics overlaps the loads and exponentials of several tokens.
#pragma unroll 4
  for (int i = threadIdx.x; i < n_local; i += kThreads) {
    float agg = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      if (g < p.group) {
        const float y = log2_score(raw[g * p.capacity + i], bias[g], unscale[g], p.scale_log2);
        const float prob = exp2f(y - lse[g]);
        agg = p.take_max ? fmaxf(agg, prob) : agg + prob;
      }
    }
    // Probabilities are >= 0: bit 31 is the sign of a -0 (or a NaN), dropped.
    keys[i] = __float_as_uint(agg) & 0x7fffffffu;  // over head 0's raw score, read by this thread
  }
  for (int from = 0; from < n_local; from += kThreads) {
    const int i = from + threadIdx.x;
    const bool active = i < n_local;
    add_to_bin(hist, Key::of(active ? keys[i] : 0u), active);
  }
  PQKV_STAMP(6);
  flush_hist(hist, global_hist, kBins0);
  PQKV_STAMP(7);
  kv_barrier(bar, p.blocks);
  PQKV_STAMP(8);

  select_bucket<kBins0, kThreads>(global_hist, 0, true, k, &state);
  __syncthreads();
  PQKV_STAMP(9);
  uint2* counts = ws.block_counts + kv * kMaxScanBlocks;
  uint32_t* list = ws.fused_candidates + int64_t{kv} * kFusedCandidates;
  const uint32_t want0 = state.prefix;  // the bucket
  const auto key_of = [](uint32_t bits) { return Key::of(bits); };
  {
    const uint2 total = block_counts_against(keys, n_local, want0, warp_counts, key_of);
    if (threadIdx.x == 0) {
      // Slots [slot, slot + total.y) of the list, counted from this search's
      // first value of the running count; published with the count above
      // the bucket (slot and count fit 16 bits where the list is used).
      const uint32_t slot = total.y == 0 ? 0u : atomicAdd(count_of_kv, total.y) - count_base;
      counts[b] = make_uint2(total.x, (slot << 16) | (total.y & 0xffffu));
      cand_slots[0] = slot;
      cand_slots[1] = 0;                    // candidates placed so far
      state.prefix = refine_prefix(want0);  // read after the barrier below
    }
    __syncthreads();
    PQKV_STAMP(10);
    // A warp's candidates take consecutive slots, claimed by one atomic.
    for (int from = 0; from < n_local; from += kThreads) {
      const int i = from + threadIdx.x;
      const uint32_t bits = i < n_local ? keys[i] : 0u;
      const bool in = i < n_local && Key::of(bits) == want0;
      const unsigned mine = __ballot_sync(~0u, in);
      if (mine == 0) continue;
      const int lead = __ffs(mine) - 1;
      uint32_t first = 0;
      if (lane == lead) first = atomicAdd(&cand_slots[1], static_cast<uint32_t>(__popc(mine)));
      first = __shfl_sync(~0u, first, lead);
      const uint32_t slot = cand_slots[0] + first + __popc(mine & ((1u << lane) - 1u));
      if (in && slot < p.candidate_cap) list[slot] = bits;
    }
  }
  PQKV_STAMP(11);
  kv_barrier(bar, p.blocks);
  PQKV_STAMP(12);

  clear_share(global_hist, kBins0, p.blocks);
  const RefinePasses passes = refine_passes(want0);
  const uint32_t candidates = __ldcg(count_of_kv) - count_base;
  uint32_t above_before = 0;  // this thread's part of the counts of the blocks before
  uint32_t equal_before = 0;
  uint32_t threshold = 0;
  uint32_t ties = 0;
  if (candidates <= p.candidate_cap) {
    uint32_t* cand = keys + p.capacity;  // past the aggregated scores
    {
      // Four candidates a load and eight loads in flight a thread (the list
      // and `cand` are 16-byte aligned; the words past `candidates` up to a
      // multiple of 4 are stale and never read).
      constexpr int kInFlight = 8;
      const uint4* from = reinterpret_cast<const uint4*>(list);
      uint4* to = reinterpret_cast<uint4*>(cand);
      const uint32_t n4 = (candidates + 3) / 4;
      for (uint32_t i = threadIdx.x; i < n4; i += kThreads * kInFlight) {
        uint4 v[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          if (i + u * kThreads < n4) v[u] = __ldcg(from + i + u * kThreads);
        }
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) {
          if (i + u * kThreads < n4) to[i + u * kThreads] = v[u];
        }
      }
    }
    // The refinement passes over the list, each histogram in shared memory.
    for (int pass = 0; pass < passes.count; ++pass) {
      for (int i = threadIdx.x; i < kPassBins; i += kThreads)
        hist[i] = 0;
      __syncthreads();
      const uint32_t prefix = state.prefix;
      const int shift = passes.shift[pass];
      const uint32_t mask = (1u << passes.width[pass]) - 1;
#pragma unroll 4
      for (uint32_t i = threadIdx.x; i < candidates; i += kThreads) {
        const uint32_t bits = cand[i];
        if (in_pass(bits, passes, pass, want0, prefix))
          atomicAdd(&hist[(bits >> shift) & mask], 1u);
      }
      __syncthreads();
      select_bucket<kPassBins, kThreads, true>(hist, shift, false, k, &state);
      __syncthreads();
    }
    threshold = state.prefix;
    ties = state.remaining;
    PQKV_STAMP(13);
    // A warp per block before this one: its count above the bucket, and
    // its candidates (slots it took in the list) against the k-th score.
    // The blocks' records are loaded at once first, into the histogram's
    // room (read no more).
    uint2* records = reinterpret_cast<uint2*>(hist);
    for (int i = threadIdx.x; i < b; i += kThreads)
      records[i] = __ldcg(&counts[i]);
    __syncthreads();
    for (int before = warp; before < b; before += kWarps) {
      const uint2 record = records[before];
      if (lane == 0) above_before += record.x;
      const uint32_t* from = cand + (record.y >> 16);
      for (uint32_t i = lane; i < (record.y & 0xffffu); i += 32) {
        above_before += from[i] > threshold;
        equal_before += from[i] == threshold;
      }
    }
  } else {
    // The same passes over every block's scores, their histograms merged in
    // global memory (one area a pass, each cleared once all blocks read it).
    for (int pass = 0; pass < passes.count; ++pass) {
      uint32_t* area = global_hist + kBins0 + pass * kPassBins;
      for (int i = threadIdx.x; i < kPassBins; i += kThreads)
        hist[i] = 0;
      __syncthreads();
      const uint32_t prefix = state.prefix;
      const int shift = passes.shift[pass];
      const uint32_t mask = (1u << passes.width[pass]) - 1;
      for (int i = threadIdx.x; i < n_local; i += kThreads) {
        const uint32_t bits = keys[i];
        if (in_pass(bits, passes, pass, want0, prefix))
          atomicAdd(&hist[(bits >> shift) & mask], 1u);
      }
      flush_hist(hist, area, kPassBins);
      kv_barrier(bar, p.blocks);
      if (pass > 0) clear_share(area - kPassBins, kPassBins, p.blocks);
      select_bucket<kPassBins, kThreads>(area, shift, false, k, &state);
      __syncthreads();
    }
    threshold = state.prefix;
    ties = state.remaining;
    // Each block's counts against the k-th score, published for the blocks after it.
    const uint2 total = block_counts_against(keys, n_local, threshold, warp_counts,
                                             [](uint32_t bits) { return bits; });
    if (threadIdx.x == 0) counts[b] = total;
    kv_barrier(bar, p.blocks);

    clear_share(global_hist + kBins0 + (passes.count - 1) * kPassBins, kPassBins, p.blocks);
    for (int i = threadIdx.x; i < b; i += kThreads) {
      const uint2 c = __ldcg(&counts[i]);
      above_before += c.x;
      equal_before += c.y;
    }
  }

  PQKV_STAMP(14);
  // The k-th best score is `threshold`; the selection takes every score
  // above it and the first `ties` equal to it in position order. Each warp
  // writes the positions of its span of the block's tokens after those of
  // the blocks and warps before it (ballots; no block-wide scans).
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
    __syncthreads();  // warp_counts of the selection are read no more
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
    if (take) row[written + __popc(taken & lower)] = static_cast<int32_t>(r.t0 + i);
    written += __popc(taken);
    ties_seen += __popc(equals);
  }
  PQKV_STAMP(15);
}

// Host side, shared by both persistent searches.

// The selection of `r` over `blocks` blocks a KV head, each keeping the raw
// scores of `capacity` tokens for a GQA group of `group` heads.
inline FusedSelect make_fused_select(const SelectRequest& r, int blocks, int capacity, int group,
                                     int head_dim) {
  FusedSelect p{};
  p.begin = r.begin;
  p.end = r.end;
  p.k = static_cast<uint32_t>(r.k);
  p.range = r.range;
  p.blocks = blocks;
  p.capacity = capacity;
  p.candidate_cap =
      static_cast<uint32_t>(std::min<int64_t>(kFusedCandidates, int64_t{group - 1} * capacity));
  p.group = group;
  p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(double(head_dim)));
  p.take_max = r.aggregation == GqaAggregation::kMax;
  p.out = r.out;
  return p;
}

// Blocks of `kernel` (kThreads threads, `smem` bytes of dynamic shared
// memory) resident on one SM, at most `cap`; 0 where the device has no
// cooperative launch or less opt-in shared memory than `smem`.
template <class Kernel>
Status cooperative_occupancy(Kernel kernel, size_t smem, int cap, int* blocks) {
  *blocks = 0;
  int device = 0;
  int optin = 0;
  int cooperative = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (cooperative == 0 || optin < static_cast<int>(smem)) return ok_status();
  PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int resident = 0;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, smem));
  *blocks = std::min(resident, cap);
  return ok_status();
}

// Launches `kernel` on a grid of [blocks, kv_heads] blocks of kThreads
// threads. Cooperative: the driver refuses a grid whose blocks could not all
// be resident, which the barriers need.
template <class Kernel, class... Args>
Status launch_cooperative(Kernel kernel, int blocks, int kv_heads, size_t smem, cudaStream_t stream,
                          Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(kv_heads));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  PQKV_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, args...));
  return ok_status();
}

}  // namespace pqkv::index::cuda::fused
#endif
