// Scalar-quantized keys (int8, int4) on the GPU: encoding with per-channel
// scales, the per-query tables, and the scan that scores every token. The
// layouts and arithmetic are those of cpu/key_codecs_cpu.h (ScalarCodecCpu),
// the reference these kernels are compared with.
//
// Codes live per KV head as [token][code_size] bytes, code_size = head_dim
// (int8) or head_dim / 2 (int4: channel 2i in the low nibble of byte i).
// Every pointer is device memory; every launch is enqueued on `stream` and
// returns InvalidArgument for a bad geometry, Internal for a CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

struct SqGeometry {
  int kv_heads = 0;
  int head_dim = 0;
  int bits = 8;  // 8 or 4
  __host__ __device__ int code_size() const { return head_dim * bits / 8; }
};

struct SqEncodeArgs {
  SqGeometry geo;
  const void* keys = nullptr;  // [n][kv_heads][head_dim] of `dtype`
  DType dtype = DType::kF32;
  int64_t n = 0;
  const float* scale = nullptr;   // [kv_heads][head_dim]
  const float* offset = nullptr;  // [kv_heads][head_dim]
  // Row t goes to codes[h * head_stride + (first_token + t) * code_size].
  uint8_t* codes = nullptr;
  int64_t head_stride = 0;
  int64_t first_token = 0;
};

// Encodes rows [0, n) of every KV head: one thread per (row, head, code byte).
Status launch_sq_encode(const SqEncodeArgs& args, cudaStream_t stream);

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

}  // namespace pqkv::index::cuda
