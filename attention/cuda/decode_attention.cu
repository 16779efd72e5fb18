#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "attention/cuda/decode_attention.cuh"
#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
// Caps the split kernel at 128 registers so that DecodeAttentionSplits::
// kTargetWarpsPerSm warps fit on an SM.
constexpr int kBlocksPerSm = DecodeAttentionSplits::kTargetWarpsPerSm / kWarpsPerBlock;
constexpr int kTile = kQueryHeadsPerTile;
// The combine reads every split's partial output once: a wide block and
// several loads in flight per thread keep that to a few memory round trips.
constexpr int kCombineThreads = 512;
constexpr int kCombineBatch = 4;
constexpr float kLog2e = 1.4426950408889634f;

// Eight row elements (one 16-byte load) as floats.
template <class RowT>
__device__ __forceinline__ void to_float8(const uint4& v, float (&f)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 pair;
    if constexpr (std::is_same_v<RowT, __nv_bfloat16>) {
      pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    } else {
      pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    }
    f[2 * i] = pair.x;
    f[2 * i + 1] = pair.y;
  }
}

struct SplitParams {
  const uint4* rows;
  const void* queries;
  bool queries_bf16;
  float q_scale;  // log2(e) / sqrt(head_dim): scores come out in the exp2 domain
  int group;      // query heads per KV head
  int splits;
  int64_t tokens;
  int64_t tokens_per_split;
  int64_t head_stride;  // rows
  float* lse;           // [q_heads, splits]
  float* partial;       // [q_heads, splits, head_dim]
  // Device-side row count (DecodeAttentionArgs::device_tokens), or null; then
  // tokens, splits, tokens_per_split and head_stride come from it.
  const int64_t* device_tokens;
  int kv_heads;
  int tiles;
  int num_sms;
};

// Reads the device-side row count into `p` and splits it as the host would.
template <int kHeadDim>
__device__ __forceinline__ void resolve_tokens(SplitParams& p) {
  if (p.device_tokens == nullptr) return;
  p.tokens = *p.device_tokens;
  p.head_stride = p.tokens;
  if (p.tokens <= 0) {
    p.splits = 0;
    return;
  }
  p.tokens_per_split = decode_attention_tokens_per_split(p.tokens, kHeadDim,
                                                         int64_t{p.kv_heads} * p.tiles, p.num_sms);
  p.splits = static_cast<int>((p.tokens + p.tokens_per_split - 1) / p.tokens_per_split);
}

// One warp per (split, tile, KV head). Each lane owns 8 of the head's
// dimensions (one 16-byte load of K and one of V per token); the
// head_dim / 8 lanes of a "slot" share a token, so a warp works on
// 32 / (head_dim / 8) tokens per load and kUnroll such loads per iteration,
// all issued before any is used. Every slot keeps its own online softmax
// (max, sum, accumulator per query head of the tile); slots merge at the end.
template <int kHeadDim, class RowT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kBlocksPerSm)
    decode_attention_split_kernel(SplitParams p) {
  constexpr int kLanesPerToken = kHeadDim / 8;
  constexpr int kSlots = 32 / kLanesPerToken;
  constexpr int kUnroll = 4;
  constexpr int kRowChunks = kHeadDim / 4;  // 16-byte chunks per row: K then V
  constexpr int kTokensPerIter = kSlots * kUnroll;

  resolve_tokens<kHeadDim>(p);
  const int lane = threadIdx.x % 32;
  const int split = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (split >= p.splits) return;
  const int tile = blockIdx.y;
  const int kv = blockIdx.z;
  const int slot = lane / kLanesPerToken;
  const int part = lane % kLanesPerToken;
  const int first_q = kv * p.group + tile * kTile;
  const int heads_here = min(kTile, p.group - tile * kTile);

  // The tile's queries, pre-scaled; absent heads (a partial tile) are zero.
  float q[kTile][8];
#pragma unroll
  for (int h = 0; h < kTile; ++h) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      q[h][j] = 0.0f;
    if (h < heads_here) {
      const int64_t base = int64_t{first_q + h} * kHeadDim + part * 8;
      if (p.queries_bf16) {
        const uint4 raw =
            *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.queries) + base);
        to_float8<__nv_bfloat16>(raw, q[h]);
      } else {
        const auto* src =
            reinterpret_cast<const float4*>(static_cast<const float*>(p.queries) + base);
        const float4 a = src[0];
        const float4 b = src[1];
        q[h][0] = a.x, q[h][1] = a.y, q[h][2] = a.z, q[h][3] = a.w;
        q[h][4] = b.x, q[h][5] = b.y, q[h][6] = b.z, q[h][7] = b.w;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)
        q[h][j] *= p.q_scale;
    }
  }

  float m[kTile];
  float l[kTile];
  float acc[kTile][8];
#pragma unroll
  for (int h = 0; h < kTile; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      acc[h][j] = 0.0f;
  }

  const int64_t begin = split * p.tokens_per_split;
  const int64_t end = min(p.tokens, begin + p.tokens_per_split);
  const uint4* head_rows = p.rows + kv * p.head_stride * kRowChunks;

  for (int64_t t0 = begin; t0 < end; t0 += kTokensPerIter) {
    uint4 kraw[kUnroll];
    uint4 vraw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = t0 + u * kSlots + slot;
      valid[u] = t < end;
      kraw[u] = make_uint4(0, 0, 0, 0);
      vraw[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const uint4* row = head_rows + t * kRowChunks;
        kraw[u] = __ldg(row + part);
        vraw[u] = __ldg(row + kLanesPerToken + part);
      }
    }

    // Scores: a partial dot product per lane, summed over the slot's lanes.
    float s[kUnroll][kTile];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8];
      to_float8<RowT>(kraw[u], k);
#pragma unroll
      for (int h = 0; h < kTile; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          dot = fmaf(q[h][j], k[j], dot);
        s[u][h] = dot;
      }
    }
#pragma unroll
    for (int offset = kLanesPerToken / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int h = 0; h < kTile; ++h)
          s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], offset);
      }
    }

    // Online softmax: one rescale per iteration, then the weights.
#pragma unroll
    for (int h = 0; h < kTile; ++h) {
      float best = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!valid[u]) s[u][h] = -INFINITY;
        best = fmaxf(best, s[u][h]);
      }
      // A slot that has seen no token yet keeps max -inf; exp2 of -inf is 0.
      const float base = best == -INFINITY ? 0.0f : best;
      const float rescale = exp2f(m[h] - base);
      l[h] *= rescale;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[h][j] *= rescale;
      m[h] = best;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        s[u][h] = exp2f(s[u][h] - base);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float v[8];
      to_float8<RowT>(vraw[u], v);
#pragma unroll
      for (int h = 0; h < kTile; ++h) {
        l[h] += s[u][h];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          acc[h][j] = fmaf(s[u][h], v[j], acc[h][j]);
      }
    }
  }

  // Merge the slots: lanes with the same `part` in different slots hold the
  // same dimensions of different token streams.
#pragma unroll
  for (int offset = kLanesPerToken; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < kTile; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
      const float best = fmaxf(m[h], m_other);
      const float base = best == -INFINITY ? 0.0f : best;
      const float mine = exp2f(m[h] - base);
      const float theirs = exp2f(m_other - base);
      l[h] = l[h] * mine + l_other * theirs;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float a_other = __shfl_xor_sync(0xffffffffu, acc[h][j], offset);
        acc[h][j] = acc[h][j] * mine + a_other * theirs;
      }
      m[h] = best;
    }
  }

  // Every split holds at least one token, so l > 0 here.
  if (slot == 0) {
#pragma unroll
    for (int h = 0; h < kTile; ++h) {
      if (h < heads_here) {
        const int64_t idx = int64_t{first_q + h} * p.splits + split;
        const float inv = 1.0f / l[h];
        auto* dst = reinterpret_cast<float4*>(p.partial + idx * kHeadDim + part * 8);
        dst[0] = make_float4(acc[h][0] * inv, acc[h][1] * inv, acc[h][2] * inv, acc[h][3] * inv);
        dst[1] = make_float4(acc[h][4] * inv, acc[h][5] * inv, acc[h][6] * inv, acc[h][7] * inv);
        if (part == 0) p.lse[idx] = m[h] + log2f(l[h]);
      }
    }
  }
}

// Reduces `v` over the block with `op`; every thread gets the result.
template <class Op>
__device__ float block_reduce(float v, Op op, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
    v = op(v, scratch[w]);
  __syncthreads();  // scratch is reused by the next reduction
  return v;
}

// Records out[qh][dim] = v in the report unless an element was recorded before.
__device__ void record_non_finite(OutputReport* report, int layer, int qh, int dim, float v) {
  if (atomicCAS(&report->found, 0, 1) != 0) return;
  report->layer = layer;
  report->q_head = qh;
  report->dim = dim;
  report->value = v;
  __threadfence_system();
}

// One block per query head: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
// The weights go to shared memory once; then threads form groups of
// head_dim / 4 lanes (a float4 each), group g takes splits g, g + groups, ...,
// kCombineBatch loads in flight per thread, and the groups' sums meet in
// shared memory.
__global__ void __launch_bounds__(kCombineThreads)
    decode_attention_combine_kernel(SplitParams p, int head_dim, void* out, bool out_bf16,
                                    OutputReport* report, int layer) {
  if (head_dim == 128) {
    resolve_tokens<128>(p);
  } else {
    resolve_tokens<64>(p);
  }
  const float* __restrict__ lse = p.lse;
  const float* __restrict__ partial = p.partial;
  const int splits = p.splits;
  if (splits == 0) {
    // Attention over nothing is zero, as in the CPU reference.
    const int64_t at = int64_t{blockIdx.x} * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
      if (out_bf16) {
        static_cast<__nv_bfloat16*>(out)[at + c] = __float2bfloat16(0.0f);
      } else {
        static_cast<float*>(out)[at + c] = 0.0f;
      }
    }
    return;
  }
  __shared__ float scratch[kCombineThreads / 32];
  __shared__ float weights[DecodeAttentionSplits::kMaxSplits];
  __shared__ float4 sums[kCombineThreads];
  const int qh = blockIdx.x;
  const float* head_lse = lse + int64_t{qh} * splits;

  float best = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads)
    best = fmaxf(best, head_lse[s]);
  best = block_reduce(
      best, [](float a, float b) { return fmaxf(a, b); }, scratch);
  float total = 0.0f;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) {
    weights[s] = exp2f(head_lse[s] - best);
    total += weights[s];
  }
  // Its barriers also publish `weights`.
  total = block_reduce(
      total, [](float a, float b) { return a + b; }, scratch);

  const int lanes = head_dim / 4;
  const int groups = kCombineThreads / lanes;
  const int group = threadIdx.x / lanes;
  const int c = threadIdx.x % lanes;
  const auto* head_partial =
      reinterpret_cast<const float4*>(partial + int64_t{qh} * splits * head_dim) + c;
  const int64_t split_stride = head_dim / 4;  // float4s
  float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto accumulate = [&](int s, const float4& o) {
    const float w = weights[s];
    a.x = fmaf(w, o.x, a.x);
    a.y = fmaf(w, o.y, a.y);
    a.z = fmaf(w, o.z, a.z);
    a.w = fmaf(w, o.w, a.w);
  };
  int s = group;
  for (; s + (kCombineBatch - 1) * groups < splits; s += kCombineBatch * groups) {
    float4 o[kCombineBatch];
#pragma unroll
    for (int k = 0; k < kCombineBatch; ++k)
      o[k] = __ldg(head_partial + (s + k * groups) * split_stride);
#pragma unroll
    for (int k = 0; k < kCombineBatch; ++k)
      accumulate(s + k * groups, o[k]);
  }
  for (; s < splits; s += groups)
    accumulate(s, __ldg(head_partial + s * split_stride));
  sums[threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.x >= lanes) return;
  float4 r = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int g = 0; g < groups; ++g) {
    const float4 v = sums[g * lanes + c];
    r.x += v.x, r.y += v.y, r.z += v.z, r.w += v.w;
  }
  const float inv = 1.0f / total;
  const int64_t at = int64_t{qh} * head_dim + c * 4;
  float4 v = make_float4(r.x * inv, r.y * inv, r.z * inv, r.w * inv);
  if (out_bf16) {
    auto* dst = reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + at);
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
    dst[0] = lo;
    dst[1] = hi;
    // What was written: a finite sum can round past bf16's largest value.
    v = make_float4(__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi));
  } else {
    *reinterpret_cast<float4*>(static_cast<float*>(out) + at) = v;
  }
  if (report != nullptr) {
    const float e[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      if (!isfinite(e[i])) {
        record_non_finite(report, layer, qh, c * 4 + i, e[i]);
        break;
      }
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <int kHeadDim, class RowT>
void launch_split(dim3 grid, const SplitParams& p, cudaStream_t stream) {
  decode_attention_split_kernel<kHeadDim, RowT><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
}

}  // namespace

Status launch_decode_attention(const DecodeAttentionArgs& args, cudaStream_t stream) {
  const DecodeAttentionShape& shape = args.shape;
  PQKV_RETURN_IF_ERROR(shape.validate());
  if (args.queries == nullptr || args.out == nullptr || !aligned16(args.queries) ||
      !aligned16(args.out)) {
    return Status::invalid_argument(
        "decode attention: queries and out must be 16-byte aligned device pointers");
  }
  const size_t out_bytes =
      static_cast<size_t>(shape.q_heads) * shape.head_dim * dtype_size(shape.out_dtype);
  if (args.device_tokens != nullptr && shape.head_stride != 0) {
    return Status::invalid_argument(
        "decode attention: a device-side row count needs dense rows (head_stride 0)");
  }
  if (shape.tokens == 0) {
    // Attention over nothing is zero, as in the CPU reference.
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(args.out, 0, out_bytes, stream));
    return ok_status();
  }
  if (args.rows == nullptr || !aligned16(args.rows)) {
    return Status::invalid_argument(
        "decode attention: rows must be a 16-byte aligned device pointer");
  }

  int device = 0;
  int num_sms = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  DecodeAttentionSplits plan = plan_decode_attention(shape, num_sms);
  if (args.device_tokens != nullptr) {
    // Room for the most splits any count up to shape.tokens can take; the
    // kernels then split the count they read.
    plan.splits = static_cast<int>(
        std::min<int64_t>((shape.tokens + DecodeAttentionSplits::kMinTokensPerSplit - 1) /
                              DecodeAttentionSplits::kMinTokensPerSplit,
                          DecodeAttentionSplits::kMaxSplits));
  }
  const DecodeAttentionWorkspaceLayout layout =
      decode_attention_workspace_layout(shape, plan.splits);
  if (args.workspace == nullptr || args.workspace_bytes < layout.bytes ||
      !aligned16(args.workspace)) {
    return Status::invalid_argument(
        "decode attention: the workspace must be 16-byte aligned device memory of at least " +
        std::to_string(decode_attention_workspace_bytes(shape)) + " bytes, got " +
        std::to_string(args.workspace_bytes));
  }

  auto* ws = static_cast<std::byte*>(args.workspace);
  SplitParams p;
  p.rows = static_cast<const uint4*>(args.rows);
  p.queries = args.queries;
  p.queries_bf16 = shape.query_dtype == DType::kBF16;
  p.q_scale = kLog2e / std::sqrt(static_cast<float>(shape.head_dim));
  p.group = shape.group_size();
  p.splits = plan.splits;
  p.tokens = shape.tokens;
  p.tokens_per_split = plan.tokens_per_split;
  p.head_stride = shape.stride();
  p.lse = reinterpret_cast<float*>(ws + layout.lse_offset);
  p.partial = reinterpret_cast<float*>(ws + layout.out_offset);
  p.device_tokens = args.device_tokens;
  p.kv_heads = shape.kv_heads;
  p.tiles = plan.tiles;
  p.num_sms = num_sms;

  const dim3 grid((plan.splits + kWarpsPerBlock - 1) / kWarpsPerBlock, plan.tiles, shape.kv_heads);
  const bool bf16 = shape.row_dtype == DType::kBF16;
  if (shape.head_dim == 128) {
    bf16 ? launch_split<128, __nv_bfloat16>(grid, p, stream)
         : launch_split<128, __half>(grid, p, stream);
  } else {
    bf16 ? launch_split<64, __nv_bfloat16>(grid, p, stream)
         : launch_split<64, __half>(grid, p, stream);
  }
  PQKV_CUDA_CHECK_LAUNCH();
  decode_attention_combine_kernel<<<shape.q_heads, kCombineThreads, 0, stream>>>(
      p, shape.head_dim, args.out, shape.out_dtype == DType::kBF16, args.report, args.report_layer);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

DecodeAttentionShape FullAttentionArgs::shape() const {
  DecodeAttentionShape s = DecodeAttentionShape::from_spec(spec, context);
  s.head_stride = capacity;
  s.query_dtype = query_dtype;
  s.out_dtype = out_dtype;
  return s;
}

Status launch_full_attention(const FullAttentionArgs& args, cudaStream_t stream) {
  DecodeAttentionArgs a;
  a.shape = args.shape();
  a.rows = args.layer_rows;
  a.queries = args.queries;
  a.out = args.out;
  a.workspace = args.workspace;
  a.workspace_bytes = args.workspace_bytes;
  a.report = args.report;
  a.report_layer = args.report_layer;
  return launch_decode_attention(a, stream);
}

}  // namespace pqkv::attention::cuda
