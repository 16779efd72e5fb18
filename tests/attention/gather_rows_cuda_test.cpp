// The row gather against the host rows it copies, byte for byte.
#if PQKV_HAVE_CUDA

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "attention/cuda/gather_rows.cuh"
#include "cuda_test_util.h"

namespace pqkv::testing {
namespace {

using attention::cuda::launch_gather_rows;
using storage::DeviceRowTable;

struct GatherCase {
  int head_dim;
  DType dtype;
  int64_t length;  // tokens stored per layer
  int64_t tokens;  // tokens gathered per KV head
  bool straddle;   // the lists hold the two tokens either side of a slab boundary
};

std::string describe(const GatherCase& c, uint64_t seed) {
  return "seed " + std::to_string(seed) + ", head_dim " + std::to_string(c.head_dim) + ", " +
         dtype_name(c.dtype) + ", length " + std::to_string(c.length) + ", tokens " +
         std::to_string(c.tokens) + (c.straddle ? ", across a slab boundary" : "");
}

// Every gathered row equals the store's row of that token.
void expect_rows_match(const storage::KvRowStore& kv, int layer, const std::vector<int32_t>& tokens,
                       int64_t n, const std::vector<std::byte>& out) {
  const int64_t row = kv.spec().row_bytes();
  for (int h = 0; h < kv.spec().num_kv_heads; ++h) {
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = tokens[h * n + i];
      ASSERT_EQ(std::memcmp(out.data() + (h * n + i) * row, kv.row(layer, h, t), row), 0)
          << "head " << h << ", entry " << i << ", token " << t;
    }
  }
}

TEST(GatherRowsCuda, CopiesRowsFromPinnedBlocksByteForByte) {
  PQKV_SKIP_IF_NO_GPU();
  const int64_t past_slab = storage::KvRowStore::kTokensPerBlock + 300;
  std::vector<GatherCase> cases;
  for (int head_dim : {32, 64, 128}) {
    for (DType dtype : {DType::kBF16, DType::kF16}) {
      for (int64_t n : {1, 17, 97}) {
        cases.push_back({head_dim, dtype, 100, n, false});  // one slab
        cases.push_back({head_dim, dtype, past_slab, n, n >= 2});
      }
    }
  }
  cases.push_back({128, DType::kBF16, 40 * storage::KvRowStore::kTokensPerBlock, 5000, true});

  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  uint64_t seed = 11;
  for (const GatherCase& c : cases) {
    ++seed;
    SCOPED_TRACE(describe(c, seed));
    const ModelSpec spec = attention_spec(/*kv_heads=*/3, /*group=*/1, c.head_dim, c.dtype);
    PQKV_ASSERT_OK_AND_ASSIGN(auto kv, make_pinned_store(spec, c.length, seed));
    const int layer = 1;
    PQKV_ASSERT_OK_AND_ASSIGN(auto table, DeviceRowTable::create(*kv, layer, c.length));
    PQKV_ASSERT_OK(table.update(stream.get()));

    const auto tokens = pick_tokens(c.length, c.tokens, spec.num_kv_heads, seed, c.straddle);
    PQKV_ASSERT_OK_AND_ASSIGN(auto positions, to_device(tokens));
    const size_t out_bytes = tokens.size() * spec.row_bytes();
    PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(out_bytes));
    PQKV_ASSERT_OK(poison(out.data(), out_bytes));
    PQKV_ASSERT_OK(launch_gather_rows(
        gather_args(table, positions.as<int32_t>(), c.tokens, out.as<std::byte>()), stream.get()));
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));
    expect_rows_match(*kv, layer, tokens, c.tokens, host);
  }
}

TEST(GatherRowsCuda, RowTableFollowsAGrowingStore) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 7;
  SCOPED_TRACE("seed 7, head_dim 128, bf16, 2 KV heads, appends of 1000 tokens");
  const ModelSpec spec = attention_spec(2, 4, 128, DType::kBF16);
  PQKV_ASSERT_OK_AND_ASSIGN(auto arena,
                            storage::BlockArena::pinned(storage::KvRowStore::block_bytes(spec)));
  storage::KvRowStore kv(spec, arena);
  const int64_t capacity = 24 * storage::KvRowStore::kTokensPerBlock;
  PQKV_ASSERT_OK_AND_ASSIGN(auto table, DeviceRowTable::create(kv, 0, capacity));
  EXPECT_EQ(table.block_capacity(), 24);
  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  const auto* table_before = table.view().blocks;

  const int64_t chunk = 1000;
  for (int64_t length = chunk; length <= capacity; length += chunk) {
    const auto k = random_floats(chunk * spec.num_kv_heads * spec.head_dim, seed + length);
    const auto v = random_floats(chunk * spec.num_kv_heads * spec.head_dim, seed + length + 1);
    PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {chunk, spec.num_kv_heads, spec.head_dim}),
                             host_view(v.data(), {chunk, spec.num_kv_heads, spec.head_dim})));
    PQKV_ASSERT_OK(table.update(stream.get()));
    EXPECT_EQ(table.synced_blocks(), kv.num_blocks(0));
    EXPECT_EQ(table.view().blocks, table_before) << "the table must never move";

    const int64_t n = 97;
    const auto tokens = pick_tokens(length, n, spec.num_kv_heads, seed + length,
                                    length > storage::KvRowStore::kTokensPerBlock);
    PQKV_ASSERT_OK_AND_ASSIGN(auto positions, to_device(tokens));
    PQKV_ASSERT_OK_AND_ASSIGN(auto out,
                              gpu::DeviceBuffer::allocate(tokens.size() * spec.row_bytes()));
    PQKV_ASSERT_OK(launch_gather_rows(
        gather_args(table, positions.as<int32_t>(), n, out.as<std::byte>()), stream.get()));
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out.bytes()));
    expect_rows_match(kv, 0, tokens, n, host);
  }

  // One more block than reserved: refused, and the table keeps its entries.
  const int64_t more = capacity - kv.length(0) + 1;
  const auto k = random_floats(more * spec.num_kv_heads * spec.head_dim, seed);
  PQKV_ASSERT_OK(kv.append(0, host_view(k.data(), {more, spec.num_kv_heads, spec.head_dim}),
                           host_view(k.data(), {more, spec.num_kv_heads, spec.head_dim})));
  EXPECT_EQ(table.update(stream.get()).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(table.synced_blocks(), 24);
}

TEST(GatherRowsCuda, RefusesHeapBlocks) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = attention_spec(2, 1, 64, DType::kBF16);
  storage::KvRowStore kv(spec, storage::BlockArena::heap(storage::KvRowStore::block_bytes(spec)));
  EXPECT_EQ(DeviceRowTable::create(kv, 0, 100).status().code(), StatusCode::kFailedPrecondition);
}

TEST(GatherRowsCuda, NoTokensIsANoOp) {
  PQKV_SKIP_IF_NO_GPU();
  attention::cuda::GatherRowsArgs a;
  a.table.kv_heads = 8;
  a.table.row_bytes = 512;
  a.table.tokens_per_block = 4096;
  a.table.block_shift = 12;
  a.tokens = 0;
  PQKV_ASSERT_OK(launch_gather_rows(a, nullptr));
}

}  // namespace
}  // namespace pqkv::testing

#endif  // PQKV_HAVE_CUDA
