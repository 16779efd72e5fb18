// The CUDA model kernels against their CPU references, on random inputs of
// odd sizes. Each case prints its seed and shape; every test skips without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <vector>

#include "core/cuda_handles.h"
#include "model/cpu/cpu_ops.h"
#include "model/cuda/causal_attention.cuh"
#include "model/cuda/cublas_check.h"
#include "model/cuda/layer_ops.cuh"
#include "test_util.h"

namespace pqkv::model {
namespace {

gpu::DeviceBuffer upload(const std::vector<float>& host) {
  gpu::DeviceBuffer b;
  PQKV_EXPECT_OK(b.reserve(std::max<size_t>(1, host.size()) * sizeof(float)));
  EXPECT_EQ(cudaMemcpy(b.data(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice),
            cudaSuccess);
  return b;
}

std::vector<float> download(const gpu::DeviceBuffer& b, size_t n) {
  std::vector<float> host(n);
  EXPECT_EQ(cudaMemcpy(host.data(), b.data(), n * sizeof(float), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

struct AttentionCase {
  int64_t past;
  int64_t tokens;
  int q_heads;
  int kv_heads;
  int head_dim;
};

TEST(CudaKernelsTest, CausalAttentionMatchesCpu) {
  PQKV_SKIP_IF_NO_GPU();
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 16},   {0, 17, 4, 4, 64},  {5, 97, 8, 2, 128},  {300, 1, 8, 1, 128},
      {0, 300, 2, 2, 16}, {129, 3, 4, 2, 32}, {1000, 2, 6, 3, 96},
  };
  uint64_t seed = 100;
  for (const auto& c : cases) {
    ++seed;
    SCOPED_TRACE(::testing::Message()
                 << "seed " << seed << " past " << c.past << " tokens " << c.tokens << " heads "
                 << c.q_heads << "/" << c.kv_heads << " d " << c.head_dim);
    const int64_t kv = int64_t{c.kv_heads} * c.head_dim;
    const int64_t qd = int64_t{c.q_heads} * c.head_dim;
    const auto q = pqkv::testing::random_floats(c.tokens * qd, seed);
    const auto pk = pqkv::testing::random_floats(c.past * kv, seed + 1);
    const auto pv = pqkv::testing::random_floats(c.past * kv, seed + 2);
    const auto nk = pqkv::testing::random_floats(c.tokens * kv, seed + 3);
    const auto nv = pqkv::testing::random_floats(c.tokens * kv, seed + 4);
    std::vector<float> want(c.tokens * qd);
    cpu::AttentionArgs ca{q.data(), pk.data(), pv.data(),  nk.data(),  nv.data(),  c.past,
                          c.tokens, c.q_heads, c.kv_heads, c.head_dim, want.data()};
    cpu::causal_attention(ca);

    auto dq = upload(q), dpk = upload(pk), dpv = upload(pv), dnk = upload(nk), dnv = upload(nv);
    gpu::DeviceBuffer out;
    PQKV_ASSERT_OK(out.reserve(want.size() * sizeof(float)));
    cuda::AttentionArgs ga{dq.as<float>(),  dpk.as<float>(), dpv.as<float>(), dnk.as<float>(),
                           dnv.as<float>(), c.past,          c.tokens,        c.q_heads,
                           c.kv_heads,      c.head_dim,      out.as<float>()};
    PQKV_ASSERT_OK(cuda::causal_attention(ga, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LT(max_abs_diff(download(out, want.size()), want), 2e-5);
  }
}

TEST(CudaKernelsTest, RowOpsMatchCpu) {
  PQKV_SKIP_IF_NO_GPU();
  for (const auto& [tokens, heads, head_dim] :
       std::vector<std::tuple<int64_t, int, int>>{{1, 4, 16}, {17, 3, 64}, {97, 8, 128}}) {
    const uint64_t seed = 7 + tokens;
    SCOPED_TRACE(::testing::Message() << "seed " << seed << " tokens " << tokens << " heads "
                                      << heads << " d " << head_dim);
    const int n = heads * head_dim;
    const auto x = pqkv::testing::random_floats(tokens * n, seed);
    const auto w = pqkv::testing::random_floats(n, seed + 1);
    WeightTensor wt{"w", DType::kF32, {n}, w.data(), "test", "F32", true};

    std::vector<float> want(x.size());
    cpu::rms_norm(x.data(), tokens, n, wt, 1e-5, want.data());
    auto dx = upload(x), dw = upload(w);
    gpu::DeviceBuffer dy;
    PQKV_ASSERT_OK(dy.reserve(x.size() * sizeof(float)));
    PQKV_ASSERT_OK(
        cuda::rms_norm(dx.as<float>(), tokens, n, dw.as<float>(), 1e-5f, dy.as<float>(), nullptr));
    EXPECT_LT(max_abs_diff(download(dy, x.size()), want), 1e-5) << "rms_norm";

    const auto cos = pqkv::testing::random_floats(tokens * head_dim / 2, seed + 2);
    const auto sin = pqkv::testing::random_floats(tokens * head_dim / 2, seed + 3);
    want = x;
    cpu::apply_rope(want.data(), tokens, heads, head_dim, cos.data(), sin.data());
    auto dcos = upload(cos), dsin = upload(sin);
    PQKV_ASSERT_OK(cuda::rope(dx.as<float>(), tokens, heads, head_dim, dcos.as<float>(),
                              dsin.as<float>(), nullptr));
    EXPECT_LT(max_abs_diff(download(dx, x.size()), want), 1e-5) << "rope";

    const auto up = pqkv::testing::random_floats(x.size(), seed + 4);
    want = x;
    cpu::swiglu(want.data(), up.data(), static_cast<int64_t>(x.size()));
    auto dg = upload(x), du = upload(up);
    PQKV_ASSERT_OK(cuda::swiglu(dg.as<float>(), du.as<float>(), x.size(), nullptr));
    EXPECT_LT(max_abs_diff(download(dg, x.size()), want), 1e-5) << "swiglu";
  }
}

}  // namespace
}  // namespace pqkv::model

#endif  // PQKV_HAVE_CUDA
