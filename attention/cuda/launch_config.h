// Host-side arithmetic of the decode-step kernels: their shapes, validation,
// how the attention work is split across the GPU, how much workspace it needs,
// and the gather's arguments. No CUDA headers:
// CPU builds compile it and CI tests it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/model_spec.h"
#include "pqkv/status.h"
#include "storage/row_table.h"

namespace pqkv::attention::cuda {

// ---- Row gather ----------------------------------------------------------

// What launch_gather_rows copies: for each KV head h and i < tokens, row
// positions[h * tokens + i] of head h, found through `table`, into out[h][i]
// (a dense [kv_heads, tokens, row_bytes] buffer).
struct GatherRowsArgs {
  // A device view (storage::DeviceRowTable::view): the table is device
  // memory, its block pointers device memory or mapped pinned host memory.
  // table.row_bytes a power of two, 16..4096; tokens_per_block a power of two.
  storage::RowTableView table;
  const int32_t* positions =
      nullptr;               // device: [kv_heads, tokens]; every one below the stored length
  int64_t tokens = 0;        // rows gathered per KV head
  std::byte* out = nullptr;  // device: [kv_heads, tokens, row_bytes], 16-byte aligned
  // When set (device memory), the rows per KV head are read from it when the
  // kernel runs, and `tokens` is the most it will hold (the launch's size):
  // positions and out are then [kv_heads, *device_tokens, ...].
  const int64_t* device_tokens = nullptr;

  Status validate() const;
};

// ---- Decode attention ----------------------------------------------------

// Exact attention of every query head over `tokens` rows of its KV head:
//   out[q] = sum_i softmax_i(q . K_i / sqrt(head_dim)) V_i
// with rows [kv_heads, head_stride, row] (K then V per row, row_dtype) and
// queries/out [q_heads, head_dim]. Accumulation is fp32.
struct DecodeAttentionShape {
  int q_heads = 0;
  int kv_heads = 0;                 // divides q_heads
  int head_dim = 0;                 // 64 or 128
  int64_t tokens = 0;               // rows attended per KV head; 0 gives zeros
  int64_t head_stride = 0;          // rows between KV heads in the row buffer; 0 means `tokens`
  DType row_dtype = DType::kBF16;   // bf16 or fp16
  DType query_dtype = DType::kF32;  // f32 or bf16
  DType out_dtype = DType::kF32;    // f32 or bf16

  static DecodeAttentionShape from_spec(const ModelSpec& spec, int64_t tokens);
  int group_size() const { return q_heads / kv_heads; }
  int64_t row_bytes() const { return 2LL * head_dim * dtype_size(row_dtype); }
  int64_t stride() const { return head_stride == 0 ? tokens : head_stride; }
  Status validate() const;
};

// Query heads one pass over a KV head's rows serves; larger groups take
// several passes (tiles) over the same rows.
inline constexpr int kQueryHeadsPerTile = 4;

// How one launch divides the work: each warp runs an online softmax over
// `tokens_per_split` consecutive rows of one KV head for one tile of query
// heads and writes a partial result; a second kernel combines the splits.
struct DecodeAttentionSplits {
  int64_t tokens_per_split = 0;
  int splits = 0;  // per (KV head, tile); 0 when tokens == 0
  int tiles = 0;   // query-head tiles per KV head

  // Minimum rows per split (two loop iterations at head_dim 128): small
  // budgets are latency-bound, so more, shorter splits finish sooner, down
  // to where a split's partial result costs as much as its rows.
  static constexpr int64_t kMinTokensPerSplit = 16;
  // Bounds the combine's work and the workspace.
  static constexpr int kMaxSplits = 512;
  // Warps resident per SM at the kernel's register use: the target is one
  // full wave across the GPU.
  static constexpr int kTargetWarpsPerSm = 16;
};

// Splits for `shape` on a GPU with `num_sms` multiprocessors (shape valid).
DecodeAttentionSplits plan_decode_attention(const DecodeAttentionShape& shape, int num_sms);

// The rows per split plan_decode_attention picks for `tokens` > 0 rows over
// `items` (KV head, tile) pairs: host and device code (a launch whose token
// count is read on the device splits the same way).
PQKV_HOST_DEVICE inline int64_t decode_attention_tokens_per_split(int64_t tokens, int head_dim,
                                                                  int64_t items, int num_sms) {
  using S = DecodeAttentionSplits;
  const int64_t per_iteration = 1024 / head_dim;
  const int64_t target_warps = int64_t{num_sms > 1 ? num_sms : 1} * S::kTargetWarpsPerSm;
  const int64_t wave = (tokens * items + target_warps - 1) / target_warps;
  int64_t per_split = (wave + per_iteration - 1) / per_iteration * per_iteration;
  if (per_split < S::kMinTokensPerSplit) per_split = S::kMinTokensPerSplit;
  const int64_t most = (tokens + S::kMaxSplits - 1) / S::kMaxSplits;
  const int64_t by_max = (most + per_iteration - 1) / per_iteration * per_iteration;
  return per_split > by_max ? per_split : by_max;
}

// Workspace bytes launch_decode_attention needs for `shape` on any GPU: the
// partial results of every split. Grows with shape.tokens, so a workspace
// sized for the largest step serves every smaller one.
size_t decode_attention_workspace_bytes(const DecodeAttentionShape& shape);

// Where the partial results lie inside the workspace.
struct DecodeAttentionWorkspaceLayout {
  size_t lse_offset = 0;  // float [q_heads, splits]: log2-sum-exp of each split
  size_t out_offset = 0;  // float [q_heads, splits, head_dim]: each split's normalised output
  size_t bytes = 0;
};
DecodeAttentionWorkspaceLayout decode_attention_workspace_layout(const DecodeAttentionShape& shape,
                                                                 int splits);

}  // namespace pqkv::attention::cuda
