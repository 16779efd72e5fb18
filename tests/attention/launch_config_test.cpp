// Host-side arithmetic of the decode-step kernels; runs without a GPU.
#include <gtest/gtest.h>

// The launch arithmetic is compiled with the CUDA backend only.
#if PQKV_HAVE_CUDA

#include <numeric>
#include <vector>

#include "attention/cuda/launch_config.h"
#include "storage/kv_row_store.h"
#include "test_util.h"

namespace pqkv::attention::cuda {
namespace {

DecodeAttentionShape llama_shape(int64_t tokens) {
  return DecodeAttentionShape::from_spec(ModelSpec::llama31_8b(), tokens);
}

TEST(DecodeAttentionPlan, SplitsCoverEveryTokenWithinBounds) {
  for (int group : {1, 4, 7, 8}) {
    for (int64_t tokens : {1, 17, 31, 32, 33, 97, 1000, 6553, 13107, 52428, 131072, 1 << 22}) {
      for (int num_sms : {1, 78, 132}) {
        DecodeAttentionShape shape = llama_shape(tokens);
        shape.q_heads = shape.kv_heads * group;
        SCOPED_TRACE(::testing::Message()
                     << "group " << group << " tokens " << tokens << " sms " << num_sms);
        PQKV_ASSERT_OK(shape.validate());
        const DecodeAttentionSplits plan = plan_decode_attention(shape, num_sms);
        EXPECT_EQ(plan.tiles, (group + kQueryHeadsPerTile - 1) / kQueryHeadsPerTile);
        EXPECT_GE(plan.tokens_per_split, DecodeAttentionSplits::kMinTokensPerSplit);
        EXPECT_EQ(plan.tokens_per_split % 8, 0);
        EXPECT_GE(plan.splits, 1);
        EXPECT_LE(plan.splits, DecodeAttentionSplits::kMaxSplits);
        // Every split holds at least one token; together they hold all.
        EXPECT_GE(plan.splits * plan.tokens_per_split, tokens);
        EXPECT_LT((plan.splits - 1) * plan.tokens_per_split, tokens);
        // The workspace sized from the shape alone suffices on any GPU.
        EXPECT_GE(decode_attention_workspace_bytes(shape),
                  decode_attention_workspace_layout(shape, plan.splits).bytes);
      }
    }
  }
}

TEST(DecodeAttentionPlan, FillsOneWaveWhenThereIsEnoughWork) {
  // Llama-3.1-8B, 10% of 128K on 132 SMs: one wave of warps, each a whole
  // number of 8-row iterations.
  const int64_t target = 132 * DecodeAttentionSplits::kTargetWarpsPerSm;
  const DecodeAttentionSplits plan = plan_decode_attention(llama_shape(13107), 132);
  const int64_t warps = int64_t{plan.splits} * plan.tiles * 8;
  EXPECT_LE(warps, target);
  EXPECT_GE(warps, target / 2);
  EXPECT_EQ(plan.tokens_per_split % 8, 0);
  DecodeAttentionShape d64 = llama_shape(5000);
  d64.head_dim = 64;
  EXPECT_EQ(plan_decode_attention(d64, 132).tokens_per_split % 16, 0);
}

TEST(DecodeAttentionPlan, NoTokensNoSplits) {
  const DecodeAttentionSplits plan = plan_decode_attention(llama_shape(0), 132);
  EXPECT_EQ(plan.splits, 0);
}

TEST(DecodeAttentionWorkspace, GrowsWithTokensAndIsAligned) {
  size_t previous = 0;
  for (int64_t tokens = 0; tokens <= 40000; tokens += 97) {
    const size_t bytes = decode_attention_workspace_bytes(llama_shape(tokens));
    EXPECT_GE(bytes, previous) << "tokens " << tokens;
    previous = bytes;
  }
  const auto layout = decode_attention_workspace_layout(llama_shape(1000), 10);
  EXPECT_EQ(layout.out_offset % 256, 0u);
  EXPECT_GE(layout.out_offset, 32u * 10 * sizeof(float));
  EXPECT_GE(layout.bytes, layout.out_offset + 32u * 10 * 128 * sizeof(float));
}

TEST(DecodeAttentionShape, Validates) {
  PQKV_EXPECT_OK(llama_shape(10).validate());
  auto bad = llama_shape(10);
  bad.head_dim = 96;
  EXPECT_EQ(bad.validate().code(), StatusCode::kInvalidArgument);
  bad = llama_shape(10);
  bad.q_heads = 30;
  EXPECT_EQ(bad.validate().code(), StatusCode::kInvalidArgument);
  bad = llama_shape(10);
  bad.row_dtype = DType::kF32;
  EXPECT_EQ(bad.validate().code(), StatusCode::kInvalidArgument);
  bad = llama_shape(10);
  bad.out_dtype = DType::kF16;
  EXPECT_EQ(bad.validate().code(), StatusCode::kInvalidArgument);
  bad = llama_shape(10);
  bad.head_stride = 9;
  EXPECT_EQ(bad.validate().code(), StatusCode::kInvalidArgument);
  auto strided = llama_shape(10);
  strided.head_stride = 64;
  PQKV_EXPECT_OK(strided.validate());
  EXPECT_EQ(strided.stride(), 64);
  EXPECT_EQ(llama_shape(10).stride(), 10);
  EXPECT_EQ(llama_shape(10).row_bytes(), 512);
}

TEST(GatherRowsArgs, Validates) {
  alignas(16) static std::byte out[64];
  std::byte* table[1] = {out};
  int32_t positions[1] = {0};
  GatherRowsArgs a;
  a.table.blocks = table;
  a.table.kv_heads = 1;
  a.table.row_bytes = 512;
  a.table.tokens_per_block = 4096;
  a.table.block_shift = 12;
  a.positions = positions;
  a.tokens = 1;
  a.out = out;
  PQKV_EXPECT_OK(a.validate());
  for (int64_t row : {0, 8, 48, 8192}) {
    GatherRowsArgs b = a;
    b.table.row_bytes = row;
    EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument) << "row bytes " << row;
  }
  GatherRowsArgs b = a;
  b.table.tokens_per_block = 3000;
  EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument);
  b = a;
  b.out = out + 8;
  EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument);
  b = a;
  b.positions = nullptr;
  EXPECT_EQ(b.validate().code(), StatusCode::kInvalidArgument);
  b.tokens = 0;  // nothing to read: no pointers needed
  PQKV_EXPECT_OK(b.validate());
}

TEST(RowTable, HostViewAddressesRowsInBlockMajorOrder) {
  ModelSpec spec = ModelSpec::tiny();  // 2 layers, 2 KV heads
  storage::KvRowStore kv(spec, storage::BlockArena::heap(storage::KvRowStore::block_bytes(spec)));
  const int64_t n = 2 * storage::KvRowStore::kTokensPerBlock + 5;  // three blocks
  const int64_t per = n * spec.num_kv_heads * spec.head_dim;
  const auto k = testing::random_floats(per, 1);
  const auto v = testing::random_floats(per, 2);
  PQKV_ASSERT_OK(kv.append(1, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                           host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim})));
  ASSERT_EQ(kv.num_blocks(1), 3);
  const storage::RowTableView t = kv.host_table(1);
  for (int64_t b = 0; b < 3; ++b) {
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      // The gather's addressing: block base plus (token % per block) rows.
      const int64_t token = b * storage::KvRowStore::kTokensPerBlock + 3;
      EXPECT_EQ(t.block_index(h, token), b * spec.num_kv_heads + h);
      EXPECT_EQ(t.blocks[b * spec.num_kv_heads + h] + 3 * spec.row_bytes(), kv.row(1, h, token));
      // The row holds the token's key first.
      std::vector<float> key(spec.head_dim);
      std::vector<float> stored(static_cast<size_t>(spec.num_kv_heads) * spec.head_dim);
      convert_to_float(t.row(h, token), spec.dtype, spec.head_dim, key.data());
      PQKV_ASSERT_OK(kv.keys_as_float(1, token, token + 1, stored.data()));
      EXPECT_EQ(key[0], stored[h * spec.head_dim]);
    }
  }
}

}  // namespace
}  // namespace pqkv::attention::cuda
#endif  // PQKV_HAVE_CUDA
