// Scalar-quantized keys (int8, int4) and exact fp32 keys on the GPU: fitting
// per-channel scales, encoding, the per-query tables, the scan that scores
// every token, and the device-side score source that the GPU search
// (pq_search.cuh, launch_sq_search) reads where tensor cores do not
// (sq_tile_scores.cuh). The layouts and arithmetic are
// those of cpu/key_codecs_cpu.h (ScalarCodecCpu, ExactCodecCpu), the
// reference these kernels are compared with.
//
// Codes live per KV head as [token][code_size] bytes, code_size = head_dim
// (int8), head_dim / 2 (int4: channel 2i in the low nibble of byte i) or
// 4 * head_dim (exact: the key as fp32). Every pointer is device memory;
// every launch is enqueued on `stream` and returns InvalidArgument for a bad
// geometry, Internal for a CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// Exact keys: `bits` of the exact code, the key stored as fp32.
inline constexpr int kExactBits = 32;
// The largest head_dim the scalar and exact kernels handle.
inline constexpr int kSqMaxHeadDim = 256;

struct SqGeometry {
  int kv_heads = 0;
  int head_dim = 0;
  int bits = 8;  // 8, 4, or kExactBits
  __host__ __device__ int code_size() const { return head_dim * bits / 8; }
};

// Where a fit on the device records keys outside its codec's fp32 range (as
// the CPU codecs refuse them in train): the first such KV head, in pinned
// host memory mapped into the device; read once the fit's stream is done.
struct KeyFitReport {
  int32_t found = 0;  // 0 until a fit records; then the rest is set
  int32_t pq = 0;     // 1: PQ (`largest` is the KV head's largest |key|); 0: scalar
  int32_t kv_head = 0;
  int32_t channel = 0;  // scalar: the channel whose span left fp32
  float lo = 0.0f;      // scalar: the channel's smallest and largest key
  float hi = 0.0f;
  float largest = 0.0f;
};

// Fits per-channel scales to keys, as ScalarCodecCpu::train: per (KV head,
// channel) offset = the smallest value, scale = (largest - smallest) /
// (2^bits - 1), or 1 for a constant channel. Needs bits 8 or 4 and n >= 1.
struct SqFitArgs {
  SqGeometry geo;
  const void* keys = nullptr;  // [n][kv_heads][head_dim] of `dtype`
  DType dtype = DType::kF32;
  int64_t n = 0;
  float* scale = nullptr;   // out [kv_heads][head_dim]
  float* offset = nullptr;  // out [kv_heads][head_dim]
  // When set, a channel whose span (largest - smallest) is not finite is
  // recorded here (its scale is then not usable).
  KeyFitReport* report = nullptr;
};

// One block per (KV head, 32 channels); deterministic (no atomics).
Status launch_sq_fit(const SqFitArgs& args, cudaStream_t stream);

// PQ fits and encodes by squared distances in fp32: records in `report` the
// first KV head of keys [n][kv_heads][head_dim] (`dtype`, device memory)
// whose largest |key| is past kPqLargestKey, or below kPqSmallestKey but not
// zero (index/key_range.h), as PqCodecCpu::train refuses them. `scratch` holds kv_heads words
// (device).
Status launch_pq_key_range(const void* keys, DType dtype, int64_t n, int kv_heads, int head_dim,
                           uint32_t* scratch, KeyFitReport* report, cudaStream_t stream);

struct SqEncodeArgs {
  SqGeometry geo;
  const void* keys = nullptr;  // [n][kv_heads][head_dim] of `dtype`
  DType dtype = DType::kF32;
  int64_t n = 0;
  const float* scale = nullptr;   // [kv_heads][head_dim]; unused for exact keys
  const float* offset = nullptr;  // [kv_heads][head_dim]; unused for exact keys
  // Row t goes to codes[h * head_stride + (first_token + t) * code_size].
  uint8_t* codes = nullptr;
  int64_t head_stride = 0;
  int64_t first_token = 0;
  // When non-null (device), *first_position is added to first_token when the
  // kernel runs, and codes of tokens at or past max_tokens are not written:
  // encoding at a device-side sequence length, for replayed graphs.
  const int64_t* first_position = nullptr;
  int64_t max_tokens = 0;
};

// Encodes rows [0, n) of every KV head: one thread per (row, head, code byte;
// for exact keys, channel).
Status launch_sq_encode(const SqEncodeArgs& args, cudaStream_t stream);

// The per-query tables of ScalarCodecCpu::prepare (ExactCodecCpu::prepare for
// exact keys: the query and a zero offset term): tables[h] = [head_dim]
// q[c] * scale[c], then the sum of q[c] * offset[c] in channel order.
struct SqTablesArgs {
  SqGeometry geo;
  int q_heads = 0;                // a multiple of kv_heads
  const void* queries = nullptr;  // [q_heads][head_dim] of `query_dtype`
  DType query_dtype = DType::kF32;
  const float* scale = nullptr;   // [kv_heads][head_dim]; null for exact keys
  const float* offset = nullptr;  // [kv_heads][head_dim]; null for exact keys
  float* tables = nullptr;        // out [q_heads][head_dim + 1]
};

Status launch_sq_tables(const SqTablesArgs& args, cudaStream_t stream);

struct SqScanArgs {
  SqGeometry geo;
  int q_heads = 0;                 // a multiple of kv_heads
  const float* queries = nullptr;  // [q_heads][head_dim] fp32
  const float* scale = nullptr;    // [kv_heads][head_dim]
  const float* offset = nullptr;   // [kv_heads][head_dim]
  const uint8_t* codes = nullptr;  // [kv_head][head_stride bytes]
  int64_t head_stride = 0;
  int64_t begin = 0;  // tokens scored: [begin, end)
  int64_t end = 0;
  float* tables = nullptr;  // workspace [q_heads][head_dim + 1]
  float* scores = nullptr;  // out [q_heads][end - begin]: raw scores, as ScalarCodecCpu::scan
};

// Builds each query head's table, then scores tokens [begin, end) for every
// query head (one thread per (token, query head)).
Status launch_sq_scan(const SqScanArgs& args, cudaStream_t stream);

// The geometry checks every launcher above makes.
Status check_sq_geometry(const SqGeometry& g);

#if defined(__CUDACC__)
// Raw scores of scalar or exact codes for the GPU search's scans
// (pq_search.cu): stages the GQA group's tables of one KV head in shared
// memory, then scores a token for each head of the group as the CPU codecs
// do: channel c into lane c % 8, the lanes summed in a fixed order, then the
// offset term; products and sums unfused.
struct SqSource {
  const uint8_t* codes;  // [kv][head_stride bytes]
  const float* tables;   // [q_heads][head_dim + 1]
  int64_t head_stride;
  int head_dim;
  int bits;
  int group;

  // Shared-memory row of one query head's table: head_dim weights, then the
  // offset term, padded so that every row starts 16-byte aligned.
  __host__ __device__ int table_row() const { return (head_dim + 1 + 3) / 4 * 4; }
  template <int kGroupPad>
  size_t smem_bytes() const {
    return sizeof(float) * group * table_row();
  }
  template <int kGroupPad>
  __device__ void prepare(int kv, float* smem) const {
    const int n = group * (head_dim + 1);
    const int row = table_row();
    const float* src = tables + int64_t{kv} * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      smem[(i / (head_dim + 1)) * row + i % (head_dim + 1)] = src[i];
    __syncthreads();
  }
  __device__ __forceinline__ float channel(const uint8_t* code, int c) const {
    if (bits == 8) return static_cast<float>(code[c]);
    if (bits == 4) {
      const uint8_t b = code[c / 2];
      return static_cast<float>(c % 2 == 0 ? b & 15 : b >> 4);
    }
    return reinterpret_cast<const float*>(code)[c];
  }
  __device__ __forceinline__ float score(const uint8_t* code, const float* table) const {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int c = 0;
    for (; c + 8 <= head_dim; c += 8) {
#pragma unroll
      for (int l = 0; l < 8; ++l)
        acc[l] = __fadd_rn(acc[l], __fmul_rn(table[c + l], channel(code, c + l)));
    }
    float dot = __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                          __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
    for (; c < head_dim; ++c)
      dot = __fadd_rn(dot, __fmul_rn(table[c], channel(code, c)));
    return __fadd_rn(table[head_dim], dot);
  }
  // The same sums for int4 or int8 rows of whole 16-byte chunks: the row is
  // read once in 16-byte loads, each channel decoded once for every head of
  // the group, and the tables read four weights at a time. A 32-bit word
  // holds 8 int4 channels (one lane group) or 4 int8 channels (half of one).
  template <int kBits, int kGroupPad>
  __device__ __forceinline__ void score_chunks(const uint8_t* code, const float* smem,
                                               float (&s)[kGroupPad]) const {
    constexpr int kPerWord = 32 / kBits;
    const int row = table_row();
    float acc[kGroupPad][8];
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
#pragma unroll
      for (int l = 0; l < 8; ++l)
        acc[g][l] = 0.0f;
    }
    const uint4* src = reinterpret_cast<const uint4*>(code);
    const int chunks = head_dim / (4 * kPerWord);
    for (int k = 0; k < chunks; ++k) {
      const uint4 v = src[k];
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int c0 = (k * 4 + w) * kPerWord;
        const int lane0 = c0 % 8;
        float x[kPerWord];
#pragma unroll
        for (int e = 0; e < kPerWord; ++e)
          x[e] = static_cast<float>((words[w] >> (kBits * e)) & ((1u << kBits) - 1));
#pragma unroll
        for (int g = 0; g < kGroupPad; ++g) {
          if (g >= group) break;
          const float* table = smem + g * row + c0;
#pragma unroll
          for (int e4 = 0; e4 < kPerWord / 4; ++e4) {
            const float4 t = reinterpret_cast<const float4*>(table)[e4];
            const float tw[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float& a = acc[g][(lane0 + 4 * e4 + e) % 8];
              a = __fadd_rn(a, __fmul_rn(tw[e], x[4 * e4 + e]));
            }
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroupPad; ++g) {
      if (g >= group) {
        s[g] = 0.0f;
        continue;
      }
      const float* a = acc[g];
      const float dot = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[4]), __fadd_rn(a[1], a[5])),
                                  __fadd_rn(__fadd_rn(a[2], a[6]), __fadd_rn(a[3], a[7])));
      s[g] = __fadd_rn(smem[g * row + head_dim], dot);
    }
  }
  template <int kGroupPad, int kTok>
  __device__ __forceinline__ void scores(int kv, const int64_t (&t)[kTok], const float* smem,
                                         float (&s)[kTok][kGroupPad]) const {
    const int size = head_dim * bits / 8;
    const uint8_t* head = codes + kv * head_stride;
    if (bits == 4 && head_dim % 32 == 0) {
#pragma unroll
      for (int i = 0; i < kTok; ++i)
        score_chunks<4, kGroupPad>(head + t[i] * size, smem, s[i]);
      return;
    }
    if (bits == 8 && head_dim % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kTok; ++i)
        score_chunks<8, kGroupPad>(head + t[i] * size, smem, s[i]);
      return;
    }
    const int row = table_row();
#pragma unroll
    for (int i = 0; i < kTok; ++i) {
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        s[i][g] = g < group ? score(head + t[i] * size, smem + g * row) : 0.0f;
      }
    }
  }
};
#endif

}  // namespace pqkv::index::cuda
