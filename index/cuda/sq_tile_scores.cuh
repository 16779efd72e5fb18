// Raw scores of int4 and int8 keys on tensor cores, for the GPU search's scans
// (pq_search.cu): a warp scores 16 tokens of one KV head for every query head
// of its GQA group with mma.sync m16n8k16 (fp16 in, fp32 accumulate).
//
// Why: the per-thread scan (SqSource, sq_scan.cuh) spends about 12 ALU
// instructions per channel and token on decoding and unfused products, so at
// 128K tokens it is bound by instructions, not by the 64 bytes a token's int4
// code takes. Here a token costs a few decode instructions per channel pair
// and a share of one tensor-core instruction per 16 channels.
//
// Exactness: a code (0..15 or 0..255) is exact in fp16. A table entry
// t = q[c] * scale[c] is not, so it is split as hi + lo, two fp16 numbers that
// together hold about 22 bits of its mantissa, after scaling each query
// head's table by a power of two that puts its largest entry just below 2^14
// (exact, and undone after the sum). The products are exact in the fp32
// accumulator; what differs from the CPU codec's unfused, lane-ordered sum is
// the order of the fp32 additions, so scores agree to a few units in the last
// place of fp32, not bit for bit. Tests compare the selected positions with a
// tolerance on the reference's scores (verify_top_k).
//
// Layout of the matrix product (one KV head, one k-step of 16 channels):
// A [16 tokens x 16 channels] holds codes, B [16 channels x 8 columns] holds
// the tables, column n < 4 the hi part of head n of a group of four, column
// n >= 4 the lo part of head n - 4 (a group of eight takes two products).
// Which channel sits at which k index is free as long as A and B agree: each
// thread of a quad decodes the channels of its own quarter of the code row
// (one 16-byte load for int4 at head_dim 128), and its B fragments are built
// once per block for the same channels.
#pragma once

#if defined(__CUDACC__)
#include <cuda_fp16.h>

#include <cstdint>

#include "index/cuda/sq_scan.cuh"

namespace pqkv::index::cuda {

inline constexpr int kTileTokens = 16;

// True when the tensor-core scan handles these codes (else SqSource does).
__host__ __device__ constexpr bool sq_tile_supported(int bits, int head_dim) {
  return (bits == 4 || bits == 8) && (head_dim == 64 || head_dim == 128);
}

template <int kBits, int kHeadDim, int kGroupPad>
struct SqTileSource {
  static_assert(sq_tile_supported(kBits, kHeadDim), "int4 or int8 at head_dim 64 or 128");
  static_assert(kGroupPad == 4 || kGroupPad == 8, "groups pad to 4 or 8 heads");
  static constexpr int kNt = kGroupPad / 4;  // products of 8 columns: 4 heads x (hi, lo)
  // Index of this instantiation in SearchWorkspaceView::tile_blocks_per_sm.
  static constexpr int kOccupancySlot =
      (kBits == 8 ? 4 : 0) + (kHeadDim == 128 ? 2 : 0) + (kGroupPad == 8 ? 1 : 0);
  static constexpr int kCodeSize = kHeadDim * kBits / 8;
  static constexpr int kQuadBytes = kCodeSize / 4;  // one thread's quarter of a code row
  static constexpr int kWords = kQuadBytes / 4;
  static constexpr int kChunks = kHeadDim / 16;  // k-steps of 16 channels
  static constexpr int kRow = (kHeadDim + 1 + 3) / 4 * 4;
  static constexpr uint32_t kMask = kBits == 4 ? 0x000F000Fu : 0x00FF00FFu;

  const uint8_t* codes;  // [kv][head_stride bytes], [token][kCodeSize]
  const float* tables;   // [q_heads][head_dim + 1], sq_tables_kernel's
  int64_t head_stride;
  int group;

  // Shared memory: the group's fp32 tables (rows of kRow), then per head the
  // power of two its table is scaled by and its inverse.
  static constexpr int kScale = kGroupPad * kRow;
  static constexpr int kUnscale = kScale + kGroupPad;
  static constexpr size_t smem_bytes() { return sizeof(float) * (kUnscale + kGroupPad); }

  struct Fragments {
    uint32_t b[kNt][kChunks][2];
  };
  struct Rows {
    uint32_t g[kWords];   // code row of token base + lane / 4
    uint32_t g8[kWords];  // code row of token base + lane / 4 + 8
  };

  // Stages KV head `kv`'s tables and their scales; ends with a barrier.
  __device__ void prepare(int kv, float* smem) const {
    const int n = group * (kHeadDim + 1);
    const float* src = tables + int64_t{kv} * n;
    for (int i = threadIdx.x; i < kGroupPad * kRow; i += blockDim.x)
      smem[i] = 0.0f;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      smem[(i / (kHeadDim + 1)) * kRow + i % (kHeadDim + 1)] = src[i];
    __syncthreads();
    scale_tables(smem);
  }

  // Finds the power of two each staged table row is scaled by (the rows are
  // in smem, zero past the group); ends with a barrier.
  __device__ static void scale_tables(float* smem) {
    if (threadIdx.x < kGroupPad) {
      const float* row = smem + threadIdx.x * kRow;
      float top = 0.0f;
      for (int c = 0; c < kHeadDim; ++c)
        top = fmaxf(top, fabsf(row[c]));
      int e = 0;
      if (top > 0.0f && isfinite(top)) frexpf(top, &e);  // top < 2^e
      const int p = min(max(14 - e, -100), 100);         // top * 2^p < 2^14
      smem[kScale + threadIdx.x] = ldexpf(1.0f, p);
      smem[kUnscale + threadIdx.x] = ldexpf(1.0f, -p);
    }
    __syncthreads();
  }

  // This thread's B fragments, from the staged tables. kPaired puts head
  // h's hi part in column 2h and its lo part in column 2h + 1 (for
  // paired_dots) instead of hi parts in columns 0..3 and lo parts in 4..7.
  template <bool kPaired = false>
  __device__ void load_fragments(const float* smem, Fragments* f) const {
    const int lane = threadIdx.x % 32;
    const int quad = lane % 4;
    const int col = lane / 4;  // B column
    const int span = quad * (kHeadDim / 4);
    const bool hi_part = kPaired ? col % 2 == 0 : col < 4;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      const int head = nt * 4 + (kPaired ? col / 2 : col % 4);
      const float* row = smem + head * kRow;
      const float scale = smem[kScale + head];
      const auto part = [&](int c) -> __half {
        const float x = row[c] * scale;
        const __half hi = __float2half_rn(x);
        return hi_part ? hi : __float2half_rn(x - __half2float(hi));
      };
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        int c = 0;
        int step = 0;  // the pair's second channel, after the first
        int next = 0;  // the second pair's first channel, after the first pair's
        if constexpr (kBits == 4) {
          c = span + 8 * (j / 2) + 2 * (j % 2);
          step = 4;
          next = 1;
        } else {
          c = span + 4 * j;
          step = 2;
          next = 1;
        }
        f->b[nt][j][0] = pack(part(c), part(c + step));
        f->b[nt][j][1] = pack(part(c + next), part(c + next + step));
      }
    }
  }

  // Loads the code rows of tokens base + lane / 4 and base + lane / 4 + 8
  // (rows at or past `end` read token `safe` instead; their scores are unused).
  __device__ __forceinline__ void load(int kv, int64_t base, int64_t end, int64_t safe,
                                       Rows* r) const {
    const int lane = threadIdx.x % 32;
    const int64_t t0 = base + lane / 4;
    const int64_t t1 = t0 + 8;
    const uint8_t* head = codes + kv * head_stride + (lane % 4) * kQuadBytes;
    load_row(head + (t0 < end ? t0 : safe) * kCodeSize, r->g);
    load_row(head + (t1 < end ? t1 : safe) * kCodeSize, r->g8);
  }

  // Raw scores (q.k as the codec approximates it, offset term included) of
  // the loaded tokens: s[nt][0..1] token lane / 4, heads nt * 4 + 2 * (lane % 2)
  // and the next one; s[nt][2..3] the same heads of token lane / 4 + 8.
  // Lanes lane and lane ^ 2 hold the same values.
  __device__ __forceinline__ void scores(const Rows& r, const Fragments& f, const float* smem,
                                         float (&s)[kNt][4]) const {
    accumulate(r, f, s);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] += __shfl_xor_sync(~0u, s[nt][e], 2);  // hi + lo
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int head = nt * 4 + 2 * (lane % 2) + e % 2;
        const float* row = smem + head * kRow;
        s[nt][e] = __fadd_rn(row[kHeadDim], s[nt][e] * smem[kUnscale + head]);
      }
    }
  }

  // The dot products of the loaded tokens with paired fragments
  // (load_fragments<true>), before the power-of-two unscale and the offset
  // term: d[nt][0] of token lane / 4, d[nt][1] of token lane / 4 + 8, both for
  // head nt * 4 + lane % 4. A thread's two accumulators are one head's hi and
  // lo columns, so no lane exchanges values, and the sum is the one scores()
  // makes.
  __device__ __forceinline__ void paired_dots(const Rows& r, const Fragments& f,
                                              float (&d)[kNt][2]) const {
    float c[kNt][4];
    accumulate(r, f, c);
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      d[nt][0] = c[nt][0] + c[nt][1];
      d[nt][1] = c[nt][2] + c[nt][3];
    }
  }

 private:
  // The fragments' products with the loaded tokens' codes, summed over the
  // head dimension into c (zeroed first): the m16n8k16 accumulators of
  // scores() and paired_dots().
  __device__ __forceinline__ void accumulate(const Rows& r, const Fragments& f,
                                             float (&c)[kNt][4]) const {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        c[nt][e] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      uint32_t a[4];
      if constexpr (kBits == 4) {
        const int w = j / 2;
        const int shift = 8 * (j % 2);
        a[0] = decode(r.g[w] >> shift);
        a[1] = decode(r.g8[w] >> shift);
        a[2] = decode(r.g[w] >> (shift + 4));
        a[3] = decode(r.g8[w] >> (shift + 4));
      } else {
        a[0] = decode(r.g[j]);
        a[1] = decode(r.g8[j]);
        a[2] = decode(r.g[j] >> 8);
        a[3] = decode(r.g8[j] >> 8);
      }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
        mma(a, f.b[nt][j], c[nt]);
    }
  }

  __device__ __forceinline__ static uint32_t pack(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) |
           (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
  }
  // Two codes (bits 0 and 16 of `w`, masked) as an fp16 pair: 1024 + v is
  // exact in fp16's mantissa, and so is subtracting 1024.
  __device__ __forceinline__ static uint32_t decode(uint32_t w) {
    const uint32_t biased = (w & kMask) | 0x64006400u;
    uint32_t out = 0;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(out) : "r"(biased), "r"(0x64006400u));
    return out;
  }
  __device__ __forceinline__ static void load_row(const uint8_t* p, uint32_t (&w)[kWords]) {
    if constexpr (kWords % 4 == 0) {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 v = reinterpret_cast<const uint4*>(p)[i];
        w[4 * i + 0] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
      }
    } else {
      static_assert(kWords % 2 == 0, "a quarter row is 8 bytes or a multiple of 16");
#pragma unroll
      for (int i = 0; i < kWords / 2; ++i) {
        const uint2 v = reinterpret_cast<const uint2*>(p)[i];
        w[2 * i + 0] = v.x;
        w[2 * i + 1] = v.y;
      }
    }
  }
  __device__ __forceinline__ static void mma(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

}  // namespace pqkv::index::cuda
#endif
