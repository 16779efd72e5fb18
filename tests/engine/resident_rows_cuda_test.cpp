// The resident sink and window of a CUDA store (tiering/resident_rows.h):
// steps that read them from HBM equal steps that gather every row from DRAM
// and CPU attention over the same tokens, while the window slides over many
// decode steps; their memory is charged to StoreOptions::hbm_budget_bytes.
// Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "attention/cpu/sparse_attention_cpu.h"
#include "engine_test_util.h"
#include "storage/kv_row_store.h"

namespace pqkv {
namespace {

using testing::random_floats;
using testing::relative_error;

ModelSpec gpu_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
  spec.num_q_heads = 8;
  return spec;
}

// Sink 8, a window of 16 tokens or 1% of the context, top-64.
SequenceOptions sparse_options(bool resident) {
  SequenceOptions o;
  o.budget.sink = {8, 0};
  o.budget.window = {16, 0.01};
  o.budget.top_k = {64, 0};
  o.resident_sink_window = resident;
  return o;
}

struct GpuSequence {
  std::unique_ptr<Store> store;
  Sequence* seq = nullptr;
};

GpuSequence open_gpu(const ModelSpec& spec, const SequenceOptions& options,
                     int64_t hbm_budget = 0) {
  GpuSequence g;
  StoreOptions so;
  so.spec = spec;
  so.device = Device::cuda(0);
  so.hbm_budget_bytes = hbm_budget;
  auto store = Store::open(so);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  g.store = std::move(store).value();
  auto seq = g.store->create_sequence("s", options);
  EXPECT_TRUE(seq.ok()) << seq.status().to_string();
  g.seq = seq.value().get();
  return g;
}

// Keys and values of `n` tokens of every layer: [layer][n, kv_heads, d].
struct Tokens {
  int64_t n = 0;
  std::vector<float> keys, values;
};

Tokens make_tokens(const ModelSpec& spec, int64_t n, uint64_t seed) {
  const int64_t per = n * spec.num_kv_heads * spec.head_dim * spec.num_layers;
  return {n, random_floats(per, seed), random_floats(per, seed + 1)};
}

// Appends tokens [first, first + count) of `t` to `layer`.
Status append(Sequence* seq, const Tokens& t, int layer, int64_t first, int64_t count) {
  const ModelSpec& spec = seq->spec();
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  const int64_t base = (layer * t.n + first) * kv * d;
  return seq->append(layer, host_view(t.keys.data() + base, {count, kv, d}),
                     host_view(t.values.data() + base, {count, kv, d}), Stream::host());
}

// Every token of `t` in host row stores, one per layer, as the GPU stores
// them (bf16): the reference of CPU attention.
Status host_rows(const ModelSpec& spec, const Tokens& t,
                 std::vector<std::unique_ptr<storage::KvRowStore>>* rows) {
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    rows->push_back(std::make_unique<storage::KvRowStore>(
        spec, storage::BlockArena::heap(storage::KvRowStore::block_bytes(spec))));
    const int64_t base = l * t.n * kv * d;
    PQKV_RETURN_IF_ERROR(rows->back()->append(l, host_view(t.keys.data() + base, {t.n, kv, d}),
                                              host_view(t.values.data() + base, {t.n, kv, d})));
  }
  return ok_status();
}

// Decodes `steps` tokens after a prompt of `prompt` tokens on a resident and
// a DRAM-only CUDA sequence; each step of each layer must equal CPU attention
// over the tokens it attended, and the two sequences must agree bit for bit
// where they attended the same tokens. `reserve_tokens` (reserved after the
// prompt, or before it when `reserve_first`) sizes the resident window.
void check_decode(int64_t prompt, int steps, int64_t reserve_tokens, bool reserve_first,
                  uint64_t seed) {
  const ModelSpec spec = gpu_spec();
  SCOPED_TRACE("seed " + std::to_string(seed) + ", prompt " + std::to_string(prompt) + ", " +
               std::to_string(steps) + " steps, reserve " + std::to_string(reserve_tokens) +
               (reserve_first ? " before" : " after") + " the prompt");
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  const Tokens t = make_tokens(spec, prompt + steps, seed);
  GpuSequence resident = open_gpu(spec, sparse_options(true));
  GpuSequence dram = open_gpu(spec, sparse_options(false));
  if (reserve_first) PQKV_ASSERT_OK(resident.seq->reserve(reserve_tokens));
  for (int l = 0; l < spec.num_layers; ++l) {
    PQKV_ASSERT_OK(append(resident.seq, t, l, 0, prompt));
    PQKV_ASSERT_OK(append(dram.seq, t, l, 0, prompt));
  }
  PQKV_ASSERT_OK(resident.seq->finish_prefill());
  PQKV_ASSERT_OK(dram.seq->finish_prefill());
  if (!reserve_first) PQKV_ASSERT_OK(resident.seq->reserve(reserve_tokens));
  EXPECT_GT(resident.store->hbm_bytes_used(), 0);
  EXPECT_EQ(dram.store->hbm_bytes_used(), 0);

  std::vector<std::unique_ptr<storage::KvRowStore>> reference;
  PQKV_ASSERT_OK(host_rows(spec, t, &reference));
  int same_tokens = 0;
  for (int step = 0; step <= steps; ++step) {
    const int64_t length = prompt + step;
    for (int l = 0; l < spec.num_layers; ++l) {
      if (step > 0) {
        PQKV_ASSERT_OK(append(resident.seq, t, l, length - 1, 1));
        PQKV_ASSERT_OK(append(dram.seq, t, l, length - 1, 1));
      }
      const auto q = random_floats(int64_t{spec.num_q_heads} * d, seed * 7919 + step * 31 + l);
      std::vector<float> a(q.size()), b(q.size()), want(q.size());
      AttendTrace ta, tb;
      PQKV_ASSERT_OK(resident.seq->attend(l, host_view(q.data(), {spec.num_q_heads, d}),
                                          host_view(a.data(), {spec.num_q_heads, d}),
                                          Stream::host(), &ta));
      PQKV_ASSERT_OK(dram.seq->attend(l, host_view(q.data(), {spec.num_q_heads, d}),
                                      host_view(b.data(), {spec.num_q_heads, d}), Stream::host(),
                                      &tb));
      ASSERT_EQ(ta.context_length, length);
      // Sink and window in HBM (up to the slots reserved), the picks from DRAM.
      const int64_t sink = ta.budget.sink;
      const int64_t window = ta.budget.window;
      const int64_t attended = static_cast<int64_t>(ta.attended[0].size());
      EXPECT_EQ(ta.fetch.resident_rows + ta.fetch.dram_rows, kv * attended);
      EXPECT_EQ(tb.fetch.resident_rows, 0);
      EXPECT_GE(ta.fetch.resident_rows, kv * sink) << "step " << step;
      if (reserve_tokens >= prompt + steps) {
        EXPECT_EQ(ta.fetch.resident_rows, kv * (sink + window)) << "step " << step;
      }
      std::vector<int32_t> tokens;
      for (int h = 0; h < kv; ++h) {
        for (int64_t p : ta.attended[h])
          tokens.push_back(static_cast<int32_t>(p));
      }
      PQKV_ASSERT_OK(attention::sparse_attention_cpu(*reference[l], l, q.data(), tokens.data(),
                                                     attended, want.data(), nullptr));
      ASSERT_LT(relative_error(a, want), 2e-3) << "step " << step << ", layer " << l;
      if (ta.attended == tb.attended) {
        ++same_tokens;
        ASSERT_EQ(a, b) << "step " << step << ", layer " << l;
      }
    }
  }
  // The two sequences build the same index, so most steps attend the same tokens.
  EXPECT_GT(same_tokens, 0);
}

TEST(ResidentRowsCudaTest, WindowSlidesOverManyStepsAndEqualsTheDramPath) {
  PQKV_SKIP_IF_NO_GPU();
  check_decode(3000, 200, 3200, /*reserve_first=*/false, 41);
}

TEST(ResidentRowsCudaTest, ReservedBeforeThePromptOddSizes) {
  PQKV_SKIP_IF_NO_GPU();
  check_decode(1097, 61, 1200, /*reserve_first=*/true, 43);
}

TEST(ResidentRowsCudaTest, AWindowThatOutgrowsItsSlotsIsGatheredBeyondThem) {
  PQKV_SKIP_IF_NO_GPU();
  // Reserved for 2000 tokens: 20 window slots while the window is 30..32.
  check_decode(3000, 120, 2000, /*reserve_first=*/false, 47);
}

TEST(ResidentRowsCudaTest, ChargedToTheHbmBudgetAndNothingTakenWhenItDoesNotFit) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const Tokens t = make_tokens(spec, 1000, 53);
  GpuSequence small = open_gpu(spec, sparse_options(true), /*hbm_budget=*/4096);
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_ASSERT_OK(append(small.seq, t, l, 0, t.n));
  PQKV_ASSERT_OK(small.seq->finish_prefill());
  const Status s = small.seq->reserve(4000);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_NE(s.message().find("hbm_budget_bytes"), std::string::npos) << s.to_string();
  EXPECT_EQ(small.store->hbm_bytes_used(), 0);
  // The sequence still decodes, every row from DRAM.
  std::vector<float> q = random_floats(int64_t{spec.num_q_heads} * spec.head_dim, 54);
  std::vector<float> out(q.size());
  AttendTrace trace;
  PQKV_ASSERT_OK(small.seq->attend(0, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                   host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                   Stream::host(), &trace));
  EXPECT_EQ(trace.fetch.resident_rows, 0);

  GpuSequence big = open_gpu(spec, sparse_options(true));
  PQKV_ASSERT_OK(big.seq->reserve(4000));
  // Sink 8 and a window of 1% of 4000 tokens, per layer and KV head.
  EXPECT_EQ(big.store->hbm_bytes_used(),
            int64_t{spec.num_layers} * spec.num_kv_heads * (8 + 40) * spec.row_bytes());
  // Dropping the sequence gives its slots back.
  PQKV_ASSERT_OK(big.store->drop("s"));
  EXPECT_EQ(big.store->hbm_bytes_used(), 0);
}

TEST(ResidentRowsCudaTest, AReserveWhoseCacheDoesNotFitTakesNothing) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  const uint64_t seed = 61;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Tokens t = make_tokens(spec, 3000, seed);
  // The resident rows of reserve(4000) fit the HBM budget; the block cache
  // (also charged to it) does not.
  const int64_t resident = int64_t{spec.num_layers} * kv * (8 + 40) * spec.row_bytes();
  StoreOptions so;
  so.spec = spec;
  so.device = Device::cuda(0);
  so.hbm_budget_bytes = resident + 4096;
  so.block_cache_bytes = int64_t{1} << 20;
  auto opened = Store::open(so);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  std::unique_ptr<Store> store = std::move(opened).value();
  auto made = store->create_sequence("s", sparse_options(true));
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  Sequence* seq = made.value().get();
  const int64_t prompt = 1000;
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_ASSERT_OK(append(seq, t, l, 0, prompt));
  PQKV_ASSERT_OK(seq->finish_prefill());

  const Status s = seq->reserve(4000);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_EQ(store->hbm_bytes_used(), 0);
  // Another sequence takes the row blocks the failed reserve gave back, so a
  // stale device row table would read its rows.
  auto other = store->create_sequence("other", sparse_options(false));
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  const Tokens u = make_tokens(spec, 3000, seed + 2);
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_ASSERT_OK(append(other.value().get(), u, l, 0, u.n));

  // The sequence grows past its old blocks and still attends to its own rows.
  std::vector<std::unique_ptr<storage::KvRowStore>> reference;
  PQKV_ASSERT_OK(host_rows(spec, t, &reference));
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_ASSERT_OK(append(seq, t, l, prompt, t.n - prompt));
  for (int l = 0; l < spec.num_layers; ++l) {
    const auto q = random_floats(int64_t{spec.num_q_heads} * d, seed * 13 + l);
    std::vector<float> out(q.size()), want(q.size());
    AttendTrace trace;
    PQKV_ASSERT_OK(seq->attend(l, host_view(q.data(), {spec.num_q_heads, d}),
                               host_view(out.data(), {spec.num_q_heads, d}), Stream::host(),
                               &trace));
    ASSERT_EQ(trace.context_length, t.n);
    EXPECT_EQ(trace.fetch.resident_rows, 0);
    const int64_t attended = static_cast<int64_t>(trace.attended[0].size());
    std::vector<int32_t> tokens;
    for (int h = 0; h < kv; ++h) {
      for (int64_t p : trace.attended[h])
        tokens.push_back(static_cast<int32_t>(p));
    }
    PQKV_ASSERT_OK(attention::sparse_attention_cpu(*reference[l], l, q.data(), tokens.data(),
                                                   attended, want.data(), nullptr));
    ASSERT_LT(relative_error(out, want), 2e-3) << "layer " << l;
  }
}

TEST(ResidentRowsCudaTest, StepWithResidentRowsIsCapturedInACudaGraph) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const Tokens t = make_tokens(spec, 2048, 59);
  GpuSequence g = open_gpu(spec, sparse_options(true));
  PQKV_ASSERT_OK(g.seq->reserve(4096));
  for (int l = 0; l < spec.num_layers; ++l)
    PQKV_ASSERT_OK(append(g.seq, t, l, 0, t.n));
  PQKV_ASSERT_OK(g.seq->finish_prefill());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const size_t bytes = sizeof(float) * spec.num_q_heads * spec.head_dim;
  float* dq = nullptr;
  float* dout = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dq), bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dout), bytes), cudaSuccess);
  const auto q = random_floats(int64_t{spec.num_q_heads} * spec.head_dim, 60);
  ASSERT_EQ(cudaMemcpy(dq, q.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  const TensorView qv(dq, DType::kF32, Device::cuda(0), {spec.num_q_heads, spec.head_dim});
  const TensorView ov(dout, DType::kF32, Device::cuda(0), {spec.num_q_heads, spec.head_dim});
  PQKV_ASSERT_OK(g.seq->attend(1, qv, ov, Stream::cuda(stream)));
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<float> direct(q.size()), replayed(q.size());
  ASSERT_EQ(cudaMemcpy(direct.data(), dout, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemset(dout, 0, bytes), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status s = g.seq->attend(1, qv, ov, Stream::cuda(stream));
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  PQKV_ASSERT_OK(s);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(replayed.data(), dout, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
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
