// The CPU kernels of the Llama forward pass, on host fp32 activations and
// weights in their checkpoint dtype. Parallel with TBB; matrix products via BLAS.
#pragma once

#include <cstdint>

#include "model/safetensors.h"

namespace pqkv::model::cpu {

// Makes BLAS single-threaded: the CPU kernels call it from TBB tasks, and
// BLAS threads nested under those only oversubscribe the cores. Process-wide
// (OpenBLAS has no per-call setting in the packaged version).
void configure_cpu_blas();

// y[T, out] = x[T, in] * w[out, in]^T (+ bias[out]).
void linear(const float* x, int64_t tokens, const WeightTensor& w, const WeightTensor* bias,
            float* y);

// y[T, n] = x / rms(x) * weight, row by row (in place allowed).
void rms_norm(const float* x, int64_t tokens, int64_t n, const WeightTensor& weight, double eps,
              float* y);

// Rotates x[T, heads, head_dim] in place with cos/sin [T, head_dim/2] (rotate_half pairs).
void apply_rope(float* x, int64_t tokens, int heads, int head_dim, const float* cos,
                const float* sin);

// h[i] = silu(gate[i]) * up[i], written over gate.
void swiglu(float* gate, const float* up, int64_t n);

// Rows of the embedding table for `ids`, as fp32 [T, hidden].
void embed(const int32_t* ids, int64_t tokens, const WeightTensor& table, float* out);

// Causal attention. Context keys/values are `past` cached rows followed by the
// pass's `tokens` rows, each row [kv_heads, head_dim]. Query t of the pass
// (position past + t) sees context rows 0 .. past + t. Query head h reads KV
// head h / (q_heads / kv_heads) (GQA: K/V are never repeated per query head).
struct AttentionArgs {
  const float* q = nullptr;       // [tokens, q_heads, head_dim]
  const float* past_k = nullptr;  // [past, kv_heads, head_dim]
  const float* past_v = nullptr;
  const float* new_k = nullptr;  // [tokens, kv_heads, head_dim]
  const float* new_v = nullptr;
  int64_t past = 0;
  int64_t tokens = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  float* out = nullptr;  // [tokens, q_heads, head_dim]
};

// The prefill kernel: per (KV head, block of queries) the queries of the whole
// GQA group are stacked into one matrix and the context is visited in key
// tiles, S = Q K^T and O += P V as single-threaded BLAS products with an
// online softmax between them; tiles wholly above the causal diagonal are
// skipped. Memory per work item is O(block x tile), not O(block x context).
// Parallel over work items with TBB. fp32 with fp32 accumulation.
void causal_attention(const AttentionArgs& args);

// The exact reference: query row `t` of query head `h`, computed in double one
// key at a time with a two-pass softmax. Writes head_dim values to `out`.
// For tests (O(context x head_dim) per row, no blocking).
void reference_attention_row(const AttentionArgs& args, int64_t t, int h, double* out);

}  // namespace pqkv::model::cpu
