#include "model/cuda/flash_attention.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/cuda_check.h"

namespace pqkv::model::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Keys per tile; the workspace pads the context to whole tiles (zero rows),
// so that tile copies need no bounds.
constexpr int kBlockK = 64;
constexpr unsigned kFullMask = 0xffffffffu;

// A block is 4 warps, each owning 32 query rows (two 16-row mma tiles) of
// one query head: 128 queries per block, as FlashAttention-2 runs head_dim
// 128 on sm_80. Each K or V fragment read from shared memory feeds two
// products; the queries are read from shared memory at every key tile (in
// registers they would not fit beside the 32 x D accumulators). Two blocks
// fit a multiprocessor.
template <int D>
struct TileShape {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = 2;
  static constexpr int kMinBlocks = 2;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kBlockQ = kWarps * kRowsPerWarp;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per bf16 row
  // K and V, two stages each, then the queries.
  static constexpr size_t kSmemBytes = size_t{4 * kBlockK + kBlockQ} * D * sizeof(bf16);
};

struct FlashParams {
  const float* q;  // [tokens, q_heads, D] fp32
  const bf16* k;   // [kv_heads, n_pad, D] bf16, workspace
  const bf16* v;   // same
  float* out;      // [tokens, q_heads, D] fp32
  int64_t past;
  int64_t tokens;
  int64_t n_pad;
  int q_heads;
  int group;         // query heads per KV head
  float scale_log2;  // log2(e) / sqrt(D)
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] bf16
// tile: chunks are XOR-swizzled with the row's low 3 bits, so that the 8 rows
// an ldmatrix reads at one logical chunk fall in 8 different bank groups, and
// so do the 16-byte stores of the copies.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// c += a * b for one m16n8k16 tile: a is 16x16 (row-major fragment), b 16x8
// (column fragment), c 16x8 fp32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 bf16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix
// i, and register i of lane l receives row l / 4, columns 2 (l % 4) and + 1
// of matrix i (of its transpose with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

__device__ __forceinline__ void copy_async_16(uint32_t shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_dst), "l"(global_src));
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` committed groups of this thread are in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// The context's keys and values (past rows, then the pass's rows, fp32
// [row, kv_heads, D]) as bf16 [kv_heads, n_pad, D], zero past the context.
// One thread per 8 elements.
__global__ void convert_kv_kernel(AttentionArgs a, int64_t n_pad, bf16* k_out, bf16* v_out) {
  const int chunks = a.head_dim / 8;
  const int64_t n_ctx = a.past + a.tokens;
  const int64_t total = int64_t{a.kv_heads} * n_pad * chunks;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int c = static_cast<int>(i % chunks);
    const int64_t j = (i / chunks) % n_pad;
    const int g = static_cast<int>(i / (int64_t{chunks} * n_pad));
    uint4 kp = make_uint4(0, 0, 0, 0);
    uint4 vp = kp;
    if (j < n_ctx) {
      const bool in_past = j < a.past;
      const int64_t off =
          ((in_past ? j : j - a.past) * a.kv_heads + g) * int64_t{a.head_dim} + c * 8;
      const auto* ks = reinterpret_cast<const float4*>((in_past ? a.past_k : a.new_k) + off);
      const auto* vs = reinterpret_cast<const float4*>((in_past ? a.past_v : a.new_v) + off);
      const float4 k0 = ks[0], k1 = ks[1], v0 = vs[0], v1 = vs[1];
      kp = make_uint4(pack_bf16(k0.x, k0.y), pack_bf16(k0.z, k0.w), pack_bf16(k1.x, k1.y),
                      pack_bf16(k1.z, k1.w));
      vp = make_uint4(pack_bf16(v0.x, v0.y), pack_bf16(v0.z, v0.w), pack_bf16(v1.x, v1.y),
                      pack_bf16(v1.z, v1.w));
    }
    reinterpret_cast<uint4*>(k_out)[i] = kp;
    reinterpret_cast<uint4*>(v_out)[i] = vp;
  }
}

// Fragment layout (PTX ISA, mma.m16n8k16): lane = 4 * group + quad; a row of
// A and C belongs to the 4 lanes of a group (rows group and group + 8), a
// column pair to a quad (columns 2 * quad, +1, and +8 for A's second half).
template <int D>
__global__ void __launch_bounds__(TileShape<D>::kThreads, TileShape<D>::kMinBlocks)
    flash_attention_kernel(FlashParams p) {
  using Shape = TileShape<D>;
  constexpr int kMTiles = Shape::kMTiles;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kChunks = Shape::kChunks;
  constexpr int kTileElems = kBlockK * D;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* k_s = reinterpret_cast<bf16*>(smem);  // [2][kBlockK][D], swizzled
  bf16* v_s = k_s + 2 * kTileElems;           // [2][kBlockK][D], swizzled
  bf16* q_s = v_s + 2 * kTileElems;           // [kBlockQ][D], swizzled

  const int h = static_cast<int>(blockIdx.x);
  // The last query tiles see the longest context: they start first.
  const int64_t t0 = int64_t{gridDim.y - 1 - blockIdx.y} * Shape::kBlockQ;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group = lane >> 2;
  const int quad = lane & 3;
  const int64_t q_row = int64_t{p.q_heads} * D;

  // Queries scaled by log2(e) / sqrt(d), so that the softmax runs on exp2.
  static_assert(Shape::kBlockQ * kChunks % kThreads == 0 && kBlockK * kChunks % kThreads == 0);
#pragma unroll
  for (int i = 0; i < Shape::kBlockQ * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (t0 + r < p.tokens) {
      const auto* src =
          reinterpret_cast<const float4*>(p.q + (t0 + r) * q_row + int64_t{h} * D + c * 8);
      const float4 x = src[0];
      const float4 y = src[1];
      const float s = p.scale_log2;
      packed = make_uint4(pack_bf16(x.x * s, x.y * s), pack_bf16(x.z * s, x.w * s),
                          pack_bf16(y.x * s, y.y * s), pack_bf16(y.z * s, y.w * s));
    }
    *reinterpret_cast<uint4*>(q_s + swizzle<D>(r, c)) = packed;
  }
  // The barrier at the top of the key loop orders these stores before the
  // first ldmatrix of the queries.

  const int row_base = warp * Shape::kRowsPerWarp;
  // A-fragment addresses: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int a_chunk = lane >> 4;

  const int64_t last = t0 + Shape::kBlockQ < p.tokens ? t0 + Shape::kBlockQ : p.tokens;
  const int64_t n_end = p.past + last;  // context rows the block's last query sees
  const int n_tiles = static_cast<int>((n_end + kBlockK - 1) / kBlockK);
  const int g = h / p.group;
  const bf16* k_head = p.k + int64_t{g} * p.n_pad * D;
  const bf16* v_head = p.v + int64_t{g} * p.n_pad * D;
  // Tile copies: thread tid copies chunks tid + i * kThreads, i.e. rows
  // tid / kChunks + i * kThreads / kChunks at chunk tid % kChunks (same
  // swizzle for every i, as kThreads / kChunks is a multiple of 8).
  static_assert(kThreads / kChunks % 8 == 0);
  const uint32_t copy_dst = static_cast<uint32_t>(swizzle<D>(tid / kChunks, tid % kChunks)) * 2;
  const uint32_t k_smem = shared_address(k_s);
  const uint32_t v_smem = shared_address(v_s);
  const auto load_tile = [&](int j, int stage) {
    const bf16* kg = k_head + int64_t{j} * kTileElems + tid * 8;
    const bf16* vg = v_head + int64_t{j} * kTileElems + tid * 8;
    const uint32_t kd = k_smem + stage * kTileElems * 2 + copy_dst;
    const uint32_t vd = v_smem + stage * kTileElems * 2 + copy_dst;
#pragma unroll
    for (int i = 0; i < kBlockK * kChunks / kThreads; ++i) {
      copy_async_16(kd + i * (kThreads / kChunks) * D * 2, kg + i * kThreads * 8);
      copy_async_16(vd + i * (kThreads / kChunks) * D * 2, vg + i * kThreads * 8);
    }
  };
  load_tile(0, 0);
  copy_async_commit();

  // Context positions of the warp's first and last rows.
  const int64_t first_pos = p.past + t0 + row_base;
  const int64_t last_pos = first_pos + Shape::kRowsPerWarp - 1;
  // Byte offsets of this lane's ldmatrix rows: Q's A fragments, K's B
  // fragments (two 8-key tiles x 16 dims per ldmatrix) and V's (16 keys x two
  // 8-dim tiles, transposed). Every tile row a lane reads has the lane's row
  // bits 0-2, so the swizzled chunk of logical chunk 2 kd + c is
  // 8 (kd / 4) + (2 (kd % 4) ^ (c ^ lane % 8)): four offsets per operand and
  // compile-time constants, instead of an address per (kd, tile) pair that
  // the compiler would keep in registers.
  const int q_row0 = row_base + a_row;
  const int k_row0 = (lane & 7) + (lane >> 4) * 8;
  const int v_row0 = (lane & 7) + ((lane >> 3) & 1) * 8;
  uint32_t q_off[4];
  uint32_t k_off[4];
  uint32_t v_off[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q_off[i] = (q_row0 * D + (((2 * i) ^ (a_chunk ^ (lane & 7))) << 3)) * 2;
    k_off[i] = (k_row0 * D + (((2 * i) ^ (((lane >> 3) & 1) ^ (lane & 7))) << 3)) * 2;
    v_off[i] = (v_row0 * D + (((2 * i) ^ ((lane >> 4) ^ (lane & 7))) << 3)) * 2;
  }
  const uint32_t q_base = shared_address(q_s);

  float o[kMTiles][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[mt][dn][0] = o[mt][dn][1] = o[mt][dn][2] = o[mt][dn][3] = 0.0f;
    }
  }
  float m[kMTiles][2];
  float l[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    // Copy tile j + 1 while computing tile j (an empty group on the last).
    if (j + 1 < n_tiles) load_tile(j + 1, (j + 1) & 1);
    copy_async_commit();
    copy_async_wait<1>();
    __syncthreads();
    const int64_t k0 = int64_t{j} * kBlockK;
    // Warps whose rows all precede the tile skip it (diagonal tiles only).
    if (k0 <= last_pos) {
      const uint32_t kt = shared_address(k_s + (j & 1) * kTileElems);
      const uint32_t vt = shared_address(v_s + (j & 1) * kTileElems);
      // S = Q K^T for the warp's rows and the tile's 64 keys.
      float s[kMTiles][kBlockK / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kBlockK / 8; ++nt) {
          s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
        }
      }
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ldmatrix_x4(a[mt], q_base + q_off[kd % 4] + (kd / 4) * 128 + mt * 16 * D * 2);
        }
#pragma unroll
        for (int np = 0; np < kBlockK / 16; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, kt + k_off[kd % 4] + (kd / 4) * 128 + np * 16 * D * 2);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
            mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
      // Keys after a row's position are masked; only tiles that reach past
      // the warp's first row hold any (zero keys past the context included).
      if (k0 + kBlockK - 1 > first_pos) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          // Key index minus row position, relative to the tile: small ints.
          const int base = static_cast<int>(k0 - (first_pos + mt * 16 + group)) + quad * 2;
#pragma unroll
          for (int nt = 0; nt < kBlockK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int diff = base + nt * 8 + e;
              if (diff > 0) s[mt][nt][e] = -INFINITY;
              if (diff > 8) s[mt][nt][2 + e] = -INFINITY;
            }
          }
        }
      }
      // Online softmax. Key 0 is visible to every row and every warp
      // computes tile 0, so the running maxima are finite from the first
      // tile on; a row with no visible key in a later tile keeps its maximum
      // and adds zeros.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        float mx0 = m[mt][0];
        float mx1 = m[mt][1];
#pragma unroll
        for (int nt = 0; nt < kBlockK / 8; ++nt) {
          mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
          mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 2));
        const float c0 = fast_exp2(m[mt][0] - mx0);
        const float c1 = fast_exp2(m[mt][1] - mx1);
        m[mt][0] = mx0;
        m[mt][1] = mx1;
        float sum0 = 0.0f;
        float sum1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kBlockK / 8; ++nt) {
          s[mt][nt][0] = fast_exp2(s[mt][nt][0] - mx0);
          s[mt][nt][1] = fast_exp2(s[mt][nt][1] - mx0);
          s[mt][nt][2] = fast_exp2(s[mt][nt][2] - mx1);
          s[mt][nt][3] = fast_exp2(s[mt][nt][3] - mx1);
          sum0 += s[mt][nt][0] + s[mt][nt][1];
          sum1 += s[mt][nt][2] + s[mt][nt][3];
        }
        // Each lane keeps its own part of the row sums; the 4 lanes of a row
        // share the maxima, so the parts add up at the end.
        l[mt][0] = l[mt][0] * c0 + sum0;
        l[mt][1] = l[mt][1] * c1 + sum1;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          o[mt][dn][0] *= c0;
          o[mt][dn][1] *= c0;
          o[mt][dn][2] *= c1;
          o[mt][dn][3] *= c1;
        }
      }
      // O += P V: the C fragments of two adjacent 8-key score tiles are the
      // A fragment of one 16-key slice of P, kept in registers.
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        uint32_t pa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vt + v_off[dp % 4] + (dp / 4) * 128 + kk * 16 * D * 2);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_bf16(o[mt][2 * dp], pa[mt], b[0], b[1]);
            mma_bf16(o[mt][2 * dp + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with the stage the next copy refills
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    float l0 = l[mt][0];
    float l1 = l[mt][1];
    l0 += __shfl_xor_sync(kFullMask, l0, 1);
    l0 += __shfl_xor_sync(kFullMask, l0, 2);
    l1 += __shfl_xor_sync(kFullMask, l1, 1);
    l1 += __shfl_xor_sync(kFullMask, l1, 2);
    const float inv0 = 1.0f / l0;
    const float inv1 = 1.0f / l1;
    const int64_t r0 = t0 + row_base + mt * 16 + group;
    const int64_t r1 = r0 + 8;
    float* out0 = p.out + r0 * q_row + int64_t{h} * D + quad * 2;
    float* out1 = p.out + r1 * q_row + int64_t{h} * D + quad * 2;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      if (r0 < p.tokens) {
        *reinterpret_cast<float2*>(out0 + dn * 8) =
            make_float2(o[mt][dn][0] * inv0, o[mt][dn][1] * inv0);
      }
      if (r1 < p.tokens) {
        *reinterpret_cast<float2*>(out1 + dn * 8) =
            make_float2(o[mt][dn][2] * inv1, o[mt][dn][3] * inv1);
      }
    }
  }
}

template <int D>
Status launch_attention(const FlashParams& p, cudaStream_t stream) {
  using Shape = TileShape<D>;
  const int64_t tiles = (p.tokens + Shape::kBlockQ - 1) / Shape::kBlockQ;
  if (tiles > 65535) return Status::out_of_range("too many query tiles in one pass (> 8M tokens)");
  const auto kernel = flash_attention_kernel<D>;
  PQKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Shape::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(p.q_heads), static_cast<unsigned>(tiles));
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

int64_t padded_context(const AttentionArgs& a) {
  return (a.past + a.tokens + kBlockK - 1) / kBlockK * kBlockK;
}

}  // namespace

bool flash_attention_supported(int q_heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && kv_heads > 0 && q_heads > 0 &&
         q_heads % kv_heads == 0;
}

size_t flash_attention_workspace_bytes(const AttentionArgs& args) {
  if (args.tokens <= 0 || args.past < 0 || args.kv_heads <= 0 || args.head_dim <= 0) return 0;
  return 2 * static_cast<size_t>(padded_context(args)) * static_cast<size_t>(args.kv_heads) *
         static_cast<size_t>(args.head_dim) * sizeof(bf16);
}

Status flash_attention(const AttentionArgs& args, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (!flash_attention_supported(args.q_heads, args.kv_heads, args.head_dim)) {
    return Status::invalid_argument(
        "flash attention runs head_dim 64 or 128 with q_heads a multiple of kv_heads; got "
        "head_dim " +
        std::to_string(args.head_dim) + ", heads " + std::to_string(args.q_heads) + "/" +
        std::to_string(args.kv_heads) + " (use causal_attention)");
  }
  if (args.tokens < 0 || args.past < 0) {
    return Status::invalid_argument("flash attention needs tokens >= 0 and past >= 0");
  }
  if (args.tokens == 0) return ok_status();
  const bool past_ok = args.past == 0 || (aligned16(args.past_k) && aligned16(args.past_v));
  if (!past_ok || !aligned16(args.q) || !aligned16(args.new_k) || !aligned16(args.new_v) ||
      !aligned16(args.out) || !aligned16(workspace)) {
    return Status::invalid_argument(
        "flash attention needs 16-byte aligned queries, keys, values, output and workspace");
  }
  const size_t need = flash_attention_workspace_bytes(args);
  if (workspace == nullptr || workspace_bytes < need) {
    return Status::invalid_argument("flash attention needs a workspace of " + std::to_string(need) +
                                    " bytes (flash_attention_workspace_"
                                    "bytes); got " +
                                    std::to_string(workspace_bytes));
  }
  const int64_t n_pad = padded_context(args);
  auto* k = static_cast<bf16*>(workspace);
  bf16* v = k + n_pad * args.kv_heads * args.head_dim;
  const int64_t chunks = n_pad * args.kv_heads * (args.head_dim / 8);
  constexpr int kConvertThreads = 256;
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>((chunks + kConvertThreads - 1) / kConvertThreads, int64_t{1} << 20));
  convert_kv_kernel<<<blocks, kConvertThreads, 0, stream>>>(args, n_pad, k, v);
  PQKV_CUDA_CHECK_LAUNCH();

  FlashParams p{};
  p.q = args.q;
  p.k = k;
  p.v = v;
  p.out = args.out;
  p.past = args.past;
  p.tokens = args.tokens;
  p.n_pad = n_pad;
  p.q_heads = args.q_heads;
  p.group = args.q_heads / args.kv_heads;
  p.scale_log2 =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(args.head_dim)));
  return args.head_dim == 64 ? launch_attention<64>(p, stream) : launch_attention<128>(p, stream);
}

}  // namespace pqkv::model::cuda
