// Exact attention over a chosen set of stored tokens, on the CPU: the
// reference that the GPU kernels must match, and the CPU backend's decode path.
#pragma once

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"
#include "storage/kv_row_store.h"
#include "storage/row_table.h"

namespace pqkv::attention {

struct AttentionTimings {
  double gather_us = 0;     // reading and converting the rows
  double attention_us = 0;  // scores, softmax and the weighted sum of values
};

// For each query head h (KV head h / group size, group = q_heads / kv_heads):
//   out[h] = sum over t in tokens[kv] of softmax_t(q_h . K[t] / sqrt(d)) V[t]
// queries [q_heads, head_dim] fp32, tokens [kv_heads, tokens_per_head] (any
// order; each KV head its own list), out [q_heads, head_dim] fp32. Work runs in
// chunks with an online softmax, so the whole context fits in bounded memory.
// `staged` (host, [kv_heads, tokens_per_head], may be null) gives the row of
// entries whose block is not in DRAM (read from the SSD tier, non-null
// there); other entries are read through `rows`.
//
// Returns InvalidArgument when a score q_h . K[t] / sqrt(d) passes fp32's
// range (finite inputs as large as 1e36 can do it): the message names the
// query head and token; `out` then holds no result. The weighted values are
// summed in double, so values up to fp32's limit give a finite output.
Status sparse_attention_cpu(const storage::RowTableView& rows, int q_heads, const float* queries,
                            const int32_t* tokens, int64_t tokens_per_head, float* out,
                            AttentionTimings* timings, const std::byte* const* staged = nullptr);
// The same over `layer` of a row store.
Status sparse_attention_cpu(const storage::KvRowStore& kv, int layer, const float* queries,
                            const int32_t* tokens, int64_t tokens_per_head, float* out,
                            AttentionTimings* timings);

// Exact attention over every token of the layer (the same errors).
Status full_attention_cpu(const storage::KvRowStore& kv, int layer, const float* queries,
                          float* out);

// OK when the n fp32 elements of an attention output [q_heads, head_dim]
// (host) stay finite once written as `dtype`; else InvalidArgument naming the
// first that does not (an fp16 output of bf16 or fp32 values above 65504).
Status check_output_storable(const float* out, int64_t n, int head_dim, DType dtype);

}  // namespace pqkv::attention
