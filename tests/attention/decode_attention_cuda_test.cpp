// Sparse and full attention on the GPU against the CPU reference, and a CUDA
// graph of gather + attention against the direct launches.
#if PQKV_HAVE_CUDA

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "attention/cpu/sparse_attention_cpu.h"
#include "attention/cuda/decode_attention.cuh"
#include "attention/cuda/gather_rows.cuh"
#include "cuda_test_util.h"

namespace pqkv::testing {
namespace {

using attention::cuda::decode_attention_workspace_bytes;
using attention::cuda::DecodeAttentionArgs;
using attention::cuda::DecodeAttentionShape;
using attention::cuda::FullAttentionArgs;
using storage::DeviceRowTable;

struct AttentionCase {
  int kv_heads;
  int group;
  int head_dim;
  DType row_dtype;
  DType query_dtype;
  DType out_dtype;
  int64_t length;  // tokens stored per layer
  int64_t tokens;  // tokens attended per KV head
  float query_scale;
};

std::string describe(const AttentionCase& c, uint64_t seed) {
  return "seed " + std::to_string(seed) + ": " + std::to_string(c.kv_heads) + " KV heads, group " +
         std::to_string(c.group) + ", head_dim " + std::to_string(c.head_dim) + ", rows " +
         dtype_name(c.row_dtype) + ", queries " + dtype_name(c.query_dtype) + ", out " +
         dtype_name(c.out_dtype) + ", length " + std::to_string(c.length) + ", tokens " +
         std::to_string(c.tokens) + ", query scale " + std::to_string(c.query_scale);
}

// fp32 output matches the fp32 CPU reference to rounding; bf16 output to its
// own precision.
double tolerance(DType out) {
  return out == DType::kBF16 ? 1e-2 : 1e-4;
}

// Random queries in `dtype` on the device, and the same values as floats.
struct Queries {
  gpu::DeviceBuffer device;
  std::vector<float> values;
};

Result<Queries> make_queries(const ModelSpec& spec, DType dtype, float scale, uint64_t seed) {
  Queries q;
  q.values = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed, scale);
  std::vector<std::byte> raw(q.values.size() * dtype_size(dtype));
  convert_from_float(q.values.data(), static_cast<int64_t>(q.values.size()), raw.data(), dtype);
  convert_to_float(raw.data(), dtype, static_cast<int64_t>(q.values.size()), q.values.data());
  PQKV_ASSIGN_OR_RETURN(q.device, to_device(raw));
  return q;
}

TEST(DecodeAttentionCuda, SparseMatchesCpuReference) {
  PQKV_SKIP_IF_NO_GPU();
  // Many blocks, and room for the largest gather below.
  const int64_t past_slab = 32 * storage::KvRowStore::kTokensPerBlock + 300;
  std::vector<AttentionCase> cases;
  for (int group : {1, 4}) {
    for (int head_dim : {64, 128}) {
      for (DType rows : {DType::kBF16, DType::kF16}) {
        for (int64_t n : {1, 17, 97}) {
          cases.push_back({2, group, head_dim, rows, DType::kF32, DType::kF32, 100, n, 1.0f});
          cases.push_back(
              {2, group, head_dim, rows, DType::kBF16, DType::kBF16, past_slab, n, 3.0f});
        }
      }
    }
  }
  // Many splits, and groups that leave a partial tile of query heads.
  cases.push_back({8, 4, 128, DType::kBF16, DType::kF32, DType::kF32, past_slab, 4000, 2.0f});
  cases.push_back({4, 7, 128, DType::kBF16, DType::kF32, DType::kBF16, past_slab, 1500, 1.0f});
  cases.push_back({2, 6, 64, DType::kF16, DType::kBF16, DType::kF32, past_slab, 2500, 2.0f});

  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  uint64_t seed = 100;
  for (const AttentionCase& c : cases) {
    ++seed;
    SCOPED_TRACE(describe(c, seed));
    const ModelSpec spec = attention_spec(c.kv_heads, c.group, c.head_dim, c.row_dtype);
    const int layer = 1;
    PQKV_ASSERT_OK_AND_ASSIGN(auto kv, make_pinned_store(spec, c.length, seed));
    PQKV_ASSERT_OK_AND_ASSIGN(auto table, DeviceRowTable::create(*kv, layer, c.length));
    PQKV_ASSERT_OK(table.update(stream.get()));
    const auto tokens = pick_tokens(c.length, c.tokens, spec.num_kv_heads, seed, c.length > 4096);
    PQKV_ASSERT_OK_AND_ASSIGN(auto positions, to_device(tokens));
    PQKV_ASSERT_OK_AND_ASSIGN(auto rows,
                              gpu::DeviceBuffer::allocate(tokens.size() * spec.row_bytes()));
    PQKV_ASSERT_OK(attention::cuda::launch_gather_rows(
        gather_args(table, positions.as<int32_t>(), c.tokens, rows.as<std::byte>()), stream.get()));

    PQKV_ASSERT_OK_AND_ASSIGN(auto q, make_queries(spec, c.query_dtype, c.query_scale, seed));
    DecodeAttentionArgs a;
    a.shape = DecodeAttentionShape::from_spec(spec, c.tokens);
    a.shape.query_dtype = c.query_dtype;
    a.shape.out_dtype = c.out_dtype;
    const size_t out_bytes =
        static_cast<size_t>(spec.num_q_heads) * spec.head_dim * dtype_size(c.out_dtype);
    PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(out_bytes));
    PQKV_ASSERT_OK_AND_ASSIGN(
        auto ws, gpu::DeviceBuffer::allocate(decode_attention_workspace_bytes(a.shape)));
    PQKV_ASSERT_OK(poison(out.data(), out_bytes));
    PQKV_ASSERT_OK(poison(ws.data(), ws.bytes()));
    a.rows = rows.data();
    a.queries = q.device.data();
    a.out = out.data();
    a.workspace = ws.data();
    a.workspace_bytes = ws.bytes();
    PQKV_ASSERT_OK(attention::cuda::launch_decode_attention(a, stream.get()));
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));

    std::vector<float> expected(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
    PQKV_ASSERT_OK(attention::sparse_attention_cpu(*kv, layer, q.values.data(), tokens.data(),
                                                   c.tokens, expected.data(), nullptr));
    const std::vector<float> got = as_floats(host, c.out_dtype);
    EXPECT_LT(relative_error(got, expected), tolerance(c.out_dtype));
  }
}

TEST(DecodeAttentionCuda, FullMatchesCpuReference) {
  PQKV_SKIP_IF_NO_GPU();
  std::vector<AttentionCase> cases;
  for (int group : {1, 4}) {
    for (DType rows : {DType::kBF16, DType::kF16}) {
      for (int64_t length : {1, 17, 97, 4396}) {
        cases.push_back({2, group, 128, rows, DType::kF32, DType::kF32, length, length, 2.0f});
        cases.push_back({2, group, 64, rows, DType::kBF16, DType::kBF16, length, length, 1.0f});
      }
    }
  }
  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  uint64_t seed = 300;
  for (const AttentionCase& c : cases) {
    ++seed;
    SCOPED_TRACE(describe(c, seed));
    const ModelSpec spec = attention_spec(c.kv_heads, c.group, c.head_dim, c.row_dtype);
    const int layer = 0;
    PQKV_ASSERT_OK_AND_ASSIGN(auto kv, make_pinned_store(spec, c.length, seed));
    // The layer resident on the device with room for 5 more tokens per head.
    const int64_t capacity = c.length + 5;
    const int64_t row = spec.row_bytes();
    std::vector<std::byte> resident(static_cast<size_t>(spec.num_kv_heads * capacity * row));
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      for (int64_t t = 0; t < c.length; ++t) {
        std::memcpy(resident.data() + (h * capacity + t) * row, kv->row(layer, h, t), row);
      }
    }
    PQKV_ASSERT_OK_AND_ASSIGN(auto rows, to_device(resident));
    PQKV_ASSERT_OK_AND_ASSIGN(auto q, make_queries(spec, c.query_dtype, c.query_scale, seed));

    FullAttentionArgs a;
    a.spec = spec;
    a.layer_rows = rows.data();
    a.capacity = capacity;
    a.context = c.length;
    a.query_dtype = c.query_dtype;
    a.out_dtype = c.out_dtype;
    const size_t out_bytes =
        static_cast<size_t>(spec.num_q_heads) * spec.head_dim * dtype_size(c.out_dtype);
    PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(out_bytes));
    PQKV_ASSERT_OK_AND_ASSIGN(
        auto ws, gpu::DeviceBuffer::allocate(decode_attention_workspace_bytes(a.shape())));
    PQKV_ASSERT_OK(poison(out.data(), out_bytes));
    a.queries = q.device.data();
    a.out = out.data();
    a.workspace = ws.data();
    a.workspace_bytes = ws.bytes();
    PQKV_ASSERT_OK(attention::cuda::launch_full_attention(a, stream.get()));
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));

    std::vector<float> expected(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
    PQKV_ASSERT_OK(attention::full_attention_cpu(*kv, layer, q.values.data(), expected.data()));
    EXPECT_LT(relative_error(as_floats(host, c.out_dtype), expected), tolerance(c.out_dtype));
  }
}

TEST(DecodeAttentionCuda, NoTokensGivesZeros) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = attention_spec(2, 4, 128, DType::kBF16);
  PQKV_ASSERT_OK_AND_ASSIGN(auto q, make_queries(spec, DType::kF32, 1.0f, 1));
  const size_t out_bytes = static_cast<size_t>(spec.num_q_heads) * spec.head_dim * sizeof(float);
  PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(out_bytes));
  PQKV_ASSERT_OK(poison(out.data(), out_bytes));
  DecodeAttentionArgs a;
  a.shape = DecodeAttentionShape::from_spec(spec, 0);
  a.queries = q.device.data();
  a.out = out.data();
  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  PQKV_ASSERT_OK(attention::cuda::launch_decode_attention(a, stream.get()));
  PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));
  for (float v : as_floats(host, DType::kF32))
    ASSERT_EQ(v, 0.0f);
}

TEST(DecodeAttentionCuda, RefusesASmallWorkspace) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = attention_spec(2, 4, 128, DType::kBF16);
  DecodeAttentionArgs a;
  a.shape = DecodeAttentionShape::from_spec(spec, 1000);
  PQKV_ASSERT_OK_AND_ASSIGN(auto buf, gpu::DeviceBuffer::allocate(1 << 20));
  a.rows = a.queries = buf.data();
  a.out = buf.data();
  a.workspace = buf.data();
  a.workspace_bytes = 64;
  EXPECT_EQ(attention::cuda::launch_decode_attention(a, nullptr).code(),
            StatusCode::kInvalidArgument);
}

// Gather + attention captured once and replayed: the same bytes as direct
// launches, and a replay reads the positions current at replay time.
TEST(DecodeAttentionCuda, GraphReplayEqualsDirectLaunch) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 500;
  SCOPED_TRACE("seed 500: 8 KV heads, group 4, head_dim 128, bf16 rows, 5000 tokens of 9000");
  const ModelSpec spec = attention_spec(8, 4, 128, DType::kBF16);
  const int64_t length = 9000;
  const int64_t n = 5000;
  PQKV_ASSERT_OK_AND_ASSIGN(auto kv, make_pinned_store(spec, length, seed));
  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  PQKV_ASSERT_OK_AND_ASSIGN(auto table, DeviceRowTable::create(*kv, 0, length));
  PQKV_ASSERT_OK(table.update(stream.get()));
  const auto first = pick_tokens(length, n, spec.num_kv_heads, seed, true);
  const auto second = pick_tokens(length, n, spec.num_kv_heads, seed + 1, true);
  PQKV_ASSERT_OK_AND_ASSIGN(auto positions, to_device(first));
  PQKV_ASSERT_OK_AND_ASSIGN(auto rows,
                            gpu::DeviceBuffer::allocate(first.size() * spec.row_bytes()));
  PQKV_ASSERT_OK_AND_ASSIGN(auto q, make_queries(spec, DType::kBF16, 2.0f, seed));
  DecodeAttentionArgs a;
  a.shape = DecodeAttentionShape::from_spec(spec, n);
  a.shape.query_dtype = DType::kBF16;
  a.shape.out_dtype = DType::kBF16;
  const size_t out_bytes = static_cast<size_t>(spec.num_q_heads) * spec.head_dim * 2;
  PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(out_bytes));
  PQKV_ASSERT_OK_AND_ASSIGN(auto ws,
                            gpu::DeviceBuffer::allocate(decode_attention_workspace_bytes(a.shape)));
  a.rows = rows.data();
  a.queries = q.device.data();
  a.out = out.data();
  a.workspace = ws.data();
  a.workspace_bytes = ws.bytes();
  const auto gather = gather_args(table, positions.as<int32_t>(), n, rows.as<std::byte>());
  auto step = [&]() -> Status {
    PQKV_RETURN_IF_ERROR(attention::cuda::launch_gather_rows(gather, stream.get()));
    return attention::cuda::launch_decode_attention(a, stream.get());
  };

  std::vector<std::vector<std::byte>> direct;
  for (const auto* list : {&first, &second}) {
    PQKV_ASSERT_OK(poison(out.data(), out_bytes));
    PQKV_ASSERT_OK(upload(positions.data(), *list));
    PQKV_ASSERT_OK(step());
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));
    direct.push_back(std::move(host));
  }
  EXPECT_NE(direct[0], direct[1]) << "different token lists should give different outputs";

  cudaGraph_t raw_graph = nullptr;
  PQKV_ASSERT_OK(cuda_status(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal),
                             "begin capture", __FILE__, __LINE__));
  const Status captured = step();
  PQKV_ASSERT_OK(cuda_status(cudaStreamEndCapture(stream.get(), &raw_graph), "end capture",
                             __FILE__, __LINE__));
  gpu::GraphHandle graph(raw_graph);
  PQKV_ASSERT_OK(captured);
  cudaGraphExec_t raw_exec = nullptr;
  PQKV_ASSERT_OK(cuda_status(cudaGraphInstantiate(&raw_exec, graph.get(), 0), "instantiate",
                             __FILE__, __LINE__));
  gpu::GraphExecHandle exec(raw_exec);

  for (int replay = 0; replay < 2; ++replay) {
    const auto& list = replay == 0 ? first : second;
    PQKV_ASSERT_OK(poison(out.data(), out_bytes));
    PQKV_ASSERT_OK(upload(positions.data(), list));
    PQKV_ASSERT_OK(
        cuda_status(cudaGraphLaunch(exec.get(), stream.get()), "graph launch", __FILE__, __LINE__));
    PQKV_ASSERT_OK_AND_ASSIGN(auto host, to_host(out.data(), out_bytes));
    EXPECT_EQ(host, direct[replay]) << "replay " << replay;
  }
  // And the direct result is right.
  std::vector<float> expected(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
  PQKV_ASSERT_OK(attention::sparse_attention_cpu(*kv, 0, q.values.data(), second.data(), n,
                                                 expected.data(), nullptr));
  EXPECT_LT(relative_error(as_floats(direct[1], DType::kBF16), expected), 1e-2);
}

}  // namespace
}  // namespace pqkv::testing

#endif  // PQKV_HAVE_CUDA
