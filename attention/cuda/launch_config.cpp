#include "attention/cuda/launch_config.h"

#include <algorithm>
#include <bit>
#include <string>

namespace pqkv::attention::cuda {
namespace {

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Largest number of splits a shape can need on any GPU (see plan_decode_attention).
int max_splits(int64_t tokens) {
  return static_cast<int>(
      std::min<int64_t>(ceil_div(tokens, DecodeAttentionSplits::kMinTokensPerSplit),
                        DecodeAttentionSplits::kMaxSplits));
}

size_t align256(size_t b) {
  return (b + 255) / 256 * 256;
}

}  // namespace

Status GatherRowsArgs::validate() const {
  const int kv_heads = table.kv_heads;
  const int64_t row_bytes = table.row_bytes;
  const int64_t tokens_per_block = table.tokens_per_block;
  if (kv_heads <= 0 || tokens < 0) {
    return Status::invalid_argument(
        "gather: kv_heads must be positive and tokens non-negative, got " +
        std::to_string(kv_heads) + " and " + std::to_string(tokens));
  }
  if (row_bytes < 16 || row_bytes > 4096 ||
      !std::has_single_bit(static_cast<uint64_t>(row_bytes))) {
    return Status::invalid_argument("gather: row_bytes must be a power of two in 16..4096, got " +
                                    std::to_string(row_bytes));
  }
  if (tokens_per_block <= 0 || !std::has_single_bit(static_cast<uint64_t>(tokens_per_block)) ||
      tokens_per_block != (int64_t{1} << table.block_shift)) {
    return Status::invalid_argument("gather: tokens_per_block must be 1 << block_shift, got " +
                                    std::to_string(tokens_per_block));
  }
  if (tokens * kv_heads * (row_bytes / 16) >= (int64_t{1} << 40)) {
    return Status::invalid_argument("gather: " + std::to_string(tokens) +
                                    " rows per head is too many");
  }
  if (tokens > 0 && (table.blocks == nullptr || positions == nullptr || out == nullptr)) {
    return Status::invalid_argument("gather: table.blocks, positions and out must be set");
  }
  if (!aligned16(out)) return Status::invalid_argument("gather: out must be 16-byte aligned");
  return ok_status();
}

DecodeAttentionShape DecodeAttentionShape::from_spec(const ModelSpec& spec, int64_t tokens) {
  DecodeAttentionShape s;
  s.q_heads = spec.num_q_heads;
  s.kv_heads = spec.num_kv_heads;
  s.head_dim = spec.head_dim;
  s.tokens = tokens;
  s.row_dtype = spec.dtype;
  return s;
}

Status DecodeAttentionShape::validate() const {
  if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) {
    return Status::invalid_argument("decode attention: q_heads (" + std::to_string(q_heads) +
                                    ") must be a positive multiple of kv_heads (" +
                                    std::to_string(kv_heads) + ")");
  }
  if (head_dim != 64 && head_dim != 128) {
    return Status::invalid_argument("decode attention: head_dim must be 64 or 128, got " +
                                    std::to_string(head_dim));
  }
  if (row_dtype != DType::kBF16 && row_dtype != DType::kF16) {
    return Status::invalid_argument(
        std::string("decode attention: rows must be bf16 or fp16, got ") + dtype_name(row_dtype));
  }
  if (query_dtype == DType::kF16 || out_dtype == DType::kF16) {
    return Status::invalid_argument("decode attention: queries and output must be f32 or bf16");
  }
  if (tokens < 0 || (head_stride != 0 && head_stride < tokens)) {
    return Status::invalid_argument(
        "decode attention: need 0 <= tokens <= head_stride, got tokens " + std::to_string(tokens) +
        ", head_stride " + std::to_string(head_stride));
  }
  if (tokens >= (int64_t{1} << 31)) {
    return Status::invalid_argument("decode attention: at most 2^31 - 1 tokens per KV head");
  }
  return ok_status();
}

DecodeAttentionSplits plan_decode_attention(const DecodeAttentionShape& shape, int num_sms) {
  using S = DecodeAttentionSplits;
  S plan;
  plan.tiles = static_cast<int>(ceil_div(shape.group_size(), kQueryHeadsPerTile));
  if (shape.tokens == 0) return plan;
  // One full wave of warps over all (KV head, tile) pairs, each split a whole
  // number of the kernel's loop iterations (a warp reads 1024 / head_dim rows
  // per iteration); then at least the minimum per split and no more than
  // kMaxSplits splits. The minimum is a multiple of every iteration size.
  const int64_t items = int64_t{shape.kv_heads} * plan.tiles;
  const int64_t per_split =
      decode_attention_tokens_per_split(shape.tokens, shape.head_dim, items, num_sms);
  plan.tokens_per_split = per_split;
  plan.splits = static_cast<int>(ceil_div(shape.tokens, per_split));
  return plan;
}

DecodeAttentionWorkspaceLayout decode_attention_workspace_layout(const DecodeAttentionShape& shape,
                                                                 int splits) {
  DecodeAttentionWorkspaceLayout w;
  const size_t partials = static_cast<size_t>(shape.q_heads) * splits;
  w.lse_offset = 0;
  w.out_offset = align256(partials * sizeof(float));
  w.bytes = w.out_offset + align256(partials * shape.head_dim * sizeof(float));
  return w;
}

size_t decode_attention_workspace_bytes(const DecodeAttentionShape& shape) {
  return decode_attention_workspace_layout(shape, max_splits(shape.tokens)).bytes;
}

}  // namespace pqkv::attention::cuda
