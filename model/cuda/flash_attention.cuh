// Prefill attention of the CUDA model backend on tensor cores: tiled, causal,
// online softmax (flash-attention style), bf16 operands with fp32
// accumulation. Same arguments and causal rule as causal_attention (query t
// of the pass sees context rows 0 .. past + t; query head h reads KV head
// h / (q_heads / kv_heads), K/V are never repeated per query head), fp32 in
// and out: queries, keys and values are rounded to bf16 as they are staged in
// shared memory, the scores and the output accumulate in fp32.
#pragma once

#include <cuda_runtime_api.h>

#include "model/cuda/causal_attention.cuh"
#include "pqkv/status.h"

namespace pqkv::model::cuda {

// Whether flash_attention runs this geometry: head_dim 64 or 128, query
// heads a multiple of KV heads.
bool flash_attention_supported(int q_heads, int kv_heads, int head_dim);

// Enqueues the kernel on `stream` (one block of 4 warps per 64 queries of a
// query head; 64-key tiles; mma.sync m16n8k16 bf16, sm_80 and later). Any
// `past` and `tokens` (0 tokens is a no-op). Every pointer must be 16-byte aligned
// (device allocations are). Returns kInvalidArgument for an unsupported
// geometry or misaligned pointers, kOutOfRange for a grid too large, or the
// launch error.
Status flash_attention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace pqkv::model::cuda
