// The GPU decode path against the CPU reference. Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>

#include "attention/cpu/sparse_attention_cpu.h"
#include "engine_test_util.h"
#include "storage/kv_row_store.h"

namespace pqkv {
namespace {

using testing::random_floats;
using testing::relative_error;

struct Prompt {
  ModelSpec spec;
  int64_t n = 0;
  std::vector<float> keys;  // [layers][n, kv_heads, d]
  std::vector<float> values;
};

Prompt make_prompt(const ModelSpec& spec, int64_t n, uint64_t seed) {
  Prompt p{spec, n, {}, {}};
  const int64_t per = n * spec.num_kv_heads * spec.head_dim;
  p.keys = random_floats(per * spec.num_layers, seed);
  p.values = random_floats(per * spec.num_layers, seed + 1);
  return p;
}

Sequence* open_and_prefill(std::unique_ptr<Store>* store, const Prompt& p, Device device,
                           const SequenceOptions& options) {
  StoreOptions so;
  so.spec = p.spec;
  so.device = device;
  auto opened = Store::open(so);
  PQKV_EXPECT_OK(opened);
  *store = std::move(opened).value();
  auto seq = (*store)->create_sequence("s", options);
  PQKV_EXPECT_OK(seq);
  const int kv = p.spec.num_kv_heads;
  const int d = p.spec.head_dim;
  const int64_t per = p.n * kv * d;
  for (int l = 0; l < p.spec.num_layers; ++l) {
    PQKV_EXPECT_OK((*seq)->append(l, host_view(p.keys.data() + l * per, {p.n, kv, d}),
                                  host_view(p.values.data() + l * per, {p.n, kv, d}),
                                  Stream::host()));
  }
  PQKV_EXPECT_OK((*seq)->finish_prefill());
  return seq.value().get();  // the store keeps the sequence
}

ModelSpec gpu_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
  spec.num_q_heads = 8;
  return spec;
}

TEST(SequenceCudaTest, FullBudgetMatchesTheCpuBackend) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const Prompt p = make_prompt(spec, 4096 + 97, 1);
  SequenceOptions opts;
  opts.budget = BudgetPolicy::everything();
  std::unique_ptr<Store> cpu_store, gpu_store;
  Sequence* cpu = open_and_prefill(&cpu_store, p, Device::cpu(), opts);
  Sequence* gpu = open_and_prefill(&gpu_store, p, Device::cuda(0), opts);
  auto q = random_floats(8 * 64, 3);
  std::vector<float> a(q.size()), b(q.size()), exact(q.size());
  for (int l = 0; l < spec.num_layers; ++l) {
    PQKV_ASSERT_OK(
        cpu->attend(l, host_view(q.data(), {8, 64}), host_view(a.data(), {8, 64}), Stream::host()));
    Status s =
        gpu->attend(l, host_view(q.data(), {8, 64}), host_view(b.data(), {8, 64}), Stream::host());
    PQKV_ASSERT_OK(s);
    PQKV_ASSERT_OK(gpu->attend_exact(l, host_view(q.data(), {8, 64}),
                                     host_view(exact.data(), {8, 64}), Stream::host()));
    EXPECT_LT(relative_error(b, a), 2e-3) << "layer " << l;
    EXPECT_LT(relative_error(exact, a), 2e-3) << "layer " << l;
  }
}

TEST(SequenceCudaTest, SparseStepEqualsCpuAttentionOverTheSameTokensAndFindsTheNeedle) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  Prompt p = make_prompt(spec, 3000, 5);
  const int64_t needle = 1234;
  const int64_t per = p.n * 2 * 64;
  for (int l = 0; l < spec.num_layers; ++l) {
    for (int h = 0; h < 2; ++h) {
      for (int c = 0; c < 64; ++c)
        p.keys[l * per + (needle * 2 + h) * 64 + c] = c % 2 ? 3.f : -3.f;
    }
  }
  SequenceOptions opts;
  opts.budget.sink = {8, 0};
  opts.budget.window = {16, 0};
  opts.budget.top_k = {64, 0};
  std::unique_ptr<Store> store;
  Sequence* gpu = open_and_prefill(&store, p, Device::cuda(0), opts);
  storage::KvRowStore reference(spec,
                                storage::BlockArena::heap(storage::KvRowStore::block_bytes(spec)));
  PQKV_ASSERT_OK(reference.append(0, host_view(p.keys.data(), {p.n, 2, 64}),
                                  host_view(p.values.data(), {p.n, 2, 64})));
  std::vector<float> q(8 * 64), out(8 * 64), want(8 * 64);
  for (int h = 0; h < 8; ++h) {
    for (int c = 0; c < 64; ++c)
      q[h * 64 + c] = c % 2 ? 1.f : -1.f;
  }
  AttendTrace trace;
  Status s = gpu->attend(0, host_view(q.data(), {8, 64}), host_view(out.data(), {8, 64}),
                         Stream::host(), &trace);
  PQKV_ASSERT_OK(s);
  ASSERT_EQ(trace.attended.size(), 2u);
  std::vector<int32_t> tokens;
  for (int h = 0; h < 2; ++h) {
    const auto& sel = trace.selected[h];
    EXPECT_NE(std::find(sel.begin(), sel.end(), needle), sel.end()) << "kv head " << h;
    EXPECT_EQ(trace.attended[h].size(), 8u + 16u + 64u);
    for (int64_t t : trace.attended[h])
      tokens.push_back(static_cast<int32_t>(t));
  }
  PQKV_ASSERT_OK(attention::sparse_attention_cpu(reference, 0, q.data(), tokens.data(), 88,
                                                 want.data(), nullptr));
  EXPECT_LT(relative_error(out, want), 2e-3);
}

TEST(SequenceCudaTest, DecodeStepIsCapturedInACudaGraph) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const Prompt p = make_prompt(spec, 2048, 9);
  SequenceOptions opts;
  opts.budget = BudgetPolicy::ratio_of_context(0.1);
  std::unique_ptr<Store> store;
  Sequence* gpu = open_and_prefill(&store, p, Device::cuda(0), opts);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  float* dq = nullptr;
  float* dout = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dq), 8 * 64 * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dout), 8 * 64 * 4), cudaSuccess);
  auto q = random_floats(8 * 64, 10);
  ASSERT_EQ(cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  const TensorView qv(dq, DType::kF32, Device::cuda(0), {8, 64});
  const TensorView ov(dout, DType::kF32, Device::cuda(0), {8, 64});
  // A first call sizes the buffers; the captured one must allocate nothing.
  PQKV_ASSERT_OK(gpu->attend(1, qv, ov, Stream::cuda(stream)));
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<float> direct(8 * 64), replayed(8 * 64);
  ASSERT_EQ(cudaMemcpy(direct.data(), dout, direct.size() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  ASSERT_EQ(cudaMemset(dout, 0, 8 * 64 * 4), cudaSuccess);

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  Status s = gpu->attend(1, qv, ov, Stream::cuda(stream));
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  PQKV_ASSERT_OK(s);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(replayed.data(), dout, replayed.size() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  EXPECT_EQ(replayed, direct);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaFree(dq);
  cudaFree(dout);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace pqkv
#endif  // PQKV_HAVE_CUDA
