// Exact causal attention of the CUDA model backend (prefill and its own KV
// cache), fp32. The launcher enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/status.h"

namespace pqkv::model::cuda {

// Causal attention over `past` cached rows then the pass's `tokens` rows
// (rows [kv_heads, head_dim]); query t sees rows 0 .. past + t.
struct AttentionArgs {
  const float* q = nullptr;  // [tokens, q_heads, head_dim]
  const float* past_k = nullptr;
  const float* past_v = nullptr;
  const float* new_k = nullptr;
  const float* new_v = nullptr;
  int64_t past = 0;
  int64_t tokens = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;      // at most 512
  float* out = nullptr;  // [tokens, q_heads, head_dim]
};
Status causal_attention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace pqkv::model::cuda
