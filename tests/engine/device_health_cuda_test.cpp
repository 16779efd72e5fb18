// Keys and values appended from device memory are checked on the device: a
// NaN, Inf or fp16 overflow is reported at the next host-visible point.
// Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cmath>

#include "core/cuda_handles.h"
#include "engine_test_util.h"

namespace pqkv {
namespace {

using testing::random_floats;

// Appends n tokens of random keys and values to every layer from device memory;
// `bad` (when set) goes into layer 1's keys at token 2, head 1, dim 3.
Status append_from_device(Sequence* seq, int64_t n, uint64_t seed, float bad, bool plant) {
  const ModelSpec& spec = seq->spec();
  const int64_t elems = n * spec.num_kv_heads * spec.head_dim;
  PQKV_ASSIGN_OR_RETURN(auto dk, gpu::DeviceBuffer::allocate(elems * sizeof(float)));
  PQKV_ASSIGN_OR_RETURN(auto dv, gpu::DeviceBuffer::allocate(elems * sizeof(float)));
  for (int l = 0; l < spec.num_layers; ++l) {
    std::vector<float> k = random_floats(elems, seed + 2 * l);
    const std::vector<float> v = random_floats(elems, seed + 2 * l + 1);
    if (plant && l == 1) k[(2 * spec.num_kv_heads + 1) * spec.head_dim + 3] = bad;
    if (cudaMemcpy(dk.data(), k.data(), elems * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(dv.data(), v.data(), elems * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
      return Status::internal("cudaMemcpy failed");
    }
    const Device d = Device::cuda(0);
    PQKV_RETURN_IF_ERROR(
        seq->append(l, TensorView(dk.data(), DType::kF32, d, {n, spec.num_kv_heads, spec.head_dim}),
                    TensorView(dv.data(), DType::kF32, d, {n, spec.num_kv_heads, spec.head_dim}),
                    Stream::host()));
  }
  return ok_status();
}

std::unique_ptr<Store> open_cuda_store(DType dtype) {
  StoreOptions so;
  so.spec = ModelSpec::tiny();
  so.spec.head_dim = 64;
  so.spec.dtype = dtype;
  so.device = Device::cuda(0);
  auto store = Store::open(so);
  PQKV_EXPECT_OK(store);
  return store.ok() ? std::move(store).value() : nullptr;
}

TEST(DeviceHealthCudaTest, NaNAndFp16OverflowFromDeviceMemoryAreReported) {
  PQKV_SKIP_IF_NO_GPU();
  for (float bad : {std::nanf(""), 70000.0f}) {
    auto store = open_cuda_store(DType::kF16);
    ASSERT_NE(store, nullptr);
    auto seq = store->create_sequence("s", SequenceOptions{});
    PQKV_ASSERT_OK(seq);
    PQKV_ASSERT_OK(append_from_device(seq->get(), 40, 7, bad, true));
    const Status health = (*seq)->check_health();
    EXPECT_EQ(health.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(health.message().find("layer 1"), std::string::npos) << health.to_string();
    EXPECT_NE(health.message().find("token 2, head 1, dim 3"), std::string::npos)
        << health.to_string();
    const Status prefill = (*seq)->finish_prefill();
    EXPECT_EQ(prefill.code(), StatusCode::kInvalidArgument) << prefill.to_string();
  }
}

TEST(DeviceHealthCudaTest, FiniteDeviceInputIsHealthy) {
  PQKV_SKIP_IF_NO_GPU();
  auto store = open_cuda_store(DType::kBF16);
  ASSERT_NE(store, nullptr);
  auto seq = store->create_sequence("s", SequenceOptions{});
  PQKV_ASSERT_OK(seq);
  // 70000 fits bf16.
  PQKV_ASSERT_OK(append_from_device(seq->get(), 40, 7, 70000.0f, true));
  PQKV_EXPECT_OK((*seq)->check_health());
  PQKV_EXPECT_OK((*seq)->finish_prefill());
}

}  // namespace
}  // namespace pqkv
#endif  // PQKV_HAVE_CUDA
