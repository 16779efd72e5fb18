// Drift tracking and refits of the CUDA index, mirroring drift_cpu_test.cpp:
// the error ratio measured on the GPU (against the CPU index's), a refit that
// raises recall on drifted keys, and searches and adds that neither wait for
// a refit nor see a half-built one. Every test skips without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/cuda_handles.h"
#include "device_gate.h"
#include "index/cuda/layer_index_cuda.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::LayerIndex;
using index::SearchRequest;

constexpr int kKvHeads = 2;
constexpr int kHeadDim = 64;
constexpr int kQHeads = 4;
constexpr int64_t kRow = int64_t{kKvHeads} * kHeadDim;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

struct CodeCase {
  const char* name;
  SelectionConfig selection;
  double in_distribution_max;  // as drift_cpu_test.cpp
  double cpu_tolerance;        // relative difference allowed from the CPU index's ratios
  // Recall a refit must add on drifted keys: int8 keeps most of the
  // ranking even with clipped keys, so it must only not lose any.
  double recall_gain;
};

std::vector<CodeCase> code_cases() {
  SelectionConfig int8;
  int8.code = KeyCode::kInt8;
  // Scalar fits are the same min and max on both backends; PQ's k-means
  // differ (Faiss on the CPU, the GPU's own), so only the ratio's size agrees.
  return {{"int4", SelectionConfig{}, 1.3, 0.02, 0.15},
          {"int8", int8, 1.3, 0.02, 0.0},
          {"pq", SelectionConfig::pq(), 1.6, 0.25, 0.15}};
}

SelectionConfig int8_selection() {
  SelectionConfig s;
  s.code = KeyCode::kInt8;
  return s;
}

// Keys moved away from the fit's: scaled by 2 and offset by 3 in every dim.
std::vector<float> drifted(std::vector<float> keys) {
  for (float& v : keys)
    v = 2.0f * v + 3.0f;
  return keys;
}

// Tokens [0, split) of `a`, then [split, n) of `b`.
std::vector<float> spliced(const std::vector<float>& a, const std::vector<float>& b,
                           int64_t split) {
  std::vector<float> out = b;
  std::copy(a.begin(), a.begin() + split * kRow, out.begin());
  return out;
}

// The fraction of `reference`'s positions that `got` holds, per KV head, averaged.
double recall(const std::vector<int32_t>& got, const std::vector<int32_t>& reference, int64_t k) {
  double sum = 0;
  for (int h = 0; h < kKvHeads; ++h) {
    std::set<int32_t> want(reference.begin() + h * k, reference.begin() + (h + 1) * k);
    int64_t hits = 0;
    for (int64_t i = 0; i < k; ++i)
      hits += want.count(got[h * k + i]);
    sum += static_cast<double>(hits) / static_cast<double>(k);
  }
  return sum / kKvHeads;
}

// A stream, device copies of host keys that live as long as the test, and
// the CUDA index's calls in host terms.
class DriftCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    ASSERT_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ == nullptr) return;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    buffers_.clear();
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaStreamDestroy(stream_);
  }

  std::unique_ptr<LayerIndex> make_cuda(const SelectionConfig& selection) {
    auto made =
        index::make_layer_index(Device::cuda(0), kHeadDim, kKvHeads, small_config(8, 6), selection);
    PQKV_EXPECT_OK(made);
    return made.ok() ? std::move(made).value() : nullptr;
  }
  static std::unique_ptr<LayerIndex> make_cpu(const SelectionConfig& selection) {
    auto made =
        index::make_layer_index(Device::cpu(), kHeadDim, kKvHeads, small_config(8, 6), selection);
    PQKV_EXPECT_OK(made);
    return std::move(made).value();
  }

  // Tokens [begin, begin + n) of `keys` in device memory (fp32).
  TensorView on_device(const std::vector<float>& keys, int64_t begin, int64_t n) {
    auto made = gpu::DeviceArray<float>::allocate(std::max<int64_t>(1, n * kRow), stream_);
    PQKV_EXPECT_OK(made);
    float* p = made->get();
    EXPECT_EQ(cudaMemcpyAsync(p, keys.data() + begin * kRow, sizeof(float) * n * kRow,
                              cudaMemcpyHostToDevice, stream_),
              cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    buffers_.push_back(std::move(made).value());
    return TensorView(p, DType::kF32, Device::cuda(0), {n, kKvHeads, kHeadDim});
  }
  static TensorView on_host(const std::vector<float>& keys, int64_t begin, int64_t n) {
    return host_view(keys.data() + begin * kRow, {n, kKvHeads, kHeadDim});
  }

  // Trains on tokens [0, fit) and adds tokens [0, n) of `keys`.
  void build(LayerIndex& index, const std::vector<float>& keys, int64_t fit, int64_t n) {
    const bool gpu = index.device().is_cuda();
    const Stream s = gpu ? Stream::cuda(stream_) : Stream::host();
    PQKV_ASSERT_OK(
        index.train(gpu ? on_device(keys, 0, fit) : on_host(keys, 0, fit), small_config(8, 6), s));
    PQKV_ASSERT_OK(index.add(gpu ? on_device(keys, 0, n) : on_host(keys, 0, n), s));
  }
  void add(LayerIndex& index, const std::vector<float>& keys, int64_t begin, int64_t n) {
    if (index.device().is_cuda()) {
      PQKV_ASSERT_OK(index.add(on_device(keys, begin, n), Stream::cuda(stream_)));
    } else {
      PQKV_ASSERT_OK(index.add(on_host(keys, begin, n), Stream::host()));
    }
  }

  // What the kernels published once everything queued has run.
  static DriftStats settled(const LayerIndex& index) {
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return index.drift_stats();
  }

  // Positions [kv_heads, k] of a search of every token (host memory).
  std::vector<int32_t> search(LayerIndex& index, const std::vector<float>& queries, int64_t k) {
    std::vector<int32_t> out(static_cast<size_t>(kKvHeads * k));
    SearchRequest request;
    request.begin = 0;
    request.end = index.num_tokens();
    request.k = k;
    if (!index.device().is_cuda()) {
      request.queries = host_view(queries.data(), {kQHeads, kHeadDim});
      PQKV_EXPECT_OK(index.search(request, out.data(), Stream::host(), nullptr));
      return out;
    }
    auto q = gpu::DeviceArray<float>::allocate(int64_t(queries.size()), stream_);
    auto positions = gpu::DeviceArray<int32_t>::allocate(int64_t(out.size()), stream_);
    PQKV_EXPECT_OK(q);
    PQKV_EXPECT_OK(positions);
    EXPECT_EQ(cudaMemcpyAsync(q->get(), queries.data(), sizeof(float) * queries.size(),
                              cudaMemcpyHostToDevice, stream_),
              cudaSuccess);
    request.queries = TensorView(q->get(), DType::kF32, Device::cuda(0), {kQHeads, kHeadDim});
    PQKV_EXPECT_OK(index.search(request, positions->get(), Stream::cuda(stream_), nullptr));
    EXPECT_EQ(cudaMemcpyAsync(out.data(), positions->get(), sizeof(int32_t) * out.size(),
                              cudaMemcpyDeviceToHost, stream_),
              cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    return out;
  }

  // Waits for stream_ on the host for at most `seconds`; false when it did
  // not finish (work on it waits for something that has not run).
  bool stream_finishes(double seconds) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < until) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return true;
      if (e != cudaErrorNotReady) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }

  // The refit-overlap tests' setup: `index` refits, `old` never does (int8
  // fits and encodes the same on every run, so until the swap both hold the
  // same codes); both hold tokens [0, 1280) of keys drifted from token 1024
  // on, and each step adds 8 of tokens [1280, 1536) to both and searches
  // both. Everything a step reads is on the device first: nothing in it
  // waits on the host until the check that the stream finishes.
  struct RefitOverlap {
    static constexpr int64_t kBegin = 1280;  // tokens before the refit
    static constexpr int64_t kEnd = 1536;    // tokens after the steps
    static constexpr int64_t kFitBegin = 16;
    static constexpr int64_t k = 32;
    std::vector<float> keys;
    std::vector<float> queries;
    std::unique_ptr<LayerIndex> index;
    std::unique_ptr<LayerIndex> old;
    TensorView all;         // tokens [0, kEnd) on the device
    TensorView refit_keys;  // tokens [0, kBegin) on the device
    // [2][kv_heads][k]: the last step's positions, `index`'s then `old`'s.
    gpu::DeviceArray<int32_t> positions;
    // `index`'s: the caller's default share, which the index lowers while
    // its refit runs; `old` (no build of its own in flight, so it would not)
    // is asked for that lower share: the same grid, the same results.
    SearchRequest request;
    SearchRequest old_request;
  };

  void start_overlap(uint64_t seed, RefitOverlap* o) {
    const auto base = clustered_keys(RefitOverlap::kEnd, kKvHeads, kHeadDim, seed);
    o->keys = spliced(base, drifted(base), 1024);
    o->index = make_cuda(int8_selection());
    o->old = make_cuda(int8_selection());
    ASSERT_NE(o->index, nullptr);
    ASSERT_NE(o->old, nullptr);
    for (LayerIndex* i : {o->index.get(), o->old.get()}) {
      build(*i, o->keys, 1024, 1024);
      add(*i, o->keys, 1024, RefitOverlap::kBegin - 1024);
    }
    o->all = on_device(o->keys, 0, RefitOverlap::kEnd);
    o->refit_keys = on_device(o->keys, 0, RefitOverlap::kBegin);
    o->queries = random_floats(kQHeads * kHeadDim, seed + 7);
    const TensorView q = on_device(o->queries, 0, kQHeads * kHeadDim / kRow);
    auto positions = gpu::DeviceArray<int32_t>::allocate(2 * kKvHeads * RefitOverlap::k, stream_);
    PQKV_ASSERT_OK(positions);
    o->positions = std::move(positions).value();
    o->request.queries = TensorView(q.data, DType::kF32, Device::cuda(0), {kQHeads, kHeadDim});
    o->request.k = RefitOverlap::k;
    o->old_request = o->request;
    o->old_request.sm_share = index::LayerIndexCuda::kBuildOverlapSmShare;
  }

  // Enqueues the step that adds tokens [t, t + 8) and searches [0, t + 8).
  void overlap_step(RefitOverlap& o, int64_t t) {
    const TensorView rows(static_cast<const float*>(o.all.data) + t * kRow, DType::kF32,
                          Device::cuda(0), {8, kKvHeads, kHeadDim});
    PQKV_ASSERT_OK(o.index->add(rows, Stream::cuda(stream_)));
    PQKV_ASSERT_OK(o.old->add(rows, Stream::cuda(stream_)));
    o.request.end = o.old_request.end = t + 8;
    PQKV_ASSERT_OK(o.index->search(o.request, o.positions.get(), Stream::cuda(stream_), nullptr));
    PQKV_ASSERT_OK(o.old->search(o.old_request, o.positions.get() + kKvHeads * RefitOverlap::k,
                                 Stream::cuda(stream_), nullptr));
  }

  // Whether the last step's search of `index` found what `old`'s did.
  bool overlap_agrees(const RefitOverlap& o) {
    std::vector<int32_t> got(static_cast<size_t>(2 * kKvHeads * RefitOverlap::k));
    EXPECT_EQ(cudaMemcpy(got.data(), o.positions.get(), sizeof(int32_t) * got.size(),
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    const auto half = got.begin() + kKvHeads * RefitOverlap::k;
    return std::equal(got.begin(), half, half);
  }

  // After the refit's work is done: the next search swaps it in (if no
  // search did), with the keys added meanwhile, and the index is then the
  // same as one fit on tokens [kFitBegin, kBegin) holding every token.
  void expect_swapped_in(RefitOverlap& o) {
    const auto after = search(*o.index, o.queries, RefitOverlap::k);
    const DriftStats d = settled(*o.index);
    EXPECT_EQ(d.refits, 1);
    EXPECT_FALSE(d.refit_running);
    EXPECT_EQ(d.fit_tokens, RefitOverlap::kBegin - RefitOverlap::kFitBegin);
    EXPECT_EQ(d.tokens_since_fit, RefitOverlap::kEnd - RefitOverlap::kBegin);
    EXPECT_EQ(o.index->num_tokens(), RefitOverlap::kEnd);
    auto fresh = make_cuda(int8_selection());
    ASSERT_NE(fresh, nullptr);
    PQKV_ASSERT_OK(fresh->train(
        on_device(o.keys, RefitOverlap::kFitBegin, RefitOverlap::kBegin - RefitOverlap::kFitBegin),
        PqConfig{}, Stream::cuda(stream_)));
    PQKV_ASSERT_OK(fresh->add(on_device(o.keys, 0, RefitOverlap::kEnd), Stream::cuda(stream_)));
    // Its build seen done, so that it searches on the share `index` did.
    settled(*fresh);
    EXPECT_EQ(after, search(*fresh, o.queries, RefitOverlap::k));
    for (int h = 0; h < kKvHeads; ++h) {
      std::vector<uint8_t> a(RefitOverlap::kEnd * kHeadDim), b(a.size());
      PQKV_ASSERT_OK(o.index->copy_codes(h, 0, RefitOverlap::kEnd, a.data()));
      PQKV_ASSERT_OK(fresh->copy_codes(h, 0, RefitOverlap::kEnd, b.data()));
      EXPECT_EQ(a, b) << "KV head " << h;
    }
  }

  cudaStream_t stream_ = nullptr;
  std::vector<gpu::DeviceArray<float>> buffers_;
};

TEST_F(DriftCudaTest, RatioStaysNearOneInDistributionAndRisesOnDriftedKeys) {
  const uint64_t seed = 11;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto keys = clustered_keys(3072, kKvHeads, kHeadDim, seed);
  const auto moved = drifted(keys);
  for (const CodeCase& c : code_cases()) {
    SCOPED_TRACE(c.name);
    auto index = make_cuda(c.selection);
    ASSERT_NE(index, nullptr);
    build(*index, keys, 2048, 2048);
    // The first add encoded the fit's context: not counted.
    DriftStats d = settled(*index);
    EXPECT_TRUE(d.tracking);
    EXPECT_EQ(d.fit_tokens, 2048);
    EXPECT_EQ(d.tokens_since_fit, 0);
    EXPECT_EQ(d.max_error_ratio, 0.0);
    // New keys from the same distribution, one decode token at a time too.
    add(*index, keys, 2048, 1000);
    for (int64_t t = 3048; t < 3072; ++t)
      add(*index, keys, t, 1);
    d = settled(*index);
    EXPECT_EQ(d.tokens_since_fit, 1024);
    ASSERT_EQ(d.head_error_ratio.size(), size_t{kKvHeads});
    for (double r : d.head_error_ratio) {
      EXPECT_GT(r, 0.7);
      EXPECT_LT(r, c.in_distribution_max);
    }
    // Drifted keys: clipped (scalar codes) or far from every centroid (PQ).
    auto index2 = make_cuda(c.selection);
    build(*index2, keys, 2048, 2048);
    add(*index2, moved, 2048, 1024);
    d = settled(*index2);
    EXPECT_GT(d.mean_error_ratio, 5.0);
    EXPECT_GE(d.max_error_ratio, d.mean_error_ratio);
  }
}

TEST_F(DriftCudaTest, RatiosAgreeWithTheCpuIndex) {
  const uint64_t seed = 13;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto keys = clustered_keys(3072, kKvHeads, kHeadDim, seed);
  // Drifted less than drifted() does: ratios well above 1, of a size both
  // backends measure alike.
  auto moved = keys;
  for (float& v : moved)
    v = 2.0f * v + 1.0f;
  for (const CodeCase& c : code_cases()) {
    SCOPED_TRACE(c.name);
    auto gpu = make_cuda(c.selection);
    ASSERT_NE(gpu, nullptr);
    auto cpu = make_cpu(c.selection);
    for (LayerIndex* index : {gpu.get(), cpu.get()}) {
      build(*index, keys, 2048, 2048);
      add(*index, keys, 2048, 512);
      add(*index, moved, 2560, 512);
    }
    const DriftStats g = settled(*gpu);
    const DriftStats h = cpu->drift_stats();
    EXPECT_EQ(g.fit_tokens, h.fit_tokens);
    EXPECT_EQ(g.tokens_since_fit, h.tokens_since_fit);
    ASSERT_EQ(g.head_error_ratio.size(), h.head_error_ratio.size());
    for (size_t i = 0; i < g.head_error_ratio.size(); ++i) {
      EXPECT_NEAR(g.head_error_ratio[i], h.head_error_ratio[i],
                  c.cpu_tolerance * h.head_error_ratio[i])
          << "KV head " << i;
    }
    EXPECT_GT(g.mean_error_ratio, 1.5);
  }
}

TEST_F(DriftCudaTest, ARefitRaisesRecallOnDriftedKeys) {
  const uint64_t seed = 17;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto base = clustered_keys(2048, kKvHeads, kHeadDim, seed);
  // Tokens [0, 1024) as trained, [1024, 2048) drifted; queries near drifted keys.
  const auto keys = spliced(base, drifted(base), 1024);
  std::vector<float> queries(kQHeads * kHeadDim);
  const auto noise = random_floats(queries.size(), seed + 3, 0.5f);
  for (int q = 0; q < kQHeads; ++q) {
    for (int d = 0; d < kHeadDim; ++d) {
      const int64_t token = 1100 + 97 * q;
      queries[q * kHeadDim + d] =
          keys[token * kRow + (q % kKvHeads) * kHeadDim + d] / 4.0f + noise[q * kHeadDim + d];
    }
  }
  const int64_t k = 64;
  auto exact = make_cpu(SelectionConfig::oracle());
  build(*exact, keys, 2048, 2048);
  const auto reference = search(*exact, queries, k);
  for (const CodeCase& c : code_cases()) {
    SCOPED_TRACE(c.name);
    auto index = make_cuda(c.selection);
    ASSERT_NE(index, nullptr);
    build(*index, keys, 1024, 1024);
    add(*index, keys, 1024, 1024);
    const double before = recall(search(*index, queries, k), reference, k);
    EXPECT_GT(settled(*index).max_error_ratio, 5.0);
    PQKV_ASSERT_OK(index->refit_on_device(on_device(keys, 0, 2048), 0, small_config(8, 6),
                                          Stream::cuda(stream_)));
    EXPECT_TRUE(index->drift_stats().refit_running);
    ASSERT_CUDA(
        cudaStreamSynchronize(static_cast<cudaStream_t>(index->background_stream().handle)));
    // The search swaps the finished refit in before it scores.
    const double after = recall(search(*index, queries, k), reference, k);
    const DriftStats d = settled(*index);
    std::printf("[ %s ] recall against exact top-%lld: %.3f before the refit, %.3f after\n", c.name,
                static_cast<long long>(k), before, after);
    EXPECT_EQ(d.refits, 1);
    EXPECT_FALSE(d.refit_running);
    EXPECT_TRUE(d.last_refit_error.empty()) << d.last_refit_error;
    EXPECT_EQ(d.fit_tokens, 2048);
    EXPECT_EQ(d.tokens_since_fit, 0);
    EXPECT_GT(d.last_refit_ms, 0.0);
    EXPECT_GE(after, before + c.recall_gain);
    // Keys like the refit's own (half from before the drift, half after)
    // quantize as well as its fit's.
    add(*index, keys, 896, 256);
    EXPECT_LT(settled(*index).max_error_ratio, 1.6);
  }
}

// Blocks a stream from the host until released (a host function in the
// stream), so that a refit queued behind it is still being built (and a
// later add can outgrow it).
class StreamGate {
 public:
  Status close(cudaStream_t stream) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaLaunchHostFunc(stream, &StreamGate::wait, this));
    return ok_status();
  }
  void open() { open_.store(true); }

 private:
  static void CUDART_CB wait(void* self) {
    auto* gate = static_cast<StreamGate*>(self);
    while (!gate->open_.load())
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::atomic<bool> open_{false};
};

// Keeps a stream busy with kernels (k-means and encoding passes over many
// keys, as a PQ refit runs) for a fraction of a second: PQ trainings of an
// index that builds on that stream, so that a refit queued behind them is
// still being built while the test adds and searches. Kernels, not a blocked
// host function: a stream stalled at its head can hold back other streams
// that share its hardware queue, which a refit never does.
class BusyWork {
 public:
  Status enqueue(cudaStream_t stream, const TensorView& keys, int trainings) {
    // Many Lloyd iterations per training: the GPU's work outlasts the
    // host's enqueueing of it by far.
    const PqConfig config = small_config(8, 8, 200);
    PQKV_ASSIGN_OR_RETURN(index_,
                          index::LayerIndexCuda::create(Device::cuda(0), kHeadDim, kKvHeads, config,
                                                        SelectionConfig::pq(), stream));
    for (int i = 0; i < trainings; ++i)
      PQKV_RETURN_IF_ERROR(index_->train(keys, config, Stream::cuda(stream)));
    return ok_status();
  }

 private:
  std::unique_ptr<index::LayerIndexCuda> index_;  // frees in order on the busy stream
};

TEST_F(DriftCudaTest, SearchesAndAddsDuringARefitNeitherWaitNorSeeItHalfBuilt) {
  const uint64_t seed = 31;
  SCOPED_TRACE("seed " + std::to_string(seed));
  RefitOverlap o;
  start_overlap(seed, &o);
  if (HasFatalFailure()) return;
  const auto build_stream = static_cast<cudaStream_t>(o.index->background_stream().handle);
  const TensorView busy_keys = on_device(clustered_keys(262144, kKvHeads, kHeadDim, 99), 0, 262144);
  BusyWork busy;
  PQKV_ASSERT_OK(busy.enqueue(build_stream, busy_keys, 10));
  PQKV_ASSERT_OK(o.index->refit_on_device(o.refit_keys, RefitOverlap::kFitBegin, PqConfig{},
                                          Stream::cuda(stream_)));
  // Completes once the refit's work (queued before it) is done.
  gpu::EventHandle refit_done;
  {
    auto made = gpu::make_event();
    PQKV_ASSERT_OK(made);
    refit_done = std::move(made).value();
  }
  ASSERT_CUDA(cudaEventRecord(refit_done.get(), build_stream));
  EXPECT_TRUE(o.index->drift_stats().refit_running);
  EXPECT_EQ(o.index
                ->refit_on_device(o.refit_keys, RefitOverlap::kFitBegin, PqConfig{},
                                  Stream::cuda(stream_))
                .code(),
            StatusCode::kFailedPrecondition);

  // The refit is queued behind the busy work; adds and searches on the
  // caller's stream still complete meanwhile, on the old codes until a
  // search after the refit's work is done swaps it in.
  bool stalled = false;
  bool overlapped = false;
  for (int64_t t = RefitOverlap::kBegin; t < RefitOverlap::kEnd; t += 8) {
    overlap_step(o, t);
    if (HasFatalFailure()) return;
    if (!stream_finishes(10.0)) {
      stalled = true;
      break;
    }
    overlapped = overlapped || cudaEventQuery(refit_done.get()) == cudaErrorNotReady;
    if (!o.index->drift_stats().refit_running) continue;  // swapped in by this step's search
    EXPECT_TRUE(overlap_agrees(o)) << "at token " << t;
  }
  ASSERT_FALSE(stalled) << "an add or search waited for the refit being built";
  // Whether the device ran the caller's steps while the refit was still
  // queued is the scheduler's choice, not the index's: say which case ran.
  std::printf("[ refit ] %s\n", overlapped ? "adds and searches ran while the refit was built"
                                           : "the refit was done before the first add and search "
                                             "finished: only the swap was checked");
  ASSERT_CUDA(cudaStreamSynchronize(build_stream));
  expect_swapped_in(o);
}

// The same as above with the overlap forced: a kernel on the index's
// background stream holds the refit behind a gate in device memory while the
// caller adds and searches, so every one of those steps runs (and finishes)
// while the refit is still queued; then the gate opens and the refit swaps
// in. The searches ask for the whole device (the default share): a search
// holding every SM (the persistent search's cooperative grid) cannot start
// while the gate's kernel is resident, so they finish only because the
// index holds less of the device while its refit is in flight.
TEST_F(DriftCudaTest, AddsAndSearchesRunWhileAGatedRefitWaitsThenItSwapsIn) {
  const uint64_t seed = 37;
  SCOPED_TRACE("seed " + std::to_string(seed));
  RefitOverlap o;
  start_overlap(seed, &o);
  if (HasFatalFailure()) return;
  ASSERT_EQ(o.request.sm_share, 1.0f);
  const auto build_stream = static_cast<cudaStream_t>(o.index->background_stream().handle);
  // Bounded: a bug that never opens the gate fails the test instead of hanging it.
  constexpr int64_t kGateTimeoutMs = 20000;
  DeviceGate gate;
  PQKV_ASSERT_OK(gate.init());
  PQKV_ASSERT_OK(gate.close(build_stream, kGateTimeoutMs));
  gpu::EventHandle gate_passed;
  {
    auto made = gpu::make_event();
    PQKV_ASSERT_OK(made);
    gate_passed = std::move(made).value();
  }
  ASSERT_CUDA(cudaEventRecord(gate_passed.get(), build_stream));
  PQKV_ASSERT_OK(o.index->refit_on_device(o.refit_keys, RefitOverlap::kFitBegin, PqConfig{},
                                          Stream::cuda(stream_)));
  EXPECT_TRUE(o.index->drift_stats().refit_running);

  int steps = 0;
  for (int64_t t = RefitOverlap::kBegin; t < RefitOverlap::kEnd; t += 8) {
    overlap_step(o, t);
    if (HasFatalFailure()) return;
    ASSERT_TRUE(stream_finishes(10.0))
        << "an add or search at token " << t << " waited for the gated refit";
    // The step finished with the refit still behind the gate: they overlapped.
    ASSERT_EQ(cudaEventQuery(gate_passed.get()), cudaErrorNotReady)
        << "the gate let the refit through before it was opened (timed out?) at token " << t;
    ASSERT_TRUE(o.index->drift_stats().refit_running) << "at token " << t;
    ASSERT_TRUE(overlap_agrees(o))
        << "a search before the swap differs from the unrefitted index's at token " << t;
    ++steps;
  }
  EXPECT_EQ(steps, 32);

  gate.open();
  ASSERT_CUDA(cudaStreamSynchronize(build_stream));
  EXPECT_TRUE(gate.opened_in_time()) << "the gate timed out after " << kGateTimeoutMs << " ms";
  // Seen done by the next search, which swaps it in: the caller's share again.
  expect_swapped_in(o);
  auto* cuda_index = static_cast<index::LayerIndexCuda*>(o.index.get());
  auto in_flight = cuda_index->build_in_flight();
  PQKV_ASSERT_OK(in_flight);
  EXPECT_FALSE(*in_flight);
}

// The kernels of a captured search, as (grid, block) sizes in node order.
std::vector<std::array<unsigned, 4>> kernel_shapes(cudaGraph_t graph) {
  size_t count = 0;
  EXPECT_EQ(cudaGraphGetNodes(graph, nullptr, &count), cudaSuccess);
  std::vector<cudaGraphNode_t> nodes(count);
  EXPECT_EQ(cudaGraphGetNodes(graph, nodes.data(), &count), cudaSuccess);
  std::vector<std::array<unsigned, 4>> shapes;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    EXPECT_EQ(cudaGraphNodeGetType(node, &type), cudaSuccess);
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaKernelNodeParams params{};
    EXPECT_EQ(cudaGraphKernelNodeGetParams(node, &params), cudaSuccess);
    shapes.push_back({params.gridDim.x, params.gridDim.y, params.gridDim.z, params.blockDim.x});
  }
  return shapes;
}

// A search captured while the index's refit is in flight keeps the caller's
// share (the graph would outlive the refit); a direct search at the same
// time holds less. After the swap, the graph replays over the new codes.
TEST_F(DriftCudaTest, ACaptureDuringARefitKeepsTheCallersShare) {
  const uint64_t seed = 41;
  SCOPED_TRACE("seed " + std::to_string(seed));
  RefitOverlap o;
  start_overlap(seed, &o);
  if (HasFatalFailure()) return;
  o.request.end = o.old_request.end = RefitOverlap::kBegin;
  const auto capture = [&](LayerIndex& index, const SearchRequest& request) {
    cudaGraph_t graph = nullptr;
    EXPECT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const Status s = index.search(request, o.positions.get(), Stream::cuda(stream_), nullptr);
    EXPECT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
    PQKV_EXPECT_OK(s);
    return graph;
  };
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaGraph_t idle = capture(*o.index, o.request);
  cudaGraph_t lowered = capture(*o.old, o.old_request);

  const auto build_stream = static_cast<cudaStream_t>(o.index->background_stream().handle);
  DeviceGate gate;
  PQKV_ASSERT_OK(gate.init());
  PQKV_ASSERT_OK(gate.close(build_stream, 20000));
  PQKV_ASSERT_OK(o.index->refit_on_device(o.refit_keys, RefitOverlap::kFitBegin, PqConfig{},
                                          Stream::cuda(stream_)));
  auto* cuda_index = static_cast<index::LayerIndexCuda*>(o.index.get());
  auto in_flight = cuda_index->build_in_flight();
  PQKV_ASSERT_OK(in_flight);
  EXPECT_TRUE(*in_flight);
  cudaGraph_t during = capture(*o.index, o.request);
  ASSERT_NE(idle, nullptr);
  ASSERT_NE(lowered, nullptr);
  ASSERT_NE(during, nullptr);
  const auto idle_shapes = kernel_shapes(idle);
  EXPECT_FALSE(idle_shapes.empty());
  EXPECT_EQ(kernel_shapes(during), idle_shapes);
  // The test can tell the shares apart: the lowered share launches otherwise.
  EXPECT_NE(kernel_shapes(lowered), idle_shapes);
  // A direct search now runs beside the gate on the lowered share and finds
  // what the unrefitted index finds there.
  PQKV_ASSERT_OK(o.index->search(o.request, o.positions.get(), Stream::cuda(stream_), nullptr));
  PQKV_ASSERT_OK(o.old->search(o.old_request, o.positions.get() + kKvHeads * RefitOverlap::k,
                               Stream::cuda(stream_), nullptr));
  ASSERT_TRUE(stream_finishes(10.0)) << "a direct search waited for the gated refit";
  EXPECT_TRUE(overlap_agrees(o));

  gate.open();
  ASSERT_CUDA(cudaStreamSynchronize(build_stream));
  EXPECT_TRUE(gate.opened_in_time());
  // A direct search swaps the refit in; the graph captured during the refit
  // then replays over the new codes and finds what it finds.
  PQKV_ASSERT_OK(o.index->search(o.request, o.positions.get() + kKvHeads * RefitOverlap::k,
                                 Stream::cuda(stream_), nullptr));
  EXPECT_EQ(o.index->drift_stats().refits, 1);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA(cudaGraphInstantiate(&exec, during, 0));
  ASSERT_CUDA(cudaGraphLaunch(exec, stream_));
  ASSERT_CUDA(cudaStreamSynchronize(stream_));
  EXPECT_TRUE(overlap_agrees(o));
  ASSERT_CUDA(cudaGraphExecDestroy(exec));
  for (cudaGraph_t g : {idle, lowered, during})
    ASSERT_CUDA(cudaGraphDestroy(g));
}

// Every code's search asks for the whole device and still runs beside a
// gated refit of its index, finding what the same codes find before it.
TEST_F(DriftCudaTest, EveryCodeSearchesAtTheDefaultShareBesideAGatedRefit) {
  const uint64_t seed = 43;
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto keys = clustered_keys(2048, kKvHeads, kHeadDim, seed);
  const auto queries = random_floats(kQHeads * kHeadDim, seed + 1);
  const int64_t k = 48;
  for (const CodeCase& c : code_cases()) {
    SCOPED_TRACE(c.name);
    auto index = make_cuda(c.selection);
    ASSERT_NE(index, nullptr);
    build(*index, keys, 2048, 2048);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // The reference: the same codes, searched on the share the index holds
    // while its refit runs.
    const TensorView q = on_device(queries, 0, kQHeads * kHeadDim / kRow);
    auto positions = gpu::DeviceArray<int32_t>::allocate(2 * kKvHeads * k, stream_);
    PQKV_ASSERT_OK(positions);
    SearchRequest request;
    request.queries = TensorView(q.data, DType::kF32, Device::cuda(0), {kQHeads, kHeadDim});
    request.end = 2048;
    request.k = k;
    SearchRequest lowered = request;
    lowered.sm_share = index::LayerIndexCuda::kBuildOverlapSmShare;
    PQKV_ASSERT_OK(index->search(lowered, positions->get(), Stream::cuda(stream_), nullptr));

    const auto build_stream = static_cast<cudaStream_t>(index->background_stream().handle);
    DeviceGate gate;
    PQKV_ASSERT_OK(gate.init());
    PQKV_ASSERT_OK(gate.close(build_stream, 20000));
    PQKV_ASSERT_OK(index->refit_on_device(on_device(keys, 0, 2048), 0, small_config(8, 6),
                                          Stream::cuda(stream_)));
    PQKV_ASSERT_OK(
        index->search(request, positions->get() + kKvHeads * k, Stream::cuda(stream_), nullptr));
    ASSERT_TRUE(stream_finishes(10.0)) << "the search waited for the gated refit";
    EXPECT_TRUE(index->drift_stats().refit_running);
    std::vector<int32_t> got(static_cast<size_t>(2 * kKvHeads * k));
    ASSERT_CUDA(cudaMemcpy(got.data(), positions->get(), sizeof(int32_t) * got.size(),
                           cudaMemcpyDeviceToHost));
    EXPECT_TRUE(std::equal(got.begin(), got.begin() + kKvHeads * k, got.begin() + kKvHeads * k));
    gate.open();
    ASSERT_CUDA(cudaStreamSynchronize(build_stream));
    EXPECT_TRUE(gate.opened_in_time());
  }
}

TEST_F(DriftCudaTest, RefitChecksItsArgumentsAndGrowthDropsIt) {
  const auto keys = clustered_keys(256, kKvHeads, kHeadDim, 5);
  auto untrained = make_cuda(int8_selection());
  ASSERT_NE(untrained, nullptr);
  EXPECT_EQ(
      untrained->refit_on_device(on_device(keys, 0, 256), 0, PqConfig{}, Stream::cuda(stream_))
          .code(),
      StatusCode::kFailedPrecondition);
  auto index = make_cuda(int8_selection());
  build(*index, keys, 128, 128);
  const Status short_keys =
      index->refit_on_device(on_device(keys, 0, 100), 0, PqConfig{}, Stream::cuda(stream_));
  EXPECT_EQ(short_keys.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(short_keys.message().find("[0, 128)"), std::string::npos) << short_keys.to_string();
  EXPECT_EQ(index->refit_on_device(on_device(keys, 0, 128), 128, PqConfig{}, Stream::cuda(stream_))
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      index->refit_on_device(on_host(keys, 0, 128), 0, PqConfig{}, Stream::cuda(stream_)).code(),
      StatusCode::kInvalidArgument);
  // Host keys are the CPU index's way.
  EXPECT_EQ(index
                ->refit(std::vector<float>(keys.begin(), keys.begin() + 128 * kRow), 0, PqConfig{},
                        nullptr)
                .code(),
            StatusCode::kUnimplemented);
  auto exact = make_cuda(SelectionConfig::oracle());
  build(*exact, keys, 128, 128);
  EXPECT_FALSE(settled(*exact).tracking);
  EXPECT_EQ(
      exact->refit_on_device(on_device(keys, 0, 128), 0, PqConfig{}, Stream::cuda(stream_)).code(),
      StatusCode::kFailedPrecondition);

  // Growing past the capacity it started with drops a refit still being
  // built, and says so; the next one is swapped in.
  auto* cuda_index = static_cast<index::LayerIndexCuda*>(index.get());
  const int64_t capacity = cuda_index->capacity();
  const auto many = clustered_keys(capacity, kKvHeads, kHeadDim, 6);
  StreamGate gate;
  PQKV_ASSERT_OK(gate.close(static_cast<cudaStream_t>(index->background_stream().handle)));
  PQKV_ASSERT_OK(
      index->refit_on_device(on_device(keys, 0, 128), 0, PqConfig{}, Stream::cuda(stream_)));
  add(*index, many, 0, capacity - 128 + 1);
  gate.open();
  DriftStats d = settled(*index);
  EXPECT_FALSE(d.refit_running);
  EXPECT_EQ(d.refits, 0);
  EXPECT_NE(d.last_refit_error.find("reserve()"), std::string::npos) << d.last_refit_error;
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
