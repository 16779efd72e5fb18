// Prefill attention of the CUDA model backend on tensor cores, in the manner
// of FlashAttention-2: tiled, causal, online softmax, bf16 operands with fp32
// accumulation. Same arguments and causal rule as causal_attention (query t
// of the pass sees context rows 0 .. past + t; query head h reads KV head
// h / (q_heads / kv_heads), K/V are never repeated per query head), fp32 in
// and out: a first kernel writes bf16 copies of the context's keys and
// values into the caller's workspace, the attention kernel streams them
// through shared memory with asynchronous copies and rounds the queries to
// bf16 as it stages them; the scores and the output accumulate in fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "model/cuda/causal_attention.cuh"
#include "pqkv/status.h"

namespace pqkv::model::cuda {

// Whether flash_attention runs this geometry: head_dim 64 or 128, query
// heads a multiple of KV heads.
bool flash_attention_supported(int q_heads, int kv_heads, int head_dim);

// Bytes of device workspace flash_attention needs for `args`: bf16 keys and
// values of the past + tokens context rows, padded to whole key tiles
// (4 * kv_heads * head_dim bytes per row, so 512 MiB for 128K rows of
// Llama-3.1-8B's 8 KV heads of 128). 0 when `args.tokens` is 0.
size_t flash_attention_workspace_bytes(const AttentionArgs& args);

// Enqueues the attention on `stream`: the bf16 conversion of the keys and
// values into `workspace` (device memory of `workspace_bytes`, at least
// flash_attention_workspace_bytes(args), 16-byte aligned, not read or
// written by other work until the stream passes this call), then one block
// per 128 queries of a query head, the last query tiles first; mma.sync
// m16n8k16 bf16, sm_80 and later. Any `past` and `tokens` (0 tokens is a
// no-op). Every pointer must be 16-byte aligned (device allocations are).
// Returns kInvalidArgument for an unsupported geometry, misaligned pointers
// or a workspace too small, kOutOfRange for a grid too large, or the launch
// error.
Status flash_attention(const AttentionArgs& args, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

}  // namespace pqkv::model::cuda
