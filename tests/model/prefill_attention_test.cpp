// Prefill attention against the exact double-precision reference at odd
// sizes (1, 17, 97, 4099 tokens), GQA groups 1, 4 and 8, head_dim 64 and 128,
// with and without earlier chunks (`past`): the blocked BLAS kernel of the
// CPU backend, and the tensor-core kernel of the CUDA backend (skipped
// without a GPU). Each case prints its seed and shape.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/cpu/cpu_ops.h"
#include "pqkv/dtype.h"
#include "test_util.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_handles.h"
#include "model/cuda/flash_attention.cuh"
#endif

namespace pqkv::model {
namespace {

struct PrefillCase {
  int64_t past;
  int64_t tokens;
  int q_heads;
  int kv_heads;
  int head_dim;
  float scale = 1.0f;  // of the random queries and keys: larger is a peakier softmax
};

std::vector<PrefillCase> prefill_cases() {
  std::vector<PrefillCase> cases;
  for (const int64_t tokens : {1, 17, 97, 4099}) {
    for (const int group : {1, 4, 8}) {
      for (const int d : {64, 128}) {
        // Long prompts with one KV head keep the test fast.
        const int kv = tokens > 1000 ? 1 : 2;
        cases.push_back({0, tokens, group * kv, kv, d});
      }
    }
  }
  // Chunked prefill: the pass attends to the chunks already written.
  cases.push_back({1, 17, 8, 2, 64});
  cases.push_back({130, 97, 4, 1, 128});
  cases.push_back({4099, 97, 8, 1, 64});
  cases.push_back({63, 65, 8, 8, 128});
  cases.push_back({0, 300, 4, 1, 64, 3.0f});
  return cases;
}

// The query rows a case checks: all of them, or for long passes every 13th
// and the last few (the reference is O(context) per row).
std::vector<int64_t> checked_rows(int64_t tokens) {
  std::vector<int64_t> rows;
  const int64_t step = tokens > 1000 ? 13 : 1;
  for (int64_t t = 0; t < tokens; t += step)
    rows.push_back(t);
  for (int64_t t = std::max<int64_t>(0, tokens - 5); t < tokens; ++t) {
    if (t % step != 0) rows.push_back(t);
  }
  return rows;
}

struct PrefillInputs {
  std::vector<float> q, past_k, past_v, new_k, new_v;

  cpu::AttentionArgs args(const PrefillCase& c, float* out) const {
    return {q.data(), past_k.data(), past_v.data(), new_k.data(), new_v.data(), c.past,
            c.tokens, c.q_heads,     c.kv_heads,    c.head_dim,   out};
  }
};

// Random inputs; with `bf16` every value is rounded to bf16 first, so that a
// bf16 kernel reads exactly what the reference reads.
PrefillInputs random_inputs(const PrefillCase& c, uint64_t seed, bool bf16) {
  const int64_t kv = int64_t{c.kv_heads} * c.head_dim;
  const int64_t qd = int64_t{c.q_heads} * c.head_dim;
  PrefillInputs in{pqkv::testing::random_floats(c.tokens * qd, seed, c.scale),
                   pqkv::testing::random_floats(c.past * kv, seed + 1, c.scale),
                   pqkv::testing::random_floats(c.past * kv, seed + 2),
                   pqkv::testing::random_floats(c.tokens * kv, seed + 3, c.scale),
                   pqkv::testing::random_floats(c.tokens * kv, seed + 4)};
  if (bf16) {
    for (auto* v : {&in.q, &in.past_k, &in.past_v, &in.new_k, &in.new_v}) {
      for (float& x : *v) {
        uint16_t b = 0;
        convert_elements(&x, DType::kF32, 0, 1, &b, DType::kBF16);
        convert_elements(&b, DType::kBF16, 0, 1, &x, DType::kF32);
      }
    }
  }
  return in;
}

// Largest |got - reference| over the checked rows, and the reference's largest |value|.
std::pair<double, double> compare_with_reference(const PrefillCase& c, const PrefillInputs& in,
                                                 const std::vector<float>& got) {
  const cpu::AttentionArgs args = in.args(c, nullptr);
  std::vector<double> want(c.head_dim);
  double max_err = 0;
  double max_abs = 0;
  for (const int64_t t : checked_rows(c.tokens)) {
    for (int h = 0; h < c.q_heads; ++h) {
      cpu::reference_attention_row(args, t, h, want.data());
      const float* row = got.data() + (t * c.q_heads + h) * c.head_dim;
      for (int i = 0; i < c.head_dim; ++i) {
        max_err = std::max(max_err, std::abs(row[i] - want[i]));
        max_abs = std::max(max_abs, std::abs(want[i]));
      }
    }
  }
  return {max_err, max_abs};
}

::testing::Message describe(const PrefillCase& c, uint64_t seed) {
  return ::testing::Message() << "seed " << seed << " past " << c.past << " tokens " << c.tokens
                              << " heads " << c.q_heads << "/" << c.kv_heads << " d " << c.head_dim
                              << " scale " << c.scale;
}

TEST(CpuPrefillAttentionTest, MatchesTheExactReference) {
  uint64_t seed = 1000;
  for (const auto& c : prefill_cases()) {
    seed += 10;
    SCOPED_TRACE(describe(c, seed));
    const PrefillInputs in = random_inputs(c, seed, /*bf16=*/false);
    std::vector<float> out(c.tokens * c.q_heads * c.head_dim, NAN);
    cpu::causal_attention(in.args(c, out.data()));
    const auto [err, max_abs] = compare_with_reference(c, in, out);
    EXPECT_LT(err, 2e-5 * std::max(1.0, max_abs));
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }));
  }
}

// Small head_dims and odd head counts, which only the CPU kernel runs.
TEST(CpuPrefillAttentionTest, OddGeometries) {
  uint64_t seed = 2000;
  for (const PrefillCase& c : std::vector<PrefillCase>{
           {0, 5, 3, 3, 8}, {7, 300, 6, 2, 16}, {255, 258, 12, 4, 32}, {0, 129, 16, 1, 96}}) {
    seed += 10;
    SCOPED_TRACE(describe(c, seed));
    const PrefillInputs in = random_inputs(c, seed, false);
    std::vector<float> out(c.tokens * c.q_heads * c.head_dim, NAN);
    cpu::causal_attention(in.args(c, out.data()));
    const auto [err, max_abs] = compare_with_reference(c, in, out);
    EXPECT_LT(err, 2e-5 * std::max(1.0, max_abs));
  }
}

#if PQKV_HAVE_CUDA

gpu::DeviceBuffer upload(const std::vector<float>& host) {
  gpu::DeviceBuffer b;
  PQKV_EXPECT_OK(b.reserve(std::max<size_t>(1, host.size()) * sizeof(float)));
  EXPECT_EQ(cudaMemcpy(b.data(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice),
            cudaSuccess);
  return b;
}

// bf16 operands, fp32 accumulation: against the exact reference on the same
// bf16-rounded inputs, the error is the rounding of the scaled queries and of
// the softmax weights.
TEST(CudaPrefillAttentionTest, FlashMatchesTheExactReference) {
  PQKV_SKIP_IF_NO_GPU();
  uint64_t seed = 3000;
  for (const auto& c : prefill_cases()) {
    seed += 10;
    SCOPED_TRACE(describe(c, seed));
    ASSERT_TRUE(cuda::flash_attention_supported(c.q_heads, c.kv_heads, c.head_dim));
    const PrefillInputs in = random_inputs(c, seed, /*bf16=*/true);
    auto dq = upload(in.q), dpk = upload(in.past_k), dpv = upload(in.past_v),
         dnk = upload(in.new_k), dnv = upload(in.new_v);
    const size_t n = c.tokens * c.q_heads * c.head_dim;
    gpu::DeviceBuffer dout;
    PQKV_ASSERT_OK(dout.reserve(n * sizeof(float)));
    ASSERT_EQ(cudaMemset(dout.data(), 0xff, n * sizeof(float)), cudaSuccess);  // NaNs
    const cuda::AttentionArgs ga{dq.as<float>(),  dpk.as<float>(), dpv.as<float>(), dnk.as<float>(),
                                 dnv.as<float>(), c.past,          c.tokens,        c.q_heads,
                                 c.kv_heads,      c.head_dim,      dout.as<float>()};
    gpu::DeviceBuffer workspace;
    PQKV_ASSERT_OK(workspace.reserve(cuda::flash_attention_workspace_bytes(ga)));
    PQKV_ASSERT_OK(cuda::flash_attention(ga, workspace.data(), workspace.bytes(), nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> out(n);
    ASSERT_EQ(cudaMemcpy(out.data(), dout.data(), n * sizeof(float), cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }))
        << "rows left unwritten or not finite";
    const auto [err, max_abs] = compare_with_reference(c, in, out);
    EXPECT_LT(err, 2e-2 * std::max(1.0, max_abs));
    // The fp32 CPU kernel on the same inputs, over every row.
    std::vector<float> cpu_out(n);
    cpu::causal_attention(in.args(c, cpu_out.data()));
    EXPECT_LT(pqkv::testing::relative_error(out, cpu_out), 1e-2);
  }
}

TEST(CudaPrefillAttentionTest, RefusesUnsupportedGeometries) {
  PQKV_SKIP_IF_NO_GPU();
  EXPECT_FALSE(cuda::flash_attention_supported(4, 2, 96));
  EXPECT_FALSE(cuda::flash_attention_supported(6, 4, 64));
  cuda::AttentionArgs ga;
  ga.tokens = 4;
  ga.q_heads = 4;
  ga.kv_heads = 2;
  ga.head_dim = 32;
  EXPECT_EQ(cuda::flash_attention(ga, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);
}

// The bf16 copies of the keys and values go to the caller's workspace: one
// too small is refused before anything is enqueued.
TEST(CudaPrefillAttentionTest, RefusesASmallWorkspace) {
  PQKV_SKIP_IF_NO_GPU();
  const PrefillCase c{3, 17, 4, 2, 64};
  const PrefillInputs in = random_inputs(c, 4000, /*bf16=*/true);
  auto dq = upload(in.q), dpk = upload(in.past_k), dpv = upload(in.past_v), dnk = upload(in.new_k),
       dnv = upload(in.new_v);
  gpu::DeviceBuffer dout;
  PQKV_ASSERT_OK(dout.reserve(c.tokens * c.q_heads * c.head_dim * sizeof(float)));
  const cuda::AttentionArgs ga{dq.as<float>(),  dpk.as<float>(), dpv.as<float>(), dnk.as<float>(),
                               dnv.as<float>(), c.past,          c.tokens,        c.q_heads,
                               c.kv_heads,      c.head_dim,      dout.as<float>()};
  // 20 context rows pad to one 64-key tile: 2 (K, V) x 64 x 2 heads x 64 dims x 2 bytes.
  const size_t need = cuda::flash_attention_workspace_bytes(ga);
  EXPECT_EQ(need, size_t{2 * 64 * 2 * 64 * 2});
  gpu::DeviceBuffer workspace;
  PQKV_ASSERT_OK(workspace.reserve(need));
  const Status s = cuda::flash_attention(ga, workspace.data(), need - 16, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  PQKV_EXPECT_OK(cuda::flash_attention(ga, workspace.data(), need, nullptr));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

#endif  // PQKV_HAVE_CUDA

}  // namespace
}  // namespace pqkv::model
