// A decode step of every layer captured once in a CUDA graph and replayed for
// a whole generation: each replay appends the token written into the
// captured buffers at the device-side length and attends with the plan the
// GPU derives from it. Checked against direct calls at the same state, the
// rows against exact attention on the CPU, and the new tokens' codes against
// a direct encode (PQ: the same codebook; scalar codes: a twin sequence fed
// the same tokens by direct calls), for the default int4 keys and for PQ.
// Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "engine/inspector.h"
#include "engine_test_util.h"
#include "index/cuda/layer_index_cuda.h"

namespace pqkv {
namespace {

using testing::random_floats;
using testing::relative_error;

constexpr int64_t kPrompt = 1000;
constexpr int kSteps = 200;

ModelSpec replay_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.num_layers = 4;
  spec.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
  spec.num_q_heads = 8;
  return spec;
}

// Top-K and window as ratios of the length, so k and the window change while
// the generation runs.
SequenceOptions replay_options(const SelectionConfig& selection) {
  SequenceOptions o;
  o.selection = selection;
  o.budget.sink = {4, 0.0};
  o.budget.window = {0, 0.02};
  o.budget.top_k = {0, 0.05};
  return o;
}

// Device buffers of one layer's step, captured by address.
struct StepBuffers {
  float* keys = nullptr;     // [1, kv_heads, head_dim]
  float* values = nullptr;   // [1, kv_heads, head_dim]
  float* queries = nullptr;  // [q_heads, head_dim]
  float* out = nullptr;      // [q_heads, head_dim]
};

class GraphReplayCudaTest : public ::testing::TestWithParam<SelectionConfig> {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    spec_ = replay_spec();
    kv_ = spec_.num_kv_heads * spec_.head_dim;
    q_ = spec_.num_q_heads * spec_.head_dim;
    StoreOptions so;
    so.spec = spec_;
    so.device = Device::cuda(0);
    auto store = Store::open(so);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    store_ = std::move(store).value();
    auto seq = store_->create_sequence("g", replay_options(GetParam()));
    ASSERT_TRUE(seq.ok()) << seq.status().to_string();
    seq_ = seq.value();
    StoreOptions co = so;
    co.device = Device::cpu();
    auto cpu = Store::open(co);
    ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
    cpu_store_ = std::move(cpu).value();
    SequenceOptions exact;
    exact.budget = BudgetPolicy::everything();
    auto ref = cpu_store_->create_sequence("ref", exact);
    ASSERT_TRUE(ref.ok()) << ref.status().to_string();
    ref_ = ref.value();
    for (int l = 0; l < spec_.num_layers; ++l) {
      const auto k = random_floats(kPrompt * kv_, 100 + l);
      const auto v = random_floats(kPrompt * kv_, 200 + l);
      for (Sequence* s : {seq_.get(), ref_.get()}) {
        PQKV_ASSERT_OK(
            s->append(l, kv_view(k.data(), kPrompt), kv_view(v.data(), kPrompt), Stream::host()));
      }
    }
    PQKV_ASSERT_OK(seq_->finish_prefill());
    PQKV_ASSERT_OK(ref_->finish_prefill());
    PQKV_ASSERT_OK(seq_->reserve(kPrompt + kSteps));
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    buffers_.resize(spec_.num_layers);
    for (StepBuffers& b : buffers_) {
      for (float** p : {&b.keys, &b.values}) {
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(p), kv_ * sizeof(float)), cudaSuccess);
      }
      for (float** p : {&b.queries, &b.out}) {
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(p), q_ * sizeof(float)), cudaSuccess);
      }
    }
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&direct_out_), q_ * sizeof(float)), cudaSuccess);
  }

  void TearDown() override {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
    for (StepBuffers& b : buffers_) {
      for (float* p : {b.keys, b.values, b.queries, b.out})
        cudaFree(p);
    }
    cudaFree(direct_out_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  TensorView kv_view(const float* p, int64_t n) const {
    return TensorView(const_cast<float*>(p), DType::kF32, Device::cpu(),
                      {n, spec_.num_kv_heads, spec_.head_dim});
  }
  TensorView device_kv(float* p) const {
    return TensorView(p, DType::kF32, Device::cuda(0), {1, spec_.num_kv_heads, spec_.head_dim});
  }
  TensorView device_q(float* p) const {
    return TensorView(p, DType::kF32, Device::cuda(0), {spec_.num_q_heads, spec_.head_dim});
  }

  // Captures append + attend of every layer on stream_.
  void capture() {
    ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    Status s = ok_status();
    for (int l = 0; l < spec_.num_layers && s.ok(); ++l) {
      const StepBuffers& b = buffers_[l];
      s = seq_->append(l, device_kv(b.keys), device_kv(b.values), Stream::cuda(stream_));
      if (s.ok()) {
        s = seq_->attend(l, device_q(b.queries), device_q(b.out), Stream::cuda(stream_));
      }
    }
    ASSERT_EQ(cudaStreamEndCapture(stream_, &graph_), cudaSuccess);
    ASSERT_TRUE(s.ok()) << s.to_string();
    ASSERT_EQ(cudaGraphInstantiate(&exec_, graph_, 0), cudaSuccess);
  }

  // PQ: the codes equal a fresh index's encode with the same codebook.
  void expect_codes_match_the_codebook(const std::vector<std::vector<float>>& new_keys) {
    for (int l = 0; l < spec_.num_layers; ++l) {
      const index::LayerIndex* idx = engine::Inspector::layer_index(*seq_, l);
      ASSERT_NE(idx, nullptr);
      ASSERT_EQ(idx->num_tokens(), kPrompt + kSteps);
      auto codebook = idx->codebook();
      ASSERT_TRUE(codebook.ok()) << codebook.status().to_string();
      auto fresh = index::LayerIndexCuda::create(Device::cuda(0), idx->shape(), spec_.num_kv_heads);
      ASSERT_TRUE(fresh.ok()) << fresh.status().to_string();
      PQKV_ASSERT_OK((*fresh)->set_codebook(*codebook, Stream::cuda(stream_)));
      float* keys = nullptr;
      ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&keys), new_keys[l].size() * 4), cudaSuccess);
      ASSERT_EQ(
          cudaMemcpy(keys, new_keys[l].data(), new_keys[l].size() * 4, cudaMemcpyHostToDevice),
          cudaSuccess);
      PQKV_ASSERT_OK((*fresh)->add(TensorView(keys, DType::kF32, Device::cuda(0),
                                              {kSteps, spec_.num_kv_heads, spec_.head_dim}),
                                   Stream::cuda(stream_)));
      ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      const int m = idx->shape().m;
      for (int h = 0; h < spec_.num_kv_heads; ++h) {
        std::vector<uint8_t> got(kSteps * m), want(kSteps * m);
        PQKV_ASSERT_OK(idx->copy_codes(h, kPrompt, kPrompt + kSteps, got.data()));
        PQKV_ASSERT_OK((*fresh)->copy_codes(h, 0, kSteps, want.data()));
        EXPECT_EQ(got, want) << "layer " << l << ", KV head " << h;
      }
      cudaFree(keys);
    }
  }

  // Scalar codes: a twin sequence given the same prompt and the same new keys
  // by direct calls holds the same codes (its scales come from the same
  // prompt, and each token's code depends on that token only).
  void expect_codes_match_a_twin(const std::vector<std::vector<float>>& new_keys) {
    auto twin = store_->create_sequence("twin", replay_options(GetParam()));
    ASSERT_TRUE(twin.ok()) << twin.status().to_string();
    for (int l = 0; l < spec_.num_layers; ++l) {
      const auto k = random_floats(kPrompt * kv_, 100 + l);
      const auto v = random_floats(kPrompt * kv_, 200 + l);
      PQKV_ASSERT_OK((*twin)->append(l, kv_view(k.data(), kPrompt), kv_view(v.data(), kPrompt),
                                     Stream::host()));
    }
    PQKV_ASSERT_OK((*twin)->finish_prefill());
    const int64_t code_bytes = GetParam().code == KeyCode::kInt8   ? spec_.head_dim
                               : GetParam().code == KeyCode::kInt4 ? spec_.head_dim / 2
                                                                   : spec_.head_dim * 4;
    for (int l = 0; l < spec_.num_layers; ++l) {
      PQKV_ASSERT_OK((*twin)->append(l, kv_view(new_keys[l].data(), kSteps),
                                     kv_view(new_keys[l].data(), kSteps), Stream::host()));
      const index::LayerIndex* got_index = engine::Inspector::layer_index(*seq_, l);
      const index::LayerIndex* want_index = engine::Inspector::layer_index(**twin, l);
      ASSERT_NE(got_index, nullptr);
      ASSERT_NE(want_index, nullptr);
      ASSERT_EQ(got_index->num_tokens(), kPrompt + kSteps);
      ASSERT_EQ(want_index->num_tokens(), kPrompt + kSteps);
      for (int h = 0; h < spec_.num_kv_heads; ++h) {
        std::vector<uint8_t> got(kSteps * code_bytes), want(kSteps * code_bytes);
        PQKV_ASSERT_OK(got_index->copy_codes(h, kPrompt, kPrompt + kSteps, got.data()));
        PQKV_ASSERT_OK(want_index->copy_codes(h, kPrompt, kPrompt + kSteps, want.data()));
        EXPECT_EQ(got, want) << "layer " << l << ", KV head " << h;
      }
    }
  }

  ModelSpec spec_;
  int64_t kv_ = 0;
  int64_t q_ = 0;
  std::unique_ptr<Store> store_, cpu_store_;
  std::shared_ptr<Sequence> seq_, ref_;
  cudaStream_t stream_ = nullptr;
  std::vector<StepBuffers> buffers_;
  float* direct_out_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

TEST_P(GraphReplayCudaTest, OneCapturedStepReplaysAWholeGenerationLikeDirectCalls) {
  capture();
  const int layers = spec_.num_layers;
  // The capture ran nothing. Seeds: prompt 100 + layer, steps 1000 + 10 * step + layer.
  EXPECT_EQ(seq_->length(0), kPrompt);
  std::vector<std::vector<float>> new_keys(layers);  // [step][kv] per layer, for the codes
  std::vector<float> replayed(q_), direct(q_), q;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<std::vector<float>> queries(layers);
    for (int l = 0; l < layers; ++l) {
      const uint64_t seed = 1000 + 10 * step + l;
      const auto k = random_floats(kv_, seed);
      const auto v = random_floats(kv_, seed + 1);
      queries[l] = random_floats(q_, seed + 2);
      const StepBuffers& b = buffers_[l];
      ASSERT_EQ(cudaMemcpyAsync(b.keys, k.data(), kv_ * 4, cudaMemcpyHostToDevice, stream_),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(b.values, v.data(), kv_ * 4, cudaMemcpyHostToDevice, stream_),
                cudaSuccess);
      ASSERT_EQ(
          cudaMemcpyAsync(b.queries, queries[l].data(), q_ * 4, cudaMemcpyHostToDevice, stream_),
          cudaSuccess);
      PQKV_ASSERT_OK(ref_->append(l, kv_view(k.data(), 1), kv_view(v.data(), 1), Stream::host()));
      new_keys[l].insert(new_keys[l].end(), k.begin(), k.end());
    }
    ASSERT_EQ(cudaGraphLaunch(exec_, stream_), cudaSuccess);
    // A direct call before the host learns the length is refused.
    const Status early = seq_->attend(0, device_q(buffers_[0].queries), device_q(direct_out_),
                                      Stream::cuda(stream_));
    ASSERT_EQ(early.code(), StatusCode::kFailedPrecondition) << early.to_string();
    PQKV_ASSERT_OK(seq_->sync_length(Stream::cuda(stream_)));
    for (int l = 0; l < layers; ++l) {
      ASSERT_EQ(seq_->length(l), kPrompt + step + 1) << "layer " << l;
      // Same layer state, same queries: the direct step plans on the host.
      const StepBuffers& b = buffers_[l];
      PQKV_ASSERT_OK(
          seq_->attend(l, device_q(b.queries), device_q(direct_out_), Stream::cuda(stream_)));
      ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(replayed.data(), b.out, q_ * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(direct.data(), direct_out_, q_ * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(replayed, direct) << "step " << step << ", layer " << l
                                  << ", max difference relative "
                                  << relative_error(replayed, direct);
    }
  }

  // The rows went where the device length said: exact attention over them
  // equals the CPU's over the same tokens.
  const std::vector<float> last_q = random_floats(q_, 7);
  std::vector<float> gpu_exact(q_), cpu_exact(q_);
  for (int l = 0; l < layers; ++l) {
    PQKV_ASSERT_OK(seq_->attend_exact(
        l,
        TensorView(const_cast<float*>(last_q.data()), DType::kF32, Device::cpu(),
                   {spec_.num_q_heads, 64}),
        TensorView(gpu_exact.data(), DType::kF32, Device::cpu(), {spec_.num_q_heads, 64}),
        Stream::host()));
    PQKV_ASSERT_OK(ref_->attend_exact(
        l,
        TensorView(const_cast<float*>(last_q.data()), DType::kF32, Device::cpu(),
                   {spec_.num_q_heads, 64}),
        TensorView(cpu_exact.data(), DType::kF32, Device::cpu(), {spec_.num_q_heads, 64}),
        Stream::host()));
    EXPECT_LT(relative_error(gpu_exact, cpu_exact), 2e-3) << "layer " << l;
  }

  // The new tokens' codes are a direct encode's.
  if (GetParam().code == KeyCode::kPq) {
    expect_codes_match_the_codebook(new_keys);
  } else {
    expect_codes_match_a_twin(new_keys);
  }
}

TEST_P(GraphReplayCudaTest, ReplaysPastTheReservationAreDroppedAndReported) {
  capture();
  for (int step = 0; step < kSteps + 3; ++step)
    ASSERT_EQ(cudaGraphLaunch(exec_, stream_), cudaSuccess);
  const Status s = seq_->sync_length(Stream::cuda(stream_));
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange) << s.to_string();
  EXPECT_EQ(seq_->length(spec_.num_layers - 1), kPrompt + kSteps);
  // The host knows the length again: direct calls work.
  PQKV_ASSERT_OK(
      seq_->attend(0, device_q(buffers_[0].queries), device_q(direct_out_), Stream::cuda(stream_)));
  PQKV_ASSERT_OK(seq_->sync_length(Stream::cuda(stream_)));
}

TEST_P(GraphReplayCudaTest, CapturingAnAppendNeedsAReservationAndDeviceTensors) {
  // A second sequence without reserve.
  auto other = store_->create_sequence("unreserved", replay_options(GetParam()));
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  const auto k = random_floats(kPrompt * kv_, 1);
  for (int l = 0; l < spec_.num_layers; ++l) {
    PQKV_ASSERT_OK((*other)->append(l, kv_view(k.data(), kPrompt), kv_view(k.data(), kPrompt),
                                    Stream::host()));
  }
  PQKV_ASSERT_OK((*other)->finish_prefill());
  const std::vector<float> host_key(kv_);
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status unreserved = (*other)->append(0, device_kv(buffers_[0].keys),
                                             device_kv(buffers_[0].values), Stream::cuda(stream_));
  const Status from_host = seq_->append(0, kv_view(host_key.data(), 1), kv_view(host_key.data(), 1),
                                        Stream::cuda(stream_));
  cudaGraph_t g = nullptr;
  cudaStreamEndCapture(stream_, &g);
  if (g != nullptr) cudaGraphDestroy(g);
  EXPECT_EQ(unreserved.code(), StatusCode::kFailedPrecondition) << unreserved.to_string();
  EXPECT_EQ(from_host.code(), StatusCode::kInvalidArgument) << from_host.to_string();
}

INSTANTIATE_TEST_SUITE_P(Codes, GraphReplayCudaTest,
                         ::testing::Values(SelectionConfig{}, SelectionConfig::pq()),
                         [](const ::testing::TestParamInfo<SelectionConfig>& info) {
                           return info.param.code == KeyCode::kPq ? std::string("pq")
                                                                  : std::string("int4");
                         });

}  // namespace
}  // namespace pqkv
#endif  // PQKV_HAVE_CUDA
