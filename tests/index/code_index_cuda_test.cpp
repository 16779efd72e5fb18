// The CUDA index with int8, int4 and exact keys against the CPU codecs: the
// scales fit on the GPU give the CPU codec's codes, and the GPU search picks
// a top-k of the CPU reference's aggregated scores (codec scan, per-head
// softmax, GQA aggregation), for odd sizes and GQA groups 1, 4 and 8, on
// tensor cores (head_dim 64 and 128) and one thread per token (other sizes).
// Every test skips without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cpu/pq_search_cpu.h"
#include "index/key_codec.h"
#include "index/layer_index.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

struct CodeCase {
  KeyCode code;
  int kv_heads;
  int group;
  int head_dim;
  int64_t tokens;
  int64_t k;
  GqaAggregation aggregation;
  bool bf16;  // keys and queries
  std::string to_string() const {
    return std::string(key_code_name(code)) + " kv_heads=" + std::to_string(kv_heads) +
           " group=" + std::to_string(group) + " head_dim=" + std::to_string(head_dim) +
           " tokens=" + std::to_string(tokens) + " k=" + std::to_string(k) +
           " aggregation=" + gqa_aggregation_name(aggregation) + (bf16 ? " bf16" : " fp32");
  }
};

std::vector<CodeCase> code_cases() {
  std::vector<CodeCase> cases;
  const KeyCode codes[] = {KeyCode::kInt8, KeyCode::kInt4, KeyCode::kExact};
  const int64_t sizes[] = {1, 17, 97, 4099};
  const int groups[] = {1, 4, 8};
  int i = 0;
  for (KeyCode code : codes) {
    for (int64_t n : sizes) {
      for (int group : groups) {
        const int64_t k = std::max<int64_t>(1, n / 50 + (n > 1 ? 3 : 0));
        const auto aggregation = i % 3 == 2 ? GqaAggregation::kMax : GqaAggregation::kSoftmaxSum;
        cases.push_back({code, 2, group, i % 4 == 1 ? 64 : 128, n, k, aggregation, i % 2 == 1});
        ++i;
      }
    }
  }
  // Llama-3.1-8B geometry at a 2% budget.
  cases.push_back({KeyCode::kInt4, 8, 4, 128, 4099, 82, GqaAggregation::kSoftmaxSum, true});
  // Long ranges: every block of the fused search keeps thousands of tokens'
  // scores (128K at a 5% top-k, the benchmarked shape).
  cases.push_back({KeyCode::kInt4, 8, 4, 128, 131072, 6554, GqaAggregation::kSoftmaxSum, true});
  cases.push_back({KeyCode::kInt8, 2, 8, 64, 150001, 3001, GqaAggregation::kMax, false});
  cases.push_back({KeyCode::kInt4, 2, 5, 64, 60013, 1201, GqaAggregation::kSoftmaxSum, false});
  // Head sizes the tensor-core scan does not take (one thread per token instead).
  cases.push_back({KeyCode::kInt4, 2, 4, 96, 4099, 82, GqaAggregation::kSoftmaxSum, false});
  cases.push_back({KeyCode::kInt8, 2, 8, 80, 1037, 21, GqaAggregation::kMax, true});
  return cases;
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

class CodeIndexCudaTest : public ::testing::TestWithParam<CodeCase> {
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
  cudaStream_t stream_ = nullptr;
};

TEST_P(CodeIndexCudaTest, CodesAndTopKMatchTheCpuCodec) {
  const CodeCase c = GetParam();
  const uint64_t seed =
      5100 + static_cast<uint64_t>(c.tokens) * 7 + c.group * 3 + static_cast<uint64_t>(c.code);
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  const int q_heads = c.kv_heads * c.group;
  const int d = c.head_dim;
  const int64_t n = c.tokens;
  // The scales are fit on all but the last few tokens, which then arrive one
  // at a time as decode tokens (encoded on the caller's stream).
  const int64_t n_train = std::max<int64_t>(1, n - 3);

  auto keys = clustered_keys(n, c.kv_heads, d, seed);
  auto queries = random_floats(static_cast<size_t>(q_heads) * d, seed + 1, 2.0f);
  std::vector<uint16_t> keys_bf16(keys.size());
  std::vector<uint16_t> queries_bf16(queries.size());
  if (c.bf16) {
    for (size_t i = 0; i < keys.size(); ++i) {
      keys_bf16[i] = float_to_bf16(keys[i]);
      keys[i] = bf16_to_float(keys_bf16[i]);
    }
    for (size_t i = 0; i < queries.size(); ++i) {
      queries_bf16[i] = float_to_bf16(queries[i]);
      queries[i] = bf16_to_float(queries_bf16[i]);
    }
  }

  // The CPU codec: fit on the same keys, codes of every token.
  auto codec = index::make_key_codec(c.code, d, c.kv_heads, PqConfig{});
  PQKV_ASSERT_OK(codec.status());
  auto train_host = index::cpu::HostKeys::from_view(
      host_view(keys.data(), {n_train, c.kv_heads, d}), c.kv_heads, d, "keys");
  PQKV_ASSERT_OK(train_host.status());
  PQKV_ASSERT_OK((*codec)->train(*train_host, PqConfig{}));
  auto all_host = index::cpu::HostKeys::from_view(host_view(keys.data(), {n, c.kv_heads, d}),
                                                  c.kv_heads, d, "keys");
  PQKV_ASSERT_OK(all_host.status());
  const int size = (*codec)->code_size();
  std::vector<std::vector<uint8_t>> want(static_cast<size_t>(c.kv_heads));
  for (int h = 0; h < c.kv_heads; ++h) {
    want[h].resize(static_cast<size_t>(n) * size);
    (*codec)->encode(*all_host, h, want[h].data());
  }

  // The GPU index: fit, a prefill-sized add, then decode-sized adds.
  SelectionConfig selection;
  selection.code = c.code;
  auto made = index::make_layer_index(Device::cuda(0), d, c.kv_heads, PqConfig{}, selection);
  PQKV_ASSERT_OK(made.status());
  index::LayerIndex& gpu = **made;
  EXPECT_EQ(gpu.code_bytes_per_token(), size);
  const DType dtype = c.bf16 ? DType::kBF16 : DType::kF32;
  auto keys_f = upload(keys, stream_);
  auto keys_h = upload(keys_bf16, stream_);
  const auto row_bytes = static_cast<int64_t>(c.kv_heads) * d * dtype_size(dtype);
  auto* base = c.bf16 ? static_cast<std::byte*>(static_cast<void*>(keys_h.get()))
                      : static_cast<std::byte*>(static_cast<void*>(keys_f.get()));
  auto rows = [&](int64_t begin, int64_t end) {
    return TensorView(base + begin * row_bytes, dtype, Device::cuda(0),
                      {end - begin, c.kv_heads, d});
  };
  const Stream stream = Stream::cuda(stream_);
  PQKV_ASSERT_OK(gpu.train(rows(0, n_train), PqConfig{}, stream));
  PQKV_ASSERT_OK(gpu.add(rows(0, n_train), stream));
  for (int64_t t = n_train; t < n; ++t)
    PQKV_ASSERT_OK(gpu.add(rows(t, t + 1), stream));
  ASSERT_EQ(gpu.num_tokens(), n);
  for (int h = 0; h < c.kv_heads; ++h) {
    std::vector<uint8_t> got(static_cast<size_t>(n) * size);
    PQKV_ASSERT_OK(gpu.copy_codes(h, 0, n, got.data()));
    ASSERT_EQ(got, want[h]) << "codes of KV head " << h;
  }

  // Search on the caller's stream, right after the adds: readiness orders it.
  auto q_f = upload(queries, stream_);
  auto q_h = upload(queries_bf16, stream_);
  const TensorView qview(c.bf16 ? static_cast<void*>(q_h.get()) : static_cast<void*>(q_f.get()),
                         dtype, Device::cuda(0), {q_heads, d});
  const int64_t begin = n > 2 ? 1 : 0;
  const int64_t kept = index::cpu::clamped_k(c.k, begin, n);
  auto out = gpu::DeviceArray<int32_t>::allocate(std::max<int64_t>(1, c.kv_heads * kept), stream_);
  PQKV_ASSERT_OK(out.status());
  // The whole device (the persistent search where it covers the range), a
  // quarter of its SMs, and none held (the six short kernels): the same picks.
  for (const float share : {1.0f, 0.25f, 0.0f}) {
    SCOPED_TRACE("sm_share " + std::to_string(share));
    index::SearchRequest request{qview, begin, n, c.k, c.aggregation};
    request.sm_share = share;
    PQKV_ASSERT_OK(gpu.search(request, out->get(), stream, nullptr));
    std::vector<int32_t> picked(static_cast<size_t>(c.kv_heads * kept));
    ASSERT_EQ(cudaMemcpyAsync(picked.data(), out->get(), picked.size() * sizeof(int32_t),
                              cudaMemcpyDeviceToHost, stream_),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);

    // The reference: the CPU codec's scan, softmax and aggregation.
    const int64_t count = n - begin;
    std::vector<float> probs(static_cast<size_t>(c.group) * count);
    std::vector<float> table;
    for (int kv = 0; kv < c.kv_heads; ++kv) {
      SCOPED_TRACE("KV head " + std::to_string(kv));
      for (int g = 0; g < c.group; ++g) {
        const int h = kv * c.group + g;
        (*codec)->prepare(kv, queries.data() + static_cast<size_t>(h) * d, &table);
        float* p = probs.data() + static_cast<size_t>(g) * count;
        (*codec)->scan(table.data(), want[kv].data(), begin, n, p);
        index::cpu::softmax_scores(p, count, d);
      }
      std::vector<float> ref(static_cast<size_t>(count));
      index::cpu::aggregate_group(probs.data(), c.group, count, c.aggregation, ref.data());
      const float top = *std::max_element(ref.begin(), ref.end());
      const Status s = index::cpu::verify_top_k(ref.data(), count, begin, kept,
                                                picked.data() + kv * kept, 2e-5f * top);
      EXPECT_TRUE(s.ok()) << s.to_string();
      EXPECT_TRUE(std::is_sorted(picked.begin() + kv * kept, picked.begin() + (kv + 1) * kept))
          << "positions are written in increasing order";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CodeIndexCudaTest, ::testing::ValuesIn(code_cases()));

// A search captured in a CUDA graph (int4 keys, Llama-3.1-8B's GQA shape)
// replays to the positions a direct search returns, query after query.
TEST_F(CodeIndexCudaTest, GraphReplayEqualsDirectSearch) {
  const int kv_heads = 8;
  const int q_heads = 32;
  const int d = 128;
  const int64_t n = 20000;
  const int64_t k = 400;
  const uint64_t seed = 91;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " int4 kv_heads=8 q_heads=32 head_dim=128");
  auto made = index::make_layer_index(Device::cuda(0), d, kv_heads, PqConfig{}, SelectionConfig{});
  PQKV_ASSERT_OK(made.status());
  index::LayerIndex& gpu = **made;
  ASSERT_EQ(gpu.selection().code, KeyCode::kInt4) << "int4 keys are the default";
  auto keys = upload(clustered_keys(n, kv_heads, d, seed), stream_);
  const TensorView view(keys.get(), DType::kF32, Device::cuda(0), {n, kv_heads, d});
  const Stream stream = Stream::cuda(stream_);
  PQKV_ASSERT_OK(gpu.train(view, PqConfig{}, stream));
  PQKV_ASSERT_OK(gpu.add(view, stream));
  PQKV_ASSERT_OK(gpu.wait_ready(stream));
  auto q = gpu::DeviceArray<float>::allocate(int64_t{q_heads} * d, stream_);
  auto graph_out = gpu::DeviceArray<int32_t>::allocate(kv_heads * k, stream_);
  auto direct_out = gpu::DeviceArray<int32_t>::allocate(kv_heads * k, stream_);
  PQKV_ASSERT_OK(q.status());
  PQKV_ASSERT_OK(graph_out.status());
  PQKV_ASSERT_OK(direct_out.status());
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const TensorView qview(q->get(), DType::kF32, Device::cuda(0), {q_heads, d});
  const index::SearchRequest request{qview, 32, n, k, GqaAggregation::kSoftmaxSum};

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  const Status captured = gpu.search(request, graph_out->get(), stream, nullptr);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  PQKV_ASSERT_OK(captured);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  std::vector<int32_t> from_graph(static_cast<size_t>(kv_heads * k));
  std::vector<int32_t> direct(from_graph.size());
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("replay " + std::to_string(step));
    const auto host_q = random_floats(size_t(q_heads) * d, seed + 10 + step, 2.0f);
    ASSERT_EQ(cudaMemcpyAsync(q->get(), host_q.data(), host_q.size() * 4, cudaMemcpyHostToDevice,
                              stream_),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(from_graph.data(), graph_out->get(), from_graph.size() * 4,
                              cudaMemcpyDeviceToHost, stream_),
              cudaSuccess);
    PQKV_ASSERT_OK(gpu.search(request, direct_out->get(), stream, nullptr));
    ASSERT_EQ(cudaMemcpyAsync(direct.data(), direct_out->get(), direct.size() * 4,
                              cudaMemcpyDeviceToHost, stream_),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_EQ(from_graph, direct);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// A search with device-side counts (as a replayed decode step issues it,
// launches sized for a larger range) returns the positions of a search with
// the same counts given on the host, laid out [kv_heads][device k].
TEST_F(CodeIndexCudaTest, DeviceRangeEqualsHostRange) {
  const int kv_heads = 8;
  const int q_heads = 32;
  const int d = 128;
  const int64_t n = 40000;
  const uint64_t seed = 97;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " int4 kv_heads=8 q_heads=32 head_dim=128");
  auto made = index::make_layer_index(Device::cuda(0), d, kv_heads, PqConfig{}, SelectionConfig{});
  PQKV_ASSERT_OK(made.status());
  index::LayerIndex& gpu = **made;
  auto keys = upload(clustered_keys(n, kv_heads, d, seed), stream_);
  const TensorView view(keys.get(), DType::kF32, Device::cuda(0), {n, kv_heads, d});
  const Stream stream = Stream::cuda(stream_);
  PQKV_ASSERT_OK(gpu.train(view, PqConfig{}, stream));
  PQKV_ASSERT_OK(gpu.add(view, stream));
  auto q = upload(random_floats(size_t(q_heads) * d, seed + 1, 2.0f), stream_);
  const TensorView qview(q.get(), DType::kF32, Device::cuda(0), {q_heads, d});
  for (const index::DeviceSearchRange r :
       {index::DeviceSearchRange{7, 31001, 620}, index::DeviceSearchRange{0, 40000, 2000},
        index::DeviceSearchRange{100, 117, 20}}) {
    SCOPED_TRACE("range [" + std::to_string(r.begin) + ", " + std::to_string(r.end) + ") k " +
                 std::to_string(r.k));
    const int64_t kept = std::min(r.k, r.end - r.begin);
    auto range = upload(std::vector<index::DeviceSearchRange>{r}, stream_);
    auto host_out = gpu::DeviceArray<int32_t>::allocate(kv_heads * kept, stream_);
    auto device_out = gpu::DeviceArray<int32_t>::allocate(kv_heads * 2000, stream_);
    PQKV_ASSERT_OK(host_out.status());
    PQKV_ASSERT_OK(device_out.status());
    PQKV_ASSERT_OK(gpu.search({qview, r.begin, r.end, r.k, GqaAggregation::kSoftmaxSum},
                              host_out->get(), stream, nullptr));
    index::SearchRequest sized{qview, 0, n, 2000, GqaAggregation::kSoftmaxSum};
    sized.device_range = range.get();
    PQKV_ASSERT_OK(gpu.search(sized, device_out->get(), stream, nullptr));
    std::vector<int32_t> want(static_cast<size_t>(kv_heads * kept));
    std::vector<int32_t> got(want.size());
    ASSERT_EQ(cudaMemcpyAsync(want.data(), host_out->get(), want.size() * 4, cudaMemcpyDeviceToHost,
                              stream_),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(got.data(), device_out->get(), got.size() * 4, cudaMemcpyDeviceToHost,
                              stream_),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_EQ(got, want);
  }
}

// Every token with the same key: all scores tie, and the search keeps the
// lowest positions, whether the tied bucket fits the fused search's list of
// candidates (5000 tokens) or overflows it (40000) or the group has no room
// for one (one query head per KV head).
TEST_F(CodeIndexCudaTest, TiedScoresKeepTheLowestPositions) {
  const int kv_heads = 2;
  const int d = 128;
  for (const int64_t n : {int64_t{5000}, int64_t{40000}}) {
    for (const int group : {1, 4}) {
      const uint64_t seed = 131 + static_cast<uint64_t>(n) + group;
      SCOPED_TRACE("seed=" + std::to_string(seed) + " n=" + std::to_string(n) +
                   " group=" + std::to_string(group));
      const int q_heads = kv_heads * group;
      const auto one = random_floats(size_t(kv_heads) * d, seed, 1.0f);
      std::vector<float> keys(static_cast<size_t>(n) * kv_heads * d);
      for (int64_t t = 0; t < n; ++t)
        std::copy(one.begin(), one.end(), keys.begin() + t * kv_heads * d);
      auto made =
          index::make_layer_index(Device::cuda(0), d, kv_heads, PqConfig{}, SelectionConfig{});
      PQKV_ASSERT_OK(made.status());
      index::LayerIndex& gpu = **made;
      auto dev_keys = upload(keys, stream_);
      const TensorView view(dev_keys.get(), DType::kF32, Device::cuda(0), {n, kv_heads, d});
      const Stream stream = Stream::cuda(stream_);
      PQKV_ASSERT_OK(gpu.train(view, PqConfig{}, stream));
      PQKV_ASSERT_OK(gpu.add(view, stream));
      auto q = upload(random_floats(size_t(q_heads) * d, seed + 1, 2.0f), stream_);
      const TensorView qview(q.get(), DType::kF32, Device::cuda(0), {q_heads, d});
      const int64_t begin = 3;
      const int64_t k = n / 20;
      auto out = gpu::DeviceArray<int32_t>::allocate(kv_heads * k, stream_);
      PQKV_ASSERT_OK(out.status());
      PQKV_ASSERT_OK(gpu.search({qview, begin, n, k, GqaAggregation::kSoftmaxSum}, out->get(),
                                stream, nullptr));
      std::vector<int32_t> got(static_cast<size_t>(kv_heads * k));
      ASSERT_EQ(
          cudaMemcpyAsync(got.data(), out->get(), got.size() * 4, cudaMemcpyDeviceToHost, stream_),
          cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      std::vector<int32_t> want(got.size());
      for (int h = 0; h < kv_heads; ++h) {
        for (int64_t i = 0; i < k; ++i)
          want[h * k + i] = static_cast<int32_t>(begin + i);
      }
      EXPECT_EQ(got, want);
    }
  }
}

// PQ-only calls answer FailedPrecondition; exact keys need no training.
TEST(CodeIndexCudaCallsTest, PqCallsAnswerForScalarCodes) {
  PQKV_SKIP_IF_NO_GPU();
  SelectionConfig int4;
  int4.code = KeyCode::kInt4;
  auto made = index::make_layer_index(Device::cuda(0), 64, 2, PqConfig{}, int4);
  PQKV_ASSERT_OK(made.status());
  EXPECT_FALSE((*made)->trained());
  EXPECT_EQ((*made)->codebook().status().code(), StatusCode::kFailedPrecondition);
  index::LayerCodebook book;
  EXPECT_EQ((*made)->set_codebook(book, Stream::cuda(nullptr)).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ((*made)->code_bytes_per_token(), 32);
  auto oracle =
      index::make_layer_index(Device::cuda(0), 64, 2, PqConfig{}, SelectionConfig::oracle());
  PQKV_ASSERT_OK(oracle.status());
  EXPECT_TRUE((*oracle)->trained());
  EXPECT_EQ((*oracle)->code_bytes_per_token(), 256);
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
