// Keys and values appended from device memory are checked on the device: a
// NaN, Inf or fp16 overflow is reported at the next host-visible point.
// Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cmath>
#include <vector>

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

// Queries that score past fp32's range against stored finite keys give a
// NaN output in the kernels: a host output is refused at the call, a device
// output at the next check_health() (once), and the sequence stays usable.
TEST(DeviceHealthCudaTest, ScoresPastFp32AreReportedAtTheCallOrByCheckHealth) {
  PQKV_SKIP_IF_NO_GPU();
  auto store = open_cuda_store(DType::kBF16);
  ASSERT_NE(store, nullptr);
  auto made = store->create_sequence("s", SequenceOptions{});
  PQKV_ASSERT_OK(made);
  Sequence* seq = made->get();
  const ModelSpec& spec = seq->spec();
  const int64_t n = 300;
  const int64_t elems = n * spec.num_kv_heads * spec.head_dim;
  std::vector<float> keys;
  for (int l = 0; l < spec.num_layers; ++l) {
    std::vector<float> k = random_floats(elems, 40 + 2 * l);
    const std::vector<float> v = random_floats(elems, 41 + 2 * l);
    PQKV_ASSERT_OK(seq->append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                               host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim}),
                               Stream::host()));
    if (l == 0) keys = k;
  }
  PQKV_ASSERT_OK(seq->finish_prefill());
  // Each query head along the newest token's key of its KV head (always
  // attended): q . k / sqrt(64) is about 3e38 * 16 / 8, past fp32.
  const int group = spec.num_q_heads / spec.num_kv_heads;
  std::vector<float> q(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
  for (int h = 0; h < spec.num_q_heads; ++h) {
    const float* k = keys.data() + ((n - 1) * spec.num_kv_heads + h / group) * spec.head_dim;
    for (int c = 0; c < spec.head_dim; ++c)
      q[h * spec.head_dim + c] = k[c] < 0 ? -3e38f : 3e38f;
  }
  std::vector<float> out(q.size());
  const TensorView qv = host_view(q.data(), {spec.num_q_heads, spec.head_dim});
  const TensorView ov = host_view(out.data(), {spec.num_q_heads, spec.head_dim});
  for (int exact = 0; exact < 2; ++exact) {
    const Status st = exact != 0 ? seq->attend_exact(0, qv, ov, Stream::host())
                                 : seq->attend(0, qv, ov, Stream::host());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << exact << " " << st.to_string();
    EXPECT_NE(st.message().find("fp32's range"), std::string::npos) << st.to_string();
    EXPECT_NE(st.message().find("layer 0"), std::string::npos) << st.to_string();
  }
  PQKV_EXPECT_OK(seq->check_health());
  // A batched step with host tensors waits for the batch, then answers the same.
  const std::vector<SequenceStep> steps = {{seq, qv, ov}};
  const Status batched = store->attend(0, steps, Stream::host());
  EXPECT_EQ(batched.code(), StatusCode::kInvalidArgument) << batched.to_string();
  EXPECT_NE(batched.message().find("fp32's range"), std::string::npos) << batched.to_string();
  PQKV_EXPECT_OK(seq->check_health());

  // Device queries and output on a stream: the call cannot know; check_health does.
  const size_t bytes = q.size() * sizeof(float);
  auto dq = gpu::DeviceBuffer::allocate(bytes);
  auto dout = gpu::DeviceBuffer::allocate(bytes);
  PQKV_ASSERT_OK(dq);
  PQKV_ASSERT_OK(dout);
  ASSERT_EQ(cudaMemcpy(dq->data(), q.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const Device d = Device::cuda(0);
  const TensorView dqv(dq->data(), DType::kF32, d, {spec.num_q_heads, spec.head_dim});
  const TensorView dov(dout->data(), DType::kF32, d, {spec.num_q_heads, spec.head_dim});
  PQKV_EXPECT_OK(seq->attend(0, dqv, dov, Stream::cuda(stream)));
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const Status health = seq->check_health();
  EXPECT_EQ(health.code(), StatusCode::kInvalidArgument) << health.to_string();
  EXPECT_NE(health.message().find("layer 0"), std::string::npos) << health.to_string();
  PQKV_EXPECT_OK(seq->check_health());  // reported once

  // Ordinary queries still attend, with finite outputs.
  const std::vector<float> calm = random_floats(q.size(), 5);
  PQKV_ASSERT_OK(seq->attend(1, host_view(calm.data(), {spec.num_q_heads, spec.head_dim}), ov,
                             Stream::host()));
  for (float x : out)
    ASSERT_TRUE(std::isfinite(x));
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

// Keys the device fit cannot hold in fp32 (PQ at 1e20 or 1e-25, int4 over a
// channel spanning -3e38..3e38) are named by check_health once the build is
// done, as the CPU index refuses them at finish_prefill.
TEST(DeviceHealthCudaTest, KeysOutsideTheCodecsRangeAreReportedAfterTheBuild) {
  PQKV_SKIP_IF_NO_GPU();
  struct Case {
    SelectionConfig selection;
    float scale;
    bool wide_channel;
    const char* says;
  };
  for (const Case& c : {Case{SelectionConfig::pq(), 1e20f, false, "PQ cannot fit"},
                        Case{SelectionConfig::pq(), 1e-25f, false, "PQ cannot fit"},
                        Case{SelectionConfig{}, 1.0f, true, "cannot fit channel 0"},
                        Case{SelectionConfig{}, 1.0f, false, nullptr}}) {
    SCOPED_TRACE(c.selection.to_string() + " " + std::to_string(c.scale));
    auto store = open_cuda_store(DType::kBF16);
    ASSERT_NE(store, nullptr);
    SequenceOptions o;
    o.selection = c.selection;
    auto made = store->create_sequence("s", o);
    PQKV_ASSERT_OK(made);
    Sequence* seq = made->get();
    const ModelSpec& spec = seq->spec();
    const int64_t n = 300;
    const int64_t per_token = int64_t{spec.num_kv_heads} * spec.head_dim;
    for (int l = 0; l < spec.num_layers; ++l) {
      std::vector<float> k = random_floats(n * per_token, 80 + l);
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] *= c.scale;
        if (c.wide_channel && i % spec.head_dim == 0) {
          k[i] = (static_cast<int64_t>(i) / per_token) % 2 == 0 ? 3e38f : -3e38f;
        }
      }
      const std::vector<float> v = random_floats(k.size(), 90 + l);
      PQKV_ASSERT_OK(seq->append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                 host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                 Stream::host()));
    }
    PQKV_ASSERT_OK(seq->finish_prefill());
    const Status health = seq->check_health();
    if (c.says == nullptr) {
      PQKV_EXPECT_OK(health);
      continue;
    }
    EXPECT_EQ(health.code(), StatusCode::kInvalidArgument) << health.to_string();
    EXPECT_NE(health.message().find(c.says), std::string::npos) << health.to_string();
    EXPECT_NE(health.message().find("layer 0"), std::string::npos) << health.to_string();
  }
}

}  // namespace
}  // namespace pqkv
#endif  // PQKV_HAVE_CUDA
