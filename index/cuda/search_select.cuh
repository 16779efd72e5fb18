// Device code shared by the GPU searches (pq_search.cu, sq_fused_search.cu):
// running softmax statistics in base 2, histogram flushes and the bucket
// choice of the radix top-k.
#pragma once

#if defined(__CUDACC__)
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "index/cuda/pq_search.cuh"

namespace pqkv::index::cuda {

// The radix top-k's histograms of one KV head, side by side: a first pass of
// 2048 bins over a score's top bits, then two narrower passes.
constexpr int kBins = 2048;
constexpr int kHistPerHead = 3 * kBins;
// The persistent searches' (fused_select.cuh): a first pass of up to 4096
// bins, then up to three passes of 2048.
constexpr int kFusedHistPerHead = 5 * kBins;

struct Softmax2 {
  float max;
  float sum;  // of 2^(y - max)
};

__device__ __forceinline__ Softmax2 combine(Softmax2 a, Softmax2 b) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * exp2f(a.max - m) + b.sum * exp2f(b.max - m)};
}

__device__ __forceinline__ Softmax2 warp_combine(Softmax2 v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Softmax2 o{__shfl_xor_sync(~0u, v.max, offset), __shfl_xor_sync(~0u, v.sum, offset)};
    v = combine(v, o);
  }
  return v;
}

// One score (log2 domain) added to a running softmax.
__device__ __forceinline__ void add_to_softmax(Softmax2& acc, float y) {
  if (y > acc.max) {
    acc.sum = acc.sum * exp2f(acc.max - y) + 1.0f;
    acc.max = y;
  } else {
    acc.sum += exp2f(y - acc.max);
  }
}

__device__ __forceinline__ void flush_hist(const uint32_t* local, uint32_t* global, int bins) {
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&global[b], local[b]);
  }
}

// Run by a whole block of kBlockThreads threads: finds the bucket of kPassBins
// (counted from the top) that holds the `remaining`-th best score and narrows
// the state (global or shared memory; written by one thread, read by all
// before). Each thread owns kPer adjacent bins, read in one or two 16-byte
// loads: from L2 (global histograms other blocks wrote) or, with
// kSharedHist, from the block's shared memory.
template <int kPassBins, int kBlockThreads, bool kSharedHist = false>
__device__ void select_bucket(const uint32_t* hist, int shift, bool first, uint32_t k,
                              SelectState* state) {
  constexpr int kPer = kPassBins / kBlockThreads;
  static_assert(kPer % 4 == 0, "bins are read four at a time");
  using Scan = cub::BlockScan<uint32_t, kBlockThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const uint32_t remaining = first ? k : state->remaining;
  const uint32_t prefix = first ? 0u : state->prefix;
  const int low = kPassBins - kPer * (threadIdx.x + 1);  // this thread owns [low, low + kPer)
  uint32_t count[kPer];
#pragma unroll
  for (int i = 0; i < kPer / 4; ++i) {
    const uint4* at = reinterpret_cast<const uint4*>(hist + low) + i;
    const uint4 v = kSharedHist ? *at : __ldcg(at);
    count[4 * i + 0] = v.x;
    count[4 * i + 1] = v.y;
    count[4 * i + 2] = v.z;
    count[4 * i + 3] = v.w;
  }
  uint32_t local = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    local += count[i];
  uint32_t above = 0;
  Scan(scan_storage).ExclusiveSum(local, above);
  if (above < remaining && above + local >= remaining) {
    bool found = false;
#pragma unroll
    for (int i = kPer - 1; i >= 0; --i) {
      if (!found && above + count[i] >= remaining) {
        state->prefix = prefix | (static_cast<uint32_t>(low + i) << shift);
        state->remaining = remaining - above;
        found = true;
      }
      above += count[i];
    }
  }
}

}  // namespace pqkv::index::cuda
#endif
