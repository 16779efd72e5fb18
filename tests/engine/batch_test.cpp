// The batched decode step and the selector over sequences of different
// lengths and budgets, against the same sequences attended one by one, and
// the memory of many short sequences in one Store.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "engine_test_util.h"
#include "pqkv/store.h"

namespace pqkv::testing {
namespace {

struct Batch {
  std::unique_ptr<Store> store;
  std::vector<Sequence*> seqs;
};

// Sequences of `lengths` prompt tokens with different budgets, prefilled,
// plus one decode token appended to every layer.
Batch make_batch(const StoreOptions& so, const std::vector<int64_t>& lengths, uint64_t seed) {
  Batch b;
  auto store = Store::open(so);
  PQKV_EXPECT_OK(store);
  b.store = std::move(store).value();
  for (size_t i = 0; i < lengths.size(); ++i) {
    SequenceOptions opts;
    opts.pq.m = 4;
    opts.pq.bits = 4;
    opts.budget.sink = {4, 0};
    opts.budget.window = {static_cast<int64_t>(4 + 2 * i), 0};
    opts.budget.top_k = {0, 0.05 + 0.05 * static_cast<double>(i)};
    auto seq = b.store->create_sequence("s" + std::to_string(i), opts);
    PQKV_EXPECT_OK(seq);
    Status s = append_random(seq->get(), lengths[i], seed + i);
    PQKV_EXPECT_OK(s);
    s = (*seq)->finish_prefill();
    PQKV_EXPECT_OK(s);
    s = append_random(seq->get(), 1, seed + 100 + i);
    PQKV_EXPECT_OK(s);
    b.seqs.push_back(seq->get());
  }
  return b;
}

// Attends every sequence of `b` one by one, then as one batch, layer by
// layer, and checks the outputs agree within `rel_tol` (plus the same
// absolute tolerance); 0 asks for equal outputs.
void expect_batch_equals_one_by_one(Batch& b, const ModelSpec& spec, uint64_t seed, float rel_tol) {
  const size_t n = b.seqs.size();
  const int64_t qsize = int64_t{spec.num_q_heads} * spec.head_dim;
  for (int layer = 0; layer < spec.num_layers; ++layer) {
    std::vector<std::vector<float>> q(n), one(n), batched(n);
    std::vector<SequenceStep> steps(n);
    for (size_t i = 0; i < n; ++i) {
      q[i] = random_floats(qsize, seed + 1000 * layer + i);
      one[i].assign(qsize, 0);
      batched[i].assign(qsize, -1);
      Status s = b.seqs[i]->attend(layer, host_view(q[i].data(), {spec.num_q_heads, spec.head_dim}),
                                   host_view(one[i].data(), {spec.num_q_heads, spec.head_dim}),
                                   Stream::host());
      PQKV_ASSERT_OK(s);
      steps[i] = {b.seqs[i], host_view(q[i].data(), {spec.num_q_heads, spec.head_dim}),
                  host_view(batched[i].data(), {spec.num_q_heads, spec.head_dim})};
    }
    Status s = b.store->attend(layer, steps, Stream::host());
    PQKV_ASSERT_OK(s);
    for (size_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < qsize; ++j)
        ASSERT_NEAR(one[i][j], batched[i][j], rel_tol + rel_tol * std::fabs(one[i][j]))
            << "layer " << layer << ", sequence " << i << ", " << j;
    }
  }
}

TEST(BatchTest, BatchEqualsSequencesOneByOneCpu) {
  const uint64_t seed = 31;
  SCOPED_TRACE("seed 31, tiny geometry, lengths 400/300/200/97");
  const ModelSpec spec = ModelSpec::tiny();
  Batch b = make_batch(cpu_store_options(spec), {400, 300, 200, 97}, seed);
  expect_batch_equals_one_by_one(b, spec, seed, 0.0f);
}

// Store::select of a batch against each sequence's own attended positions
// (its trace), with a too-small max_selected refused first.
void expect_select_writes_what_attend_attends_to(const StoreOptions& so,
                                                 const std::vector<int64_t>& lengths,
                                                 uint64_t seed) {
  const ModelSpec& spec = so.spec;
  Batch b = make_batch(so, lengths, seed);
  const size_t n = b.seqs.size();
  const int kv = spec.num_kv_heads;
  const int layer = 1;
  int64_t max_selected = 0;
  for (Sequence* seq : b.seqs) {
    auto m = seq->max_selected(layer);
    PQKV_ASSERT_OK(m);
    max_selected = std::max(max_selected, *m);
  }
  std::vector<std::vector<float>> q(n);
  std::vector<SequenceStep> steps(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = random_floats(int64_t{spec.num_q_heads} * spec.head_dim, seed + i);
    steps[i].sequence = b.seqs[i];
    steps[i].queries = host_view(q[i].data(), {spec.num_q_heads, spec.head_dim});
  }
  // Too small: refused, naming the size needed.
  std::vector<int32_t> positions(n * kv * (max_selected + 3), 7);
  std::vector<int32_t> lengths(n * kv, 0);
  SelectOutput out{positions.data(), max_selected - 1, lengths.data(), Device::cpu()};
  Status s = b.store->select(layer, steps, out, Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find(std::to_string(max_selected)), std::string::npos) << s.to_string();

  out.max_selected = max_selected + 3;  // room to spare: padded with -1
  s = b.store->select(layer, steps, out, Stream::host());
  PQKV_ASSERT_OK(s);
  for (size_t i = 0; i < n; ++i) {
    std::vector<float> o(int64_t{spec.num_q_heads} * spec.head_dim);
    AttendTrace trace;
    s = b.seqs[i]->attend(layer, steps[i].queries,
                          host_view(o.data(), {spec.num_q_heads, spec.head_dim}), Stream::host(),
                          &trace);
    PQKV_ASSERT_OK(s);
    for (int h = 0; h < kv; ++h) {
      const int32_t len = lengths[i * kv + h];
      ASSERT_EQ(len, static_cast<int32_t>(trace.attended[h].size())) << "sequence " << i;
      EXPECT_EQ(len, *b.seqs[i]->max_selected(layer));
      const int32_t* row = positions.data() + (i * kv + h) * out.max_selected;
      std::vector<int64_t> got(row, row + len);
      std::vector<int64_t> want = trace.attended[h];
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      EXPECT_EQ(got, want) << "sequence " << i << ", KV head " << h;
      // The newest token is always attended.
      EXPECT_EQ(got.back(), b.seqs[i]->length(layer) - 1);
      for (int64_t j = len; j < out.max_selected; ++j)
        EXPECT_EQ(row[j], -1) << "padding at " << j;
    }
  }
}

TEST(BatchTest, SelectWritesWhatAttendAttendsTo) {
  SCOPED_TRACE("seed 47, tiny geometry, lengths 500/130/64");
  expect_select_writes_what_attend_attends_to(cpu_store_options(ModelSpec::tiny()), {500, 130, 64},
                                              47);
}

TEST(BatchTest, BadStepsRunNothing) {
  const ModelSpec spec = ModelSpec::tiny();
  Batch b = make_batch(cpu_store_options(spec), {100, 100}, 5);
  auto q = random_floats(int64_t{spec.num_q_heads} * spec.head_dim, 1);
  std::vector<float> o0(q.size(), 9.f), o1(q.size(), 9.f);
  const auto qv = host_view(q.data(), {spec.num_q_heads, spec.head_dim});
  std::vector<SequenceStep> steps = {
      {b.seqs[0], qv, host_view(o0.data(), {spec.num_q_heads, spec.head_dim})},
      {b.seqs[0], qv, host_view(o1.data(), {spec.num_q_heads, spec.head_dim})}};
  Status s = b.store->attend(0, steps, Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("twice"), std::string::npos) << s.to_string();
  steps[1].sequence = b.seqs[1];
  steps[1].out = host_view(o1.data(), {spec.num_q_heads, spec.head_dim + 1});
  s = b.store->attend(0, steps, Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("step 1"), std::string::npos) << s.to_string();
  EXPECT_EQ(o0[0], 9.f) << "a batch with a bad step runs none";
  // A sequence of another store.
  Batch other = make_batch(cpu_store_options(spec), {50}, 6);
  steps = {{other.seqs[0], qv, host_view(o0.data(), {spec.num_q_heads, spec.head_dim})}};
  s = b.store->attend(0, steps, Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(b.store->attend(5, {}, Stream::host()).code(), StatusCode::kOk);
}

// Memory follows the tokens: 8 sequences of 100 tokens in every layer of
// Llama-3.1-8B geometry hold 8 x 32 layers x 8 KV heads blocks of 128 rows x
// 512 B = 128 MiB, inside a 256 MiB budget. A call that passes the budget
// changes nothing and names the budget to raise.
TEST(StoreMemoryTest, EightShortLlamaSequencesFitIn256MiB) {
  const ModelSpec spec = *ModelSpec::preset("llama-3.1-8b");
  StoreOptions so = cpu_store_options(spec);
  so.dram_budget_bytes = int64_t{256} << 20;
  so.num_threads = 2;
  auto store = Store::open(so);
  PQKV_ASSERT_OK(store);
  const int64_t n = 100;
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  const auto k = random_floats(n * row, 1);
  for (int i = 0; i < 8; ++i) {
    auto seq = (*store)->create_sequence("s" + std::to_string(i), {});
    PQKV_ASSERT_OK(seq);
    for (int l = 0; l < spec.num_layers; ++l) {
      Status s = (*seq)->append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                Stream::host());
      ASSERT_TRUE(s.ok()) << "sequence " << i << ", layer " << l << ": " << s.to_string();
    }
  }
  const int64_t expected = int64_t{8} * spec.num_layers * spec.num_kv_heads * 128 * 512;
  EXPECT_EQ((*store)->dram_bytes_used(), expected);

  // A ninth, longer sequence runs into the budget part way through.
  const int64_t long_n = 2000;  // 16 blocks per KV head: 8 MiB per layer
  const auto lk = random_floats(long_n * row, 2);
  auto big = (*store)->create_sequence("big", {});
  PQKV_ASSERT_OK(big);
  Status hit;
  int layer = 0;
  for (; layer < spec.num_layers; ++layer) {
    hit = (*big)->append(layer, host_view(lk.data(), {long_n, spec.num_kv_heads, spec.head_dim}),
                         host_view(lk.data(), {long_n, spec.num_kv_heads, spec.head_dim}),
                         Stream::host());
    if (!hit.ok()) break;
  }
  ASSERT_LT(layer, spec.num_layers) << "the budget was never hit";
  EXPECT_EQ(hit.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(hit.message().find("dram_budget_bytes"), std::string::npos) << hit.to_string();
  EXPECT_EQ((*big)->length(layer), 0) << "the failing call appended nothing";
  EXPECT_LE((*store)->dram_bytes_used(), so.dram_budget_bytes);
  const int64_t used = (*store)->dram_bytes_used();
  EXPECT_EQ(
      (*big)
          ->append(layer, host_view(lk.data(), {long_n, spec.num_kv_heads, spec.head_dim}),
                   host_view(lk.data(), {long_n, spec.num_kv_heads, spec.head_dim}), Stream::host())
          .code(),
      StatusCode::kResourceExhausted);
  EXPECT_EQ((*store)->dram_bytes_used(), used);
  // Reserve refuses too, taking nothing.
  EXPECT_EQ((*big)->reserve(100000).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ((*store)->dram_bytes_used(), used);
}

TEST(StoreHandleTest, DropIsNotDestroy) {
  const ModelSpec spec = ModelSpec::tiny();
  auto store = std::move(Store::open(cpu_store_options(spec))).value();
  auto held = store->create_sequence("a", {});
  PQKV_ASSERT_OK(held);
  std::shared_ptr<Sequence> seq = *held;
  PQKV_ASSERT_OK(append_random(seq.get(), 10, 3));
  PQKV_ASSERT_OK(store->drop("a"));
  EXPECT_EQ(store->get_sequence("a").status().code(), StatusCode::kNotFound);
  // The handle still works, and the name is free again.
  EXPECT_EQ(seq->length(0), 10);
  Status s = append_random(seq.get(), 5, 4);
  PQKV_ASSERT_OK(s);
  EXPECT_EQ(seq->length(1), 15);
  PQKV_EXPECT_OK(store->create_sequence("a", {}));
  const int64_t used = store->dram_bytes_used();
  seq.reset();  // the last handle: the blocks go back to the store's arena
  EXPECT_EQ(store->dram_bytes_used(), used);
}

#if PQKV_HAVE_CUDA
// A CUDA store of 2 layers, 2 KV heads x group 4, head_dim 64, bf16 rows.
StoreOptions cuda_batch_options() {
  ModelSpec spec = ModelSpec::tiny();
  spec.num_kv_heads = 2;
  spec.num_q_heads = 8;
  spec.head_dim = 64;
  spec.dtype = DType::kBF16;
  StoreOptions so = cpu_store_options(spec);
  so.device = Device::cuda(0);
  return so;
}

TEST(BatchTest, BatchEqualsSequencesOneByOneCuda) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 71;
  SCOPED_TRACE("seed 71, 2 layers, 2 KV heads x group 4, head_dim 64, bf16 rows");
  const StoreOptions so = cuda_batch_options();
  const ModelSpec& spec = so.spec;
  Batch b = make_batch(so, {3000, 1700, 900, 300}, seed);
  expect_batch_equals_one_by_one(b, spec, seed, 1e-5f);
}

// More sequences than the Store's eight batch streams, host positions.
TEST(BatchTest, SelectWritesWhatAttendAttendsToCuda) {
  PQKV_SKIP_IF_NO_GPU();
  SCOPED_TRACE("seed 49, 9 sequences, 2 KV heads x group 4, head_dim 64, bf16 rows");
  const StoreOptions so = cuda_batch_options();
  expect_select_writes_what_attend_attends_to(so, {1500, 1300, 1100, 900, 700, 500, 300, 130, 64},
                                              49);
}

// Ten sequences, more than the Store's eight batch streams, with device
// queries and outputs on a caller's stream: equal to the sequences attended
// one by one. The same batch captured in a CUDA graph (the fork onto the
// batch streams and the join become graph edges) replays to the same outputs.
TEST(BatchTest, DeviceTensorsAndCapturedBatchCuda) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 73;
  SCOPED_TRACE("seed 73, 10 sequences, 2 KV heads x group 4, head_dim 64, bf16 rows");
  const StoreOptions so = cuda_batch_options();
  const ModelSpec& spec = so.spec;
  Batch b = make_batch(so, {2100, 1800, 1500, 1200, 1000, 800, 600, 400, 300, 97}, seed);
  const size_t n = b.seqs.size();
  const int64_t qsize = int64_t{spec.num_q_heads} * spec.head_dim;
  const size_t bytes = sizeof(float) * static_cast<size_t>(qsize);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  float* dq = nullptr;
  float* dout = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dq), n * bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dout), n * bytes), cudaSuccess);
  for (int layer = 0; layer < spec.num_layers; ++layer) {
    std::vector<SequenceStep> steps(n);
    std::vector<std::vector<float>> one(n);
    for (size_t i = 0; i < n; ++i) {
      const auto q = random_floats(qsize, seed + 1000 * layer + i);
      one[i].assign(qsize, 0);
      PQKV_ASSERT_OK(b.seqs[i]->attend(
          layer, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
          host_view(one[i].data(), {spec.num_q_heads, spec.head_dim}), Stream::host()));
      ASSERT_EQ(cudaMemcpy(dq + i * qsize, q.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
      steps[i] = {b.seqs[i],
                  TensorView(dq + i * qsize, DType::kF32, Device::cuda(0),
                             {spec.num_q_heads, spec.head_dim}),
                  TensorView(dout + i * qsize, DType::kF32, Device::cuda(0),
                             {spec.num_q_heads, spec.head_dim})};
    }
    PQKV_ASSERT_OK(b.store->attend(layer, steps, Stream::cuda(stream)));
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<float> direct(n * qsize);
    ASSERT_EQ(cudaMemcpy(direct.data(), dout, n * bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < qsize; ++j)
        ASSERT_NEAR(one[i][j], direct[i * qsize + j], 1e-5f + 1e-5f * std::fabs(one[i][j]))
            << "layer " << layer << ", sequence " << i << ", " << j;
    }
    ASSERT_EQ(cudaMemset(dout, 0, n * bytes), cudaSuccess);
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const Status s = b.store->attend(layer, steps, Stream::cuda(stream));
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    PQKV_ASSERT_OK(s);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<float> replayed(n * qsize);
    ASSERT_EQ(cudaMemcpy(replayed.data(), dout, n * bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(replayed, direct) << "layer " << layer;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaFree(dq);
  cudaFree(dout);
  cudaStreamDestroy(stream);
}
#endif

}  // namespace
}  // namespace pqkv::testing
