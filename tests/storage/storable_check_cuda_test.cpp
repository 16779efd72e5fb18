// GPU tests of the device-side check of keys and values headed for storage:
// it flags exactly what the CPU reference (find_unstorable) flags.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cmath>
#include <vector>

#include "core/cuda_handles.h"
#include "storage/cuda/storable_check_cuda.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

using pqkv::testing::random_floats;

constexpr int kHeads = 3;
constexpr int kDim = 64;

// Runs the check on device copies of keys and values (fp32 input converted to
// `in` on the host first) and returns the report.
StorableReport run_check(const std::vector<float>& keys, const std::vector<float>& values, DType in,
                         DType row, int64_t first_token) {
  const int64_t n = static_cast<int64_t>(keys.size()) / (kHeads * kDim);
  const size_t bytes = keys.size() * dtype_size(in);
  std::vector<std::byte> k(bytes), v(bytes);
  convert_from_float(keys.data(), static_cast<int64_t>(keys.size()), k.data(), in);
  convert_from_float(values.data(), static_cast<int64_t>(values.size()), v.data(), in);
  auto dk = gpu::DeviceBuffer::allocate(bytes);
  auto dv = gpu::DeviceBuffer::allocate(bytes);
  auto report = gpu::PinnedBuffer::allocate(sizeof(StorableReport));
  PQKV_EXPECT_OK(dk);
  PQKV_EXPECT_OK(dv);
  PQKV_EXPECT_OK(report);
  *report->as<StorableReport>() = {};
  EXPECT_EQ(cudaMemcpy(dk->data(), k.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dv->data(), v.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  StorableCheckArgs a;
  a.keys = dk->data();
  a.values = dv->data();
  a.in_dtype = in;
  a.row_dtype = row;
  a.n = n;
  a.kv_heads = kHeads;
  a.head_dim = kDim;
  a.layer = 5;
  a.first_token = first_token;
  a.report = report->as<StorableReport>();
  const Status s = check_storable_cuda(a, nullptr);
  PQKV_EXPECT_OK(s);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return *report->as<StorableReport>();
}

TEST(StorableCheckCudaTest, FlagsWhatTheCpuReferenceFlags) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 11;
  for (int64_t n : {1, 17, 97}) {
    for (DType in : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (DType row : {DType::kBF16, DType::kF16, DType::kF32}) {
        SCOPED_TRACE(::testing::Message() << "seed " << seed << " n " << n << " in "
                                          << dtype_name(in) << " row " << dtype_name(row));
        std::vector<float> k = random_floats(n * kHeads * kDim, seed);
        std::vector<float> v = random_floats(n * kHeads * kDim, seed + 1);
        StorableReport r = run_check(k, v, in, row, 100);
        EXPECT_EQ(r.found, 0);

        // One bad element: a value above fp16's range (only bad for fp16
        // rows and fp32 input), or NaN.
        const int64_t token = n - 1;
        const int64_t at = (token * kHeads + 2) * kDim + 7;
        for (float bad : {70000.0f, std::nanf("")}) {
          std::vector<float> vb = v;
          vb[at] = bad;
          std::vector<std::byte> in_bytes(vb.size() * dtype_size(in));
          convert_from_float(vb.data(), static_cast<int64_t>(vb.size()), in_bytes.data(), in);
          const bool expect_found =
              find_unstorable(in_bytes.data(), in, static_cast<int64_t>(vb.size()), row) >= 0;
          r = run_check(k, vb, in, row, 100);
          EXPECT_EQ(r.found != 0, expect_found) << "bad value " << bad;
          if (expect_found) {
            EXPECT_EQ(r.layer, 5);
            EXPECT_EQ(r.token, 100 + token);
            EXPECT_EQ(r.head, 2);
            EXPECT_EQ(r.dim, 7);
            EXPECT_EQ(r.is_value, 1);
          }
        }
      }
    }
  }
}

TEST(StorableCheckCudaTest, ReportsInfInKeysWithItsPosition) {
  PQKV_SKIP_IF_NO_GPU();
  std::vector<float> k = random_floats(4 * kHeads * kDim, 3);
  k[kHeads * kDim] = INFINITY;  // token 1, head 0, dim 0
  const StorableReport r = run_check(k, k, DType::kF32, DType::kBF16, 0);
  EXPECT_EQ(r.found, 1);
  EXPECT_EQ(r.token, 1);
  EXPECT_TRUE(std::isinf(r.value));
}

}  // namespace
}  // namespace pqkv::storage
#endif  // PQKV_HAVE_CUDA
