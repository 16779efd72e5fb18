#include "model/cuda/flash_attention.cuh"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "core/cuda_check.h"

namespace pqkv::model::cuda {
namespace {

// A block is 4 warps; each warp owns 16 query rows of one query head, so a
// block covers 64 queries. Keys and values go through shared memory 64 at a
// time: K row-major, V transposed, so that both products read their B
// fragments as aligned bf16 pairs. The 8-element row padding spreads the
// fragment reads of a warp over all 32 banks.
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockQ = kWarps * 16;
constexpr int kBlockK = 64;
constexpr int kPad = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
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

// Fragment layout (PTX ISA, mma.m16n8k16): lane = 4 * group + thread; a row
// of A and C belongs to the 4 lanes of a group (rows group and group + 8), a
// column pair to a thread (columns 2 * thread, +1, and +8 for A's second half).
template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_attention_kernel(AttentionArgs a, float scale_log2) {
  __shared__ __align__(16) __nv_bfloat16 k_tile[kBlockK][D + kPad];
  __shared__ __align__(16) __nv_bfloat16 v_tile_t[D][kBlockK + kPad];

  const int h = static_cast<int>(blockIdx.x);
  // The last query tiles see the longest context: they start first.
  const int64_t t0 = int64_t{gridDim.y - 1 - blockIdx.y} * kBlockQ;
  const int g = h / (a.q_heads / a.kv_heads);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int group = lane >> 2;
  const int thread = lane & 3;
  const int64_t q_row = int64_t{a.q_heads} * D;
  const int64_t kv_row = int64_t{a.kv_heads} * D;

  // This thread's two query rows (pass indices), and their queries as A
  // fragments, pre-scaled by log2(e) / sqrt(d) so that the softmax uses exp2.
  const int64_t r0 = t0 + warp * 16 + group;
  const int64_t r1 = r0 + 8;
  const bool valid0 = r0 < a.tokens;
  const bool valid1 = r1 < a.tokens;
  uint32_t qa[D / 16][4];
  {
    const float* q0 = a.q + r0 * q_row + int64_t{h} * D;
    const float* q1 = a.q + r1 * q_row + int64_t{h} * D;
    const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
      const int c = kd * 16 + thread * 2;
      const float2 x00 = valid0 ? *reinterpret_cast<const float2*>(q0 + c) : zero;
      const float2 x10 = valid1 ? *reinterpret_cast<const float2*>(q1 + c) : zero;
      const float2 x01 = valid0 ? *reinterpret_cast<const float2*>(q0 + c + 8) : zero;
      const float2 x11 = valid1 ? *reinterpret_cast<const float2*>(q1 + c + 8) : zero;
      qa[kd][0] = pack_bf16(x00.x * scale_log2, x00.y * scale_log2);
      qa[kd][1] = pack_bf16(x10.x * scale_log2, x10.y * scale_log2);
      qa[kd][2] = pack_bf16(x01.x * scale_log2, x01.y * scale_log2);
      qa[kd][3] = pack_bf16(x11.x * scale_log2, x11.y * scale_log2);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  }
  float m0 = -INFINITY;
  float m1 = -INFINITY;
  float l0 = 0.0f;
  float l1 = 0.0f;
  const int64_t pos0 = a.past + r0;  // context positions of the two rows
  const int64_t pos1 = a.past + r1;
  const int64_t last = t0 + kBlockQ < a.tokens ? t0 + kBlockQ : a.tokens;
  const int64_t n_end = a.past + last;  // context rows the block's last query sees

  for (int64_t k0 = 0; k0 < n_end; k0 += kBlockK) {
    __syncthreads();  // every warp is done with the previous tile
    for (int idx = static_cast<int>(threadIdx.x); idx < kBlockK * D / 4; idx += kThreads) {
      const int r = idx / (D / 4);
      const int c = (idx % (D / 4)) * 4;
      const int64_t j = k0 + r;
      float4 kx = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      float4 vx = kx;
      if (j < n_end) {
        const bool in_past = j < a.past;
        const int64_t off = (in_past ? j : j - a.past) * kv_row + int64_t{g} * D + c;
        kx = *reinterpret_cast<const float4*>((in_past ? a.past_k : a.new_k) + off);
        vx = *reinterpret_cast<const float4*>((in_past ? a.past_v : a.new_v) + off);
      }
      uint2 kp;
      kp.x = pack_bf16(kx.x, kx.y);
      kp.y = pack_bf16(kx.z, kx.w);
      *reinterpret_cast<uint2*>(&k_tile[r][c]) = kp;
      v_tile_t[c][r] = __float2bfloat16_rn(vx.x);
      v_tile_t[c + 1][r] = __float2bfloat16_rn(vx.y);
      v_tile_t[c + 2][r] = __float2bfloat16_rn(vx.z);
      v_tile_t[c + 3][r] = __float2bfloat16_rn(vx.w);
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[kBlockK / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockK / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    }
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
#pragma unroll
      for (int nt = 0; nt < kBlockK / 8; ++nt) {
        const __nv_bfloat16* kr = &k_tile[nt * 8 + group][kd * 16 + thread * 2];
        mma_bf16(s[nt], qa[kd], load_pair(kr), load_pair(kr + 8));
      }
    }
    // Keys after a row's position are masked; only tiles that reach past the
    // block's first query hold any (zero-padded keys past n_end included).
    if (k0 + kBlockK - 1 > a.past + t0) {
#pragma unroll
      for (int nt = 0; nt < kBlockK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = k0 + nt * 8 + thread * 2 + e;
          if (j > pos0) s[nt][e] = -INFINITY;
          if (j > pos1) s[nt][2 + e] = -INFINITY;
        }
      }
    }
    // Online softmax. Key 0 is visible to every row, so the running maxima
    // are finite from the first tile on; a row with no visible key in a later
    // tile keeps its maximum and adds zeros.
    float mx0 = m0;
    float mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < kBlockK / 8; ++nt) {
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, 2));
    const float c0 = exp2f(m0 - mx0);
    const float c1 = exp2f(m1 - mx1);
    m0 = mx0;
    m1 = mx1;
    float sum0 = 0.0f;
    float sum1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kBlockK / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - mx0);
      s[nt][1] = exp2f(s[nt][1] - mx0);
      s[nt][2] = exp2f(s[nt][2] - mx1);
      s[nt][3] = exp2f(s[nt][3] - mx1);
      sum0 += s[nt][0] + s[nt][1];
      sum1 += s[nt][2] + s[nt][3];
    }
    // Each lane keeps its own part of the row sums; the 4 lanes of a row
    // share the maxima, so the parts add up at the end.
    l0 = l0 * c0 + sum0;
    l1 = l1 * c1 + sum1;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= c0;
      o[dn][1] *= c0;
      o[dn][2] *= c1;
      o[dn][3] *= c1;
    }
    // O += P V: the C fragments of two adjacent 8-key score tiles are the A
    // fragment of one 16-key slice of P.
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                              pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const __nv_bfloat16* vr = &v_tile_t[dn * 8 + group][kk * 16 + thread * 2];
        mma_bf16(o[dn], pa, load_pair(vr), load_pair(vr + 8));
      }
    }
  }

  l0 += __shfl_xor_sync(kFullMask, l0, 1);
  l0 += __shfl_xor_sync(kFullMask, l0, 2);
  l1 += __shfl_xor_sync(kFullMask, l1, 1);
  l1 += __shfl_xor_sync(kFullMask, l1, 2);
  const float inv0 = 1.0f / l0;
  const float inv1 = 1.0f / l1;
  float* out0 = a.out + r0 * q_row + int64_t{h} * D + thread * 2;
  float* out1 = a.out + r1 * q_row + int64_t{h} * D + thread * 2;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    if (valid0) {
      *reinterpret_cast<float2*>(out0 + dn * 8) = make_float2(o[dn][0] * inv0, o[dn][1] * inv0);
    }
    if (valid1) {
      *reinterpret_cast<float2*>(out1 + dn * 8) = make_float2(o[dn][2] * inv1, o[dn][3] * inv1);
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

bool flash_attention_supported(int q_heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && kv_heads > 0 && q_heads > 0 &&
         q_heads % kv_heads == 0;
}

Status flash_attention(const AttentionArgs& args, cudaStream_t stream) {
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
      !aligned16(args.out)) {
    return Status::invalid_argument(
        "flash attention needs 16-byte aligned queries, keys, values and output");
  }
  const int64_t tiles = (args.tokens + kBlockQ - 1) / kBlockQ;
  if (tiles > 65535) return Status::out_of_range("too many query tiles in one pass (> 4M tokens)");
  const float scale_log2 =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(args.head_dim)));
  const dim3 grid(static_cast<unsigned>(args.q_heads), static_cast<unsigned>(tiles));
  if (args.head_dim == 64) {
    flash_attention_kernel<64><<<grid, kThreads, 0, stream>>>(args, scale_log2);
  } else {
    flash_attention_kernel<128><<<grid, kThreads, 0, stream>>>(args, scale_log2);
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::model::cuda
