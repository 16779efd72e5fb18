// Two-stage selection on the CUDA index against the CPU index: the same
// codecs and codes (the CPU index's, restored on the GPU from its snapshot,
// or fit on the GPU where the fits agree: int8 and int4 scales) give the same
// picks, for odd token counts, K near the candidate count and C x K past the
// searched range, GQA groups 1 to 8, both aggregations, every pair of codes;
// directly, under graph capture and with device-side counts. Every test
// skips without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cpu/pq_search_cpu.h"
#include "index/layer_index.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

struct TwoStageCase {
  const char* selection;
  int kv_heads;
  int group;
  int head_dim;
  int64_t tokens;
  int64_t k;
  GqaAggregation aggregation;
  std::string to_string() const {
    return std::string(selection) + " kv_heads=" + std::to_string(kv_heads) +
           " group=" + std::to_string(group) + " head_dim=" + std::to_string(head_dim) +
           " tokens=" + std::to_string(tokens) + " k=" + std::to_string(k) +
           " aggregation=" + gqa_aggregation_name(aggregation);
  }
};

std::vector<TwoStageCase> two_stage_cases() {
  const auto sum = GqaAggregation::kSoftmaxSum;
  const auto max = GqaAggregation::kMax;
  return {
      {"pq+int4:4", 2, 4, 64, 1037, 21, sum},
      {"pq+int8:4", 8, 4, 128, 4099, 300, sum},
      {"int4+int8:2", 2, 8, 128, 4099, 82, max},
      {"int4+int8:2", 8, 4, 128, 33001, 330, sum},  // Llama-3.1-8B's GQA shape, 1%
      {"int8+int4:3", 2, 1, 64, 97, 30, sum},       // C x K = 90 of 96 searched tokens
      {"int4+int8:4", 2, 5, 128, 97, 40, max},      // C x K past the range: all are candidates
      {"int4+pq:2", 2, 4, 64, 1037, 50, sum},       // a PQ rerank
      {"int4+exact:4", 2, 4, 64, 517, 9, sum},
      {"exact+int4:2", 1, 2, 64, 300, 150, sum},  // K = half the candidates' pool
      {"int4+int8:2", 2, 4, 64, 1, 1, sum},       // one token
  };
}

SelectionConfig parse_selection(const char* text) {
  auto parsed = SelectionConfig::parse(text);
  EXPECT_TRUE(parsed.ok()) << parsed.status().to_string();
  return parsed.ok() ? *parsed : SelectionConfig{};
}

// PQ shaped for the GPU kernels: sub-spaces of 8 dims, 64 centroids.
PqConfig pq_for(int head_dim) {
  return small_config(head_dim / 8, 6);
}

template <class T>
gpu::DeviceArray<T> upload(const std::vector<T>& host, cudaStream_t s) {
  auto made = gpu::DeviceArray<T>::allocate(std::max<int64_t>(1, int64_t(host.size())), s);
  EXPECT_TRUE(made.ok()) << made.status().to_string();
  EXPECT_EQ(
      cudaMemcpyAsync(made->get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, s),
      cudaSuccess);
  return std::move(made).value();
}

template <class T>
std::vector<T> download(const T* device, size_t n, cudaStream_t s) {
  std::vector<T> host(n);
  EXPECT_EQ(cudaMemcpyAsync(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, s),
            cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  return host;
}

// Each KV head's row of `kept` positions, sorted: the selected sets.
std::vector<int32_t> sorted_rows(std::vector<int32_t> picks, int kv_heads, int64_t kept) {
  for (int h = 0; h < kv_heads; ++h)
    std::sort(picks.begin() + h * kept, picks.begin() + (h + 1) * kept);
  return picks;
}

class TwoStageCudaTest : public ::testing::TestWithParam<TwoStageCase> {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      cudaStreamDestroy(stream_);
    }
  }

  // A CPU index of `c`, fit on all but the last three keys, holding all n.
  std::unique_ptr<index::LayerIndex> cpu_index(const TwoStageCase& c,
                                               const std::vector<float>& keys) {
    const int64_t n_train = std::max<int64_t>(1, c.tokens - 3);
    auto made = index::make_layer_index(Device::cpu(), c.head_dim, c.kv_heads, pq_for(c.head_dim),
                                        parse_selection(c.selection));
    EXPECT_TRUE(made.ok()) << made.status().to_string();
    auto idx = std::move(made).value();
    PQKV_EXPECT_OK(idx->train(host_view(keys.data(), {n_train, c.kv_heads, c.head_dim}),
                              pq_for(c.head_dim), Stream::host()));
    PQKV_EXPECT_OK(
        idx->add(host_view(keys.data(), {c.tokens, c.kv_heads, c.head_dim}), Stream::host()));
    return idx;
  }

  std::unique_ptr<index::LayerIndex> gpu_index(const TwoStageCase& c) {
    auto made = index::make_layer_index(Device::cuda(0), c.head_dim, c.kv_heads, pq_for(c.head_dim),
                                        parse_selection(c.selection));
    EXPECT_TRUE(made.ok()) << made.status().to_string();
    return made.ok() ? std::move(made).value() : nullptr;
  }

  std::vector<int32_t> cpu_search(index::LayerIndex& idx, const std::vector<float>& queries,
                                  const TwoStageCase& c, int64_t begin) {
    const int q_heads = c.kv_heads * c.group;
    const int64_t kept = index::cpu::clamped_k(c.k, begin, c.tokens);
    std::vector<int32_t> out(static_cast<size_t>(c.kv_heads * kept));
    const index::SearchRequest request{host_view(queries.data(), {q_heads, c.head_dim}), begin,
                                       c.tokens, c.k, c.aggregation};
    PQKV_EXPECT_OK(idx.search(request, out.data(), Stream::host(), nullptr));
    return sorted_rows(std::move(out), c.kv_heads, kept);
  }

  // sm_share 1 runs the first stage in the persistent kernel where it covers
  // the shape, 0 in the multi-kernel search.
  std::vector<int32_t> gpu_search(index::LayerIndex& idx, const float* queries,
                                  const TwoStageCase& c, int64_t begin, float sm_share = 1.0f) {
    const int q_heads = c.kv_heads * c.group;
    const int64_t kept = index::cpu::clamped_k(c.k, begin, c.tokens);
    auto out =
        gpu::DeviceArray<int32_t>::allocate(std::max<int64_t>(1, c.kv_heads * kept), stream_);
    EXPECT_TRUE(out.ok()) << out.status().to_string();
    const TensorView q(const_cast<float*>(queries), DType::kF32, Device::cuda(0),
                       {q_heads, c.head_dim});
    index::SearchRequest request{q, begin, c.tokens, c.k, c.aggregation};
    request.sm_share = sm_share;
    PQKV_EXPECT_OK(idx.search(request, out->get(), Stream::cuda(stream_), nullptr));
    auto picks = download(out->get(), static_cast<size_t>(c.kv_heads * kept), stream_);
    for (size_t i = 0; i + 1 < picks.size(); ++i) {
      if ((i + 1) % kept == 0) continue;
      EXPECT_LT(picks[i], picks[i + 1]) << "each row is written in increasing position";
    }
    return sorted_rows(std::move(picks), c.kv_heads, kept);
  }

  cudaStream_t stream_ = nullptr;
};

// The CPU index's codecs and codes restored on the GPU: the same picks.
TEST_P(TwoStageCudaTest, RestoredCpuIndexPicksTheSame) {
  const TwoStageCase c = GetParam();
  const uint64_t seed = 7300 + static_cast<uint64_t>(c.tokens) * 5 + c.group;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  const auto keys = clustered_keys(c.tokens, c.kv_heads, c.head_dim, seed);
  const auto queries =
      random_floats(static_cast<size_t>(c.kv_heads * c.group) * c.head_dim, seed + 1, 2.0f);
  auto cpu = cpu_index(c, keys);
  auto snap = cpu->snapshot();
  PQKV_ASSERT_OK(snap.status());
  ASSERT_EQ(snap->stages.size(), 2u);
  auto gpu = gpu_index(c);
  ASSERT_NE(gpu, nullptr);
  EXPECT_EQ(gpu->code_bytes_per_token(), cpu->code_bytes_per_token());
  PQKV_ASSERT_OK(gpu->restore(*snap, Stream::cuda(stream_)));
  ASSERT_EQ(gpu->num_tokens(), c.tokens);
  auto q = upload(queries, stream_);
  for (const int64_t begin : {int64_t{0}, c.tokens > 2 ? int64_t{1} : int64_t{0}}) {
    for (const float share : {1.0f, 0.0f}) {
      SCOPED_TRACE("begin " + std::to_string(begin) + " sm_share " + std::to_string(share));
      EXPECT_EQ(gpu_search(*gpu, q.get(), c, begin, share), cpu_search(*cpu, queries, c, begin));
    }
  }
  // Saved again from the GPU: the same stages, codes and codec states.
  auto again = gpu->snapshot();
  PQKV_ASSERT_OK(again.status());
  ASSERT_EQ(again->stages.size(), 2u);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(again->stages[s].code, snap->stages[s].code);
    EXPECT_EQ(again->stages[s].codec_state, snap->stages[s].codec_state) << "stage " << s;
    EXPECT_EQ(again->stages[s].codes, snap->stages[s].codes) << "stage " << s;
  }
}

// Fit and encoded on the GPU (scalar codes, whose fit the GPU shares with the
// CPU codecs), decode-sized adds last: the CPU index's codes and picks.
TEST_P(TwoStageCudaTest, FitOnTheGpuPicksTheSame) {
  const TwoStageCase c = GetParam();
  const SelectionConfig selection = parse_selection(c.selection);
  if (selection.code == KeyCode::kPq || selection.rerank == KeyCode::kPq) {
    GTEST_SKIP() << "PQ k-means on the GPU draws other centroids than Faiss's; the restored "
                    "case covers PQ stages";
  }
  const uint64_t seed = 7700 + static_cast<uint64_t>(c.tokens) * 5 + c.group;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  const auto keys = clustered_keys(c.tokens, c.kv_heads, c.head_dim, seed);
  const auto queries =
      random_floats(static_cast<size_t>(c.kv_heads * c.group) * c.head_dim, seed + 1, 2.0f);
  auto cpu = cpu_index(c, keys);
  auto gpu = gpu_index(c);
  ASSERT_NE(gpu, nullptr);
  auto dev_keys = upload(keys, stream_);
  const int64_t n_train = std::max<int64_t>(1, c.tokens - 3);
  const int64_t row = int64_t{c.kv_heads} * c.head_dim;
  auto rows = [&](int64_t begin, int64_t end) {
    return TensorView(dev_keys.get() + begin * row, DType::kF32, Device::cuda(0),
                      {end - begin, c.kv_heads, c.head_dim});
  };
  const Stream stream = Stream::cuda(stream_);
  PQKV_ASSERT_OK(gpu->train(rows(0, n_train), PqConfig{}, stream));
  PQKV_ASSERT_OK(gpu->add(rows(0, n_train), stream));
  for (int64_t t = n_train; t < c.tokens; ++t)
    PQKV_ASSERT_OK(gpu->add(rows(t, t + 1), stream));
  EXPECT_TRUE(gpu->trained());
  auto want = cpu->snapshot();
  auto got = gpu->snapshot();
  PQKV_ASSERT_OK(want.status());
  PQKV_ASSERT_OK(got.status());
  ASSERT_EQ(got->stages.size(), 2u);
  for (size_t s = 0; s < 2; ++s)
    EXPECT_EQ(got->stages[s].codes, want->stages[s].codes) << "codes of stage " << s;
  auto q = upload(queries, stream_);
  const int64_t begin = c.tokens > 2 ? 1 : 0;
  EXPECT_EQ(gpu_search(*gpu, q.get(), c, begin), cpu_search(*cpu, queries, c, begin));
}

INSTANTIATE_TEST_SUITE_P(Cases, TwoStageCudaTest, ::testing::ValuesIn(two_stage_cases()));

// One two-stage search captured in a CUDA graph, and one with device-side
// counts (launches sized for the whole index): replays give the direct
// search's picks, query after query and range after range.
TEST_F(TwoStageCudaTest, GraphReplayAndDeviceRangeEqualDirectSearch) {
  const TwoStageCase c{"pq+int4:4", 8, 4, 128, 20011, 200, GqaAggregation::kSoftmaxSum};
  const uint64_t seed = 8101;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  const auto keys = clustered_keys(c.tokens, c.kv_heads, c.head_dim, seed);
  auto cpu = cpu_index(c, keys);
  auto snap = cpu->snapshot();
  PQKV_ASSERT_OK(snap.status());
  auto gpu = gpu_index(c);
  ASSERT_NE(gpu, nullptr);
  PQKV_ASSERT_OK(gpu->restore(*snap, Stream::cuda(stream_)));
  const int q_heads = c.kv_heads * c.group;
  auto q = gpu::DeviceArray<float>::allocate(int64_t{q_heads} * c.head_dim, stream_);
  PQKV_ASSERT_OK(q.status());
  const TensorView qview(q->get(), DType::kF32, Device::cuda(0), {q_heads, c.head_dim});
  const int64_t max_k = 400;
  auto range = gpu::DeviceArray<index::DeviceSearchRange>::allocate(1, stream_);
  auto graph_out = gpu::DeviceArray<int32_t>::allocate(c.kv_heads * c.k, stream_);
  auto ranged_out = gpu::DeviceArray<int32_t>::allocate(c.kv_heads * max_k, stream_);
  auto direct_out = gpu::DeviceArray<int32_t>::allocate(c.kv_heads * max_k, stream_);
  PQKV_ASSERT_OK(range.status());
  PQKV_ASSERT_OK(graph_out.status());
  PQKV_ASSERT_OK(ranged_out.status());
  PQKV_ASSERT_OK(direct_out.status());
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const Stream stream = Stream::cuda(stream_);

  // Captured: a fixed range; the ranged graph reads its counts at replay.
  const index::SearchRequest fixed{qview, 32, c.tokens, c.k, c.aggregation};
  index::SearchRequest sized{qview, 0, c.tokens, max_k, c.aggregation};
  sized.device_range = range->get();
  cudaGraph_t graph = nullptr;
  cudaGraph_t ranged_graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  const Status captured = gpu->search(fixed, graph_out->get(), stream, nullptr);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  PQKV_ASSERT_OK(captured);
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  const Status captured_ranged = gpu->search(sized, ranged_out->get(), stream, nullptr);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &ranged_graph), cudaSuccess);
  PQKV_ASSERT_OK(captured_ranged);
  cudaGraphExec_t exec = nullptr;
  cudaGraphExec_t ranged_exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&ranged_exec, ranged_graph, 0), cudaSuccess);

  const index::DeviceSearchRange ranges[] = {
      {7, 15001, 150}, {0, 20011, 400}, {100, 117, 20}, {5, 5, 10}, {300, 1000, 0}};
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE("replay " + std::to_string(step));
    const auto host_q = random_floats(size_t(q_heads) * c.head_dim, seed + 10 + step, 2.0f);
    ASSERT_EQ(cudaMemcpyAsync(q->get(), host_q.data(), host_q.size() * 4, cudaMemcpyHostToDevice,
                              stream_),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    const auto from_graph = download(graph_out->get(), size_t(c.kv_heads * c.k), stream_);
    PQKV_ASSERT_OK(gpu->search(fixed, direct_out->get(), stream, nullptr));
    EXPECT_EQ(from_graph, download(direct_out->get(), size_t(c.kv_heads * c.k), stream_));
    // The CPU index on the same query.
    auto want = cpu_search(*cpu, host_q, c, 32);
    EXPECT_EQ(sorted_rows(from_graph, c.kv_heads, c.k), want);

    const index::DeviceSearchRange r = ranges[step];
    SCOPED_TRACE("range [" + std::to_string(r.begin) + ", " + std::to_string(r.end) + ") k " +
                 std::to_string(r.k));
    const int64_t kept = std::clamp<int64_t>(r.k, 0, std::max<int64_t>(0, r.end - r.begin));
    ASSERT_EQ(cudaMemcpyAsync(range->get(), &r, sizeof(r), cudaMemcpyHostToDevice, stream_),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(ranged_exec, stream_), cudaSuccess);
    const auto ranged = download(ranged_out->get(), size_t(c.kv_heads * kept), stream_);
    if (kept == 0) continue;
    PQKV_ASSERT_OK(gpu->search({qview, r.begin, r.end, r.k, c.aggregation}, direct_out->get(),
                               stream, nullptr));
    EXPECT_EQ(ranged, download(direct_out->get(), size_t(c.kv_heads * kept), stream_));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaGraphExecDestroy(ranged_exec);
  cudaGraphDestroy(ranged_graph);
}

// A refit on the device refits both codes and swaps them in together: the
// picks then equal a CPU index fit on every key.
TEST_F(TwoStageCudaTest, RefitOnDeviceRefitsBothStages) {
  const TwoStageCase c{"int4+int8:2", 2, 4, 128, 3001, 60, GqaAggregation::kSoftmaxSum};
  const uint64_t seed = 8203;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  auto keys = clustered_keys(c.tokens, c.kv_heads, c.head_dim, seed);
  // The last thousand keys drift: shifted, so the first fit's scales clip them.
  const int64_t row = int64_t{c.kv_heads} * c.head_dim;
  for (int64_t i = 2001 * row; i < c.tokens * row; ++i)
    keys[i] = keys[i] * 3.0f + 4.0f;
  auto gpu = gpu_index(c);
  ASSERT_NE(gpu, nullptr);
  auto dev_keys = upload(keys, stream_);
  const Stream stream = Stream::cuda(stream_);
  const TensorView all(dev_keys.get(), DType::kF32, Device::cuda(0),
                       {c.tokens, c.kv_heads, c.head_dim});
  const TensorView first(dev_keys.get(), DType::kF32, Device::cuda(0),
                         {2001, c.kv_heads, c.head_dim});
  PQKV_ASSERT_OK(gpu->train(first, PqConfig{}, stream));
  PQKV_ASSERT_OK(gpu->add(all, stream));
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  EXPECT_TRUE(gpu->drift_stats().tracking);
  PQKV_ASSERT_OK(gpu->refit_on_device(all, 0, PqConfig{}, stream));
  EXPECT_TRUE(gpu->drift_stats().refit_running);
  EXPECT_EQ(gpu->refit_on_device(all, 0, PqConfig{}, stream).code(),
            StatusCode::kFailedPrecondition)
      << "one refit at a time";
  PQKV_ASSERT_OK(gpu->wait_ready(gpu->background_stream()));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // The CPU index fit on every key.
  auto made = index::make_layer_index(Device::cpu(), c.head_dim, c.kv_heads, PqConfig{},
                                      parse_selection(c.selection));
  PQKV_ASSERT_OK(made.status());
  auto cpu = std::move(made).value();
  PQKV_ASSERT_OK(cpu->train(host_view(keys.data(), {c.tokens, c.kv_heads, c.head_dim}), PqConfig{},
                            Stream::host()));
  PQKV_ASSERT_OK(
      cpu->add(host_view(keys.data(), {c.tokens, c.kv_heads, c.head_dim}), Stream::host()));
  const auto queries =
      random_floats(static_cast<size_t>(c.kv_heads * c.group) * c.head_dim, seed + 1, 2.0f);
  auto q = upload(queries, stream_);
  // The search swaps the refit in first.
  const auto picked = gpu_search(*gpu, q.get(), c, 0);
  const DriftStats drift = gpu->drift_stats();
  EXPECT_EQ(drift.refits, 1);
  EXPECT_FALSE(drift.refit_running);
  EXPECT_TRUE(drift.last_refit_error.empty()) << drift.last_refit_error;
  auto want = cpu->snapshot();
  auto got = gpu->snapshot();
  PQKV_ASSERT_OK(want.status());
  PQKV_ASSERT_OK(got.status());
  for (size_t s = 0; s < 2; ++s)
    EXPECT_EQ(got->stages[s].codes, want->stages[s].codes) << "codes of stage " << s;
  EXPECT_EQ(picked, cpu_search(*cpu, queries, c, 0));
}

// Calls that name one code: set_codebook is refused as on the CPU index, the
// PQ stage answers codebook(), and copy_codes copies the first stage's codes.
TEST(TwoStageCudaCallsTest, CallsOfOneCode) {
  PQKV_SKIP_IF_NO_GPU();
  auto made =
      index::make_layer_index(Device::cuda(0), 64, 2, pq_for(64), parse_selection("int4+pq:2"));
  PQKV_ASSERT_OK(made.status());
  index::LayerIndex& idx = **made;
  EXPECT_EQ(idx.selection().to_string(), "int4+pq:2");
  EXPECT_EQ(idx.code_bytes_per_token(), 32 + 8);
  EXPECT_EQ(idx.shape().m, 8) << "the PQ stage's shape";
  EXPECT_FALSE(idx.trained());
  index::LayerCodebook book;
  EXPECT_EQ(idx.set_codebook(book, Stream::cuda(nullptr)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx.codebook().status().code(), StatusCode::kFailedPrecondition)
      << "no codebook before training";
  auto oracle_first =
      index::make_layer_index(Device::cuda(0), 64, 2, PqConfig{}, parse_selection("exact+int4:2"));
  PQKV_ASSERT_OK(oracle_first.status());
  EXPECT_FALSE((*oracle_first)->trained()) << "the int4 rerank needs its scales";
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
