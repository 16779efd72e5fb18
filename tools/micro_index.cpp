// Micro-benchmarks of the index on the GPU, run by `pqkv micro`.
//
// Geometry: Llama-3.1-8B (32 query heads, 8 KV heads, head_dim 128), one
// layer, top-k = 5% of the context. GPU work is timed with CUDA events around
// each iteration (manual time) after warm-up, on seeded random data.
//
//   BM_PqSearch          PQ search of one layer (LUTs, scans, top-k): the LUT,
//                        scan and select kernels (path 0, the baseline of the
//                        same run) or the persistent kernel (path 1); graph 0
//                        launches on a stream, graph 1 replays a CUDA graph.
//                        Counters: codes bytes over time, as a fraction of
//                        3.0 TB/s; for the persistent kernels, the candidates
//                        of the first radix bucket per KV head.
//   BM_IndexSearch       the same through LayerIndexCuda::search at 128K.
//   BM_TwoStageSearch    LayerIndexCuda::search of a --selection: one stage
//                        of int4 (selection 0, the baseline of the same run)
//                        or int8 (3), two stages pq+int4:4 (1) or
//                        int4+int8:2 (2), at a 1% top-k (a 2% budget's).
//   BM_SqSearch          int4 / int8 key search of one layer (tables, scans,
//                        top-k): one thread per token in the CPU codec's
//                        order (path 0), tensor cores in six kernels (path 1,
//                        the baseline of the same run), the fused persistent
//                        kernel (path 2); launched on a stream, or (graph:1)
//                        replayed from a CUDA graph.
//   BM_ExactSearch       the exact baseline: bf16 q.k of every key with cuBLAS,
//                        then the same softmax, aggregation and top-k.
//   BM_OriginalDataPath  the original method's movement: the layer's int64 code
//                        table copied from pageable host memory every step,
//                        then scanned.
//   BM_IndexBuild        train + encode one layer at 128K tokens (m=2, b=6,
//                        default iterations and sampling) on the GPU (backend 0)
//                        or with the CPU backend (Faiss k-means, backend 1),
//                        with the k-means objective as a counter.
#if PQKV_HAVE_CUDA
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cuda/exact_search.h"
#include "index/cuda/layer_index_cuda.h"
#include "index/cuda/pq_search.cuh"
#include "index/cuda/random_fill.cuh"
#include "index/layer_index.h"
#include "pqkv/device.h"

namespace pqkv::tools {
namespace {

constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr double kHbmBytesPerSecond = 3.0e12;
constexpr int kWarmup = 3;

int64_t top_k_of(int64_t tokens) {
  return tokens / 20;
}

// Owns a stream and two timing events; skips the benchmark on any failure.
class GpuBench {
 public:
  explicit GpuBench(benchmark::State& state) : state_(state) {
    if (cuda_device_count() == 0) {
      state.SkipWithError("no CUDA device: GPU benchmarks need a GPU");
      return;
    }
    ok_ = check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream") &&
          check(cudaEventCreate(&start_), "event") && check(cudaEventCreate(&stop_), "event");
  }
  ~GpuBench() {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    arrays_.clear();
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  GpuBench(const GpuBench&) = delete;
  GpuBench& operator=(const GpuBench&) = delete;

  bool ok() const { return ok_; }
  cudaStream_t stream() const { return stream_; }

  bool check(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return true;
    fail(std::string(what) + ": " + cudaGetErrorString(err));
    return false;
  }
  bool check(const Status& s) {
    if (s.ok()) return true;
    fail(s.to_string());
    return false;
  }
  void fail(const std::string& msg) {
    if (ok_) state_.SkipWithError(msg.c_str());
    ok_ = false;
  }

  // Device memory of `count` T, freed with the bench.
  template <class T>
  T* alloc(int64_t count) {
    auto made = gpu::DeviceArray<std::byte>::allocate(count * int64_t(sizeof(T)), stream_);
    if (!check(made.status())) return nullptr;
    T* p = reinterpret_cast<T*>(made->get());
    arrays_.push_back(std::move(made).value());
    return p;
  }

  // Runs `step` kWarmup times, then once per benchmark iteration between the
  // events, each after an untimed `prepare`; records each iteration's time and
  // returns their median in seconds.
  template <class Step, class Prepare>
  double time_iterations(Step&& step, Prepare&& prepare) {
    for (int i = 0; i < kWarmup && ok_; ++i)
      check(prepare()) && check(step());
    if (!ok_ || !check(cudaStreamSynchronize(stream_), "warm-up")) return 0;
    std::vector<double> times;
    for (auto _ : state_) {
      if (!check(prepare()) || !check(cudaStreamSynchronize(stream_), "prepare")) break;
      if (!check(cudaEventRecord(start_, stream_), "record")) break;
      if (!check(step())) break;
      if (!check(cudaEventRecord(stop_, stream_), "record")) break;
      if (!check(cudaEventSynchronize(stop_), "sync")) break;
      float ms = 0;
      check(cudaEventElapsedTime(&ms, start_, stop_), "elapsed");
      state_.SetIterationTime(ms * 1e-3);
      times.push_back(ms * 1e-3);
    }
    if (times.empty()) return 0;
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    return times[times.size() / 2];
  }
  template <class Step>
  double time_iterations(Step&& step) {
    return time_iterations(step, [] { return ok_status(); });
  }
  // The median time of `search` on the bench's stream: launched directly,
  // or (graph) captured once in a CUDA graph and replayed. 0 after a
  // failure, which is reported.
  template <class Search>
  double time_search(bool graph, Search&& search) {
    cudaGraphExec_t exec = nullptr;
    if (graph) {
      cudaGraph_t g = nullptr;
      if (!check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), "capture")) return 0;
      const Status captured = search();
      if (!check(cudaStreamEndCapture(stream_, &g), "end capture") || !check(captured)) return 0;
      const bool made = check(cudaGraphInstantiate(&exec, g, 0), "instantiate");
      cudaGraphDestroy(g);
      if (!made) return 0;
    }
    const double median = time_iterations([&]() -> Status {
      if (!graph) return search();
      return cuda_status(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch", __FILE__, __LINE__);
    });
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    return median;
  }

 private:
  benchmark::State& state_;
  bool ok_ = true;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
  std::vector<gpu::DeviceArray<std::byte>> arrays_;
};

void set_search_counters(benchmark::State& state, double median_s, double bytes_per_search) {
  state.counters["median_us"] = median_s * 1e6;
  state.counters["bytes"] = bytes_per_search;
  state.counters["GBps"] = median_s > 0 ? bytes_per_search / median_s / 1e9 : 0;
  state.counters["of_3TBps"] = median_s > 0 ? bytes_per_search / median_s / kHbmBytesPerSecond : 0;
}

// Candidates of the first radix bucket per KV head in one more search (the
// persistent searches' running counts before and after), their mean.
template <class Search>
double mean_candidates(GpuBench& bench, const index::cuda::SearchWorkspaceView& ws,
                       Search&& search) {
  std::vector<uint32_t> before(kKvHeads), after(kKvHeads);
  const auto read = [&](std::vector<uint32_t>& to) {
    return bench.check(cudaStreamSynchronize(bench.stream()), "sync") &&
           bench.check(cudaMemcpy(to.data(), ws.fused_candidate_count, kKvHeads * 4,
                                  cudaMemcpyDeviceToHost),
                       "read counts");
  };
  if (!read(before) || !bench.check(search()) || !read(after)) return 0;
  double sum = 0;
  for (int h = 0; h < kKvHeads; ++h)
    sum += after[h] - before[h];
  return sum / kKvHeads;
}

// Args: m, bits, tokens, mode (0 stream, 1 graph), path (0 the LUT, scan and
// select kernels, 1 the persistent kernel).
void BM_PqSearch(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const int m = static_cast<int>(state.range(0));
  const int ksub = 1 << state.range(1);
  const int64_t tokens = state.range(2);
  const bool graph = state.range(3) == 1;
  const bool fused = state.range(4) == 1;
  const int64_t k = top_k_of(tokens);
  cudaStream_t s = bench.stream();

  auto* codes = bench.alloc<uint8_t>(int64_t{kKvHeads} * tokens * m);
  auto* centroids = bench.alloc<float>(int64_t{kKvHeads} * ksub * kHeadDim);
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  auto ws = index::cuda::SearchWorkspace::allocate(kKvHeads, m, ksub, tokens, s);
  if (!bench.check(ws.status())) return;
  if (!bench.check(
          index::cuda::fill_random_codes(codes, int64_t{kKvHeads} * tokens * m, ksub, 1, s)) ||
      !bench.check(index::cuda::fill_random(centroids, DType::kF32,
                                            int64_t{kKvHeads} * ksub * kHeadDim, 2, 1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  index::cuda::PqSearchArgs args;
  args.shape = {kQHeads, kKvHeads, kHeadDim, m, ksub};
  args.queries = queries;
  args.query_dtype = DType::kBF16;
  args.centroids = centroids;
  args.codes = codes;
  args.head_stride = tokens * m;
  args.request = {0, tokens, k, GqaAggregation::kSoftmaxSum, out};
  args.fused = fused;
  const auto search = [&] { return index::cuda::launch_pq_search(args, ws->view(), s); };

  const double median = bench.time_search(graph, search);
  set_search_counters(state, median, double(kKvHeads) * tokens * m);
  if (fused) state.counters["candidates"] = mean_candidates(bench, ws->view(), search);
  state.SetLabel("m=" + std::to_string(m) + ",b=" + std::to_string(state.range(1)) +
                 (graph ? " graph" : " stream") + (fused ? ", persistent" : ", kernels"));
}

// The same search through LayerIndexCuda (validation, ready-event wait and
// launches included): trained and filled from random bf16 keys. Args: m, bits, tokens.
void BM_IndexSearch(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  PqConfig config;
  config.m = static_cast<int>(state.range(0));
  config.bits = static_cast<int>(state.range(1));
  const int64_t tokens = state.range(2);
  const int64_t k = top_k_of(tokens);
  cudaStream_t s = bench.stream();
  auto* keys = bench.alloc<uint16_t>(tokens * kKvHeads * kHeadDim);
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  if (!bench.check(
          index::cuda::fill_random(keys, DType::kBF16, tokens * kKvHeads * kHeadDim, 7, 1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  auto idx = index::LayerIndexCuda::create(Device::cuda(0),
                                           index::PqShape::from_config(kHeadDim, config), kKvHeads);
  if (!bench.check(idx.status())) return;
  const TensorView view(keys, DType::kBF16, Device::cuda(0), {tokens, kKvHeads, kHeadDim});
  if (!bench.check((*idx)->train(view, config, Stream::cuda(s))) ||
      !bench.check((*idx)->add(view, Stream::cuda(s)))) {
    return;
  }
  const index::SearchRequest request{
      TensorView(queries, DType::kBF16, Device::cuda(0), {kQHeads, kHeadDim}), 0, tokens, k,
      GqaAggregation::kSoftmaxSum};
  const double median =
      bench.time_iterations([&] { return (*idx)->search(request, out, Stream::cuda(s), nullptr); });
  set_search_counters(state, median, double(kKvHeads) * tokens * config.m);
  state.SetLabel(config.to_string() + " LayerIndexCuda::search");
}

// Args: selection (see the top of this file), tokens.
void BM_TwoStageSearch(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const char* names[] = {"int4", "pq+int4:4", "int4+int8:2", "int8"};
  auto selection = SelectionConfig::parse(names[state.range(0)]);
  if (!bench.check(selection.status())) return;
  const int64_t tokens = state.range(1);
  const int64_t k = tokens / 100;
  cudaStream_t s = bench.stream();
  auto* keys = bench.alloc<uint16_t>(tokens * kKvHeads * kHeadDim);
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  if (!bench.check(
          index::cuda::fill_random(keys, DType::kBF16, tokens * kKvHeads * kHeadDim, 7, 1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  const PqConfig pq = PqConfig::pqkv_default();
  auto idx = index::LayerIndexCuda::create(Device::cuda(0), kHeadDim, kKvHeads, pq, *selection);
  if (!bench.check(idx.status())) return;
  const TensorView view(keys, DType::kBF16, Device::cuda(0), {tokens, kKvHeads, kHeadDim});
  if (!bench.check((*idx)->train(view, pq, Stream::cuda(s))) ||
      !bench.check((*idx)->add(view, Stream::cuda(s)))) {
    return;
  }
  const index::SearchRequest request{
      TensorView(queries, DType::kBF16, Device::cuda(0), {kQHeads, kHeadDim}), 0, tokens, k,
      GqaAggregation::kSoftmaxSum};
  const double median =
      bench.time_iterations([&] { return (*idx)->search(request, out, Stream::cuda(s), nullptr); });
  // The first stage reads every token's code; the rerank only its candidates'.
  const int first_bytes = selection->code == KeyCode::kPq ? pq.resolved_m(kHeadDim) * pq.bits / 8
                          : selection->code == KeyCode::kInt4 ? kHeadDim / 2
                                                              : kHeadDim;
  set_search_counters(state, median, double(kKvHeads) * tokens * first_bytes);
  state.SetLabel(selection->to_string() + " LayerIndexCuda::search");
}

// Args: tokens.
void BM_ExactSearch(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const int64_t tokens = state.range(0);
  const int64_t k = top_k_of(tokens);
  cudaStream_t s = bench.stream();
  auto* keys = bench.alloc<uint16_t>(tokens * kKvHeads * kHeadDim);
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  if (!bench.check(
          index::cuda::fill_random(keys, DType::kBF16, tokens * kKvHeads * kHeadDim, 4, 1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  auto exact = index::cuda::ExactSearchCuda::create(kQHeads, kKvHeads, kHeadDim, tokens, s);
  if (!bench.check(exact.status())) return;
  const double median = bench.time_iterations([&] {
    return (*exact)->search(queries, keys, 0, tokens, k, GqaAggregation::kSoftmaxSum, out, s);
  });
  set_search_counters(state, median, 2.0 * tokens * kKvHeads * kHeadDim);
  state.SetLabel("bf16 keys, cuBLAS");
}

// Args: m, bits, tokens.
void BM_OriginalDataPath(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const int m = static_cast<int>(state.range(0));
  const int ksub = 1 << state.range(1);
  const int64_t tokens = state.range(2);
  const int64_t k = top_k_of(tokens);
  cudaStream_t s = bench.stream();
  const int64_t n_codes = int64_t{kKvHeads} * tokens * m;
  std::vector<int64_t> host(static_cast<size_t>(n_codes));  // pageable, as the original
  std::mt19937_64 rng(5);
  for (auto& c : host)
    c = static_cast<int64_t>(rng() % ksub);
  auto* codes = bench.alloc<int64_t>(n_codes);
  auto* centroids = bench.alloc<float>(int64_t{kKvHeads} * ksub * kHeadDim);
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  auto ws = index::cuda::SearchWorkspace::allocate(kKvHeads, m, ksub, tokens, s);
  if (!bench.check(ws.status())) return;
  if (!bench.check(index::cuda::fill_random(centroids, DType::kF32,
                                            int64_t{kKvHeads} * ksub * kHeadDim, 2, 1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  index::cuda::PqSearchArgs args;
  args.shape = {kQHeads, kKvHeads, kHeadDim, m, ksub};
  args.queries = queries;
  args.query_dtype = DType::kBF16;
  args.centroids = centroids;
  args.codes_int64 = codes;
  args.head_stride = tokens * m;
  args.request = {0, tokens, k, GqaAggregation::kSoftmaxSum, out};
  const double median = bench.time_iterations([&]() -> Status {
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(codes, host.data(), n_codes * sizeof(int64_t), cudaMemcpyHostToDevice, s));
    return index::cuda::launch_pq_search(args, ws->view(), s);
  });
  set_search_counters(state, median, double(n_codes) * sizeof(int64_t));
  state.SetLabel("m=" + std::to_string(m) + ",b=" + std::to_string(state.range(1)) +
                 " int64 codes, pageable H2D + scan");
}

// Args: bits, tokens, path (0 one thread per token, 1 tensor cores in six
// kernels, 2 the fused persistent kernel), mode (0 stream, 1 graph).
void BM_SqSearch(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const int bits = static_cast<int>(state.range(0));
  const int64_t tokens = state.range(1);
  const int path = static_cast<int>(state.range(2));
  const bool tensor_cores = path >= 1;
  const bool graph = state.range(3) == 1;
  const int64_t k = top_k_of(tokens);
  const int64_t code_size = int64_t{kHeadDim} * bits / 8;
  cudaStream_t s = bench.stream();
  auto* codes = bench.alloc<uint8_t>(int64_t{kKvHeads} * tokens * code_size);
  auto* scale = bench.alloc<float>(int64_t{kKvHeads} * kHeadDim);
  auto* offset = bench.alloc<float>(int64_t{kKvHeads} * kHeadDim);
  auto* tables = bench.alloc<float>(int64_t{kQHeads} * (kHeadDim + 1));
  auto* queries = bench.alloc<uint16_t>(int64_t{kQHeads} * kHeadDim);
  auto* out = bench.alloc<int32_t>(int64_t{kKvHeads} * k);
  if (!bench.ok()) return;
  auto ws = index::cuda::SearchWorkspace::allocate(kKvHeads, 1, 1, tokens, s);
  if (!bench.check(ws.status())) return;
  if (!bench.check(index::cuda::fill_random_codes(codes, int64_t{kKvHeads} * tokens * code_size,
                                                  256, 1, s)) ||
      !bench.check(
          index::cuda::fill_random(scale, DType::kF32, int64_t{kKvHeads} * kHeadDim, 2, 0.1f, s)) ||
      !bench.check(index::cuda::fill_random(offset, DType::kF32, int64_t{kKvHeads} * kHeadDim, 4,
                                            1.0f, s)) ||
      !bench.check(index::cuda::fill_random(queries, DType::kBF16, int64_t{kQHeads} * kHeadDim, 3,
                                            1.0f, s))) {
    return;
  }
  index::cuda::SqSearchArgs args;
  args.shape = {kQHeads, kKvHeads, kHeadDim, 1, 1};
  args.bits = bits;
  args.queries = queries;
  args.query_dtype = DType::kBF16;
  args.scale = scale;
  args.offset = offset;
  args.codes = codes;
  args.head_stride = tokens * code_size;
  args.tables = tables;
  args.request = {0, tokens, k, GqaAggregation::kSoftmaxSum, out};
  args.tensor_cores = tensor_cores;
  args.fused = path == 2;
  const auto search = [&] { return index::cuda::launch_sq_search(args, ws->view(), s); };
  const double median = bench.time_search(graph, search);
  set_search_counters(state, median, double(kKvHeads) * tokens * code_size);
  if (path == 2) state.counters["candidates"] = mean_candidates(bench, ws->view(), search);
  const char* names[] = {" per thread", " tensor cores, six kernels", " tensor cores, fused"};
  state.SetLabel("int" + std::to_string(bits) + names[path] + (graph ? ", graph" : ""));
}

// Args: backend (0 GPU, 1 CPU/Faiss).
void BM_IndexBuild(benchmark::State& state) {
  GpuBench bench(state);
  if (!bench.ok()) return;
  const bool gpu = state.range(0) == 0;
  constexpr int64_t kTokens = 131072;
  PqConfig config = PqConfig::pqcache();  // m=2, b=6; default iterations and sampling
  const index::PqShape shape = index::PqShape::from_config(kHeadDim, config);
  cudaStream_t s = bench.stream();
  const int64_t n = kTokens * kKvHeads * kHeadDim;
  auto* keys = bench.alloc<uint16_t>(n);
  if (!bench.ok() || !bench.check(index::cuda::fill_random(keys, DType::kBF16, n, 6, 1.0f, s))) {
    return;
  }
  double objective = 0;
  const auto record_objective = [&](const index::LayerIndex& idx) {
    auto cb = idx.codebook();
    if (!bench.check(cb.status())) return;
    objective = 0;
    for (double o : cb->objective)
      objective += o;
  };
  if (gpu) {
    const TensorView view(keys, DType::kBF16, Device::cuda(0), {kTokens, kKvHeads, kHeadDim});
    std::unique_ptr<index::LayerIndexCuda> idx;
    const auto build = [&]() -> Status {
      PQKV_RETURN_IF_ERROR(idx->train(view, config, Stream::cuda(s)));
      PQKV_RETURN_IF_ERROR(idx->add(view, Stream::cuda(s)));
      return idx->wait_ready(s);
    };
    // A fresh index with room for the tokens, made before the clock starts.
    const auto fresh = [&]() -> Status {
      idx.reset();
      PQKV_ASSIGN_OR_RETURN(idx, index::LayerIndexCuda::create(Device::cuda(0), shape, kKvHeads));
      PQKV_RETURN_IF_ERROR(idx->reserve(kTokens, Stream::cuda(s)));
      return cuda_status(cudaEventSynchronize(idx->ready_event()), "ready", __FILE__, __LINE__);
    };
    const double median = bench.time_iterations(build, fresh);
    if (idx != nullptr) record_objective(*idx);
    state.counters["median_ms"] = median * 1e3;
    state.SetLabel("GPU k-means + encode, " + std::to_string(config.kmeans_iters) + " iters");
  } else {
    std::vector<uint16_t> half(static_cast<size_t>(n));
    if (!bench.check(cudaMemcpy(half.data(), keys, n * 2, cudaMemcpyDeviceToHost), "copy")) return;
    std::vector<float> host(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      host[i] = bf16_to_float(half[i]);
    const TensorView view = host_view(host.data(), {kTokens, kKvHeads, kHeadDim});
    for (auto _ : state) {
      const auto start = std::chrono::steady_clock::now();
      auto idx = index::make_layer_index(Device::cpu(), shape, kKvHeads);
      if (!bench.check(idx.status()) || !bench.check((*idx)->train(view, config, Stream::host())) ||
          !bench.check((*idx)->add(view, Stream::host()))) {
        break;
      }
      state.SetIterationTime(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      record_objective(**idx);
    }
    state.SetLabel("CPU backend (Faiss k-means) + encode, " + std::to_string(config.kmeans_iters) +
                   " iters");
  }
  state.counters["objective"] = objective;
}

void search_args(benchmark::internal::Benchmark* b) {
  for (const auto& [m, bits] : {std::pair{2, 6}, std::pair{4, 8}}) {
    for (int64_t tokens : {32768, 131072, 524288, 1048576}) {
      for (int mode : {0, 1}) {
        for (int path : {0, 1})
          b->Args({m, bits, tokens, mode, path});
      }
    }
  }
}

BENCHMARK(BM_PqSearch)
    ->Apply(search_args)
    ->ArgNames({"m", "b", "tokens", "graph", "path"})
    ->UseManualTime()
    ->Iterations(200)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_IndexSearch)
    ->ArgNames({"m", "b", "tokens"})
    ->Args({2, 6, 131072})
    ->Args({4, 8, 131072})
    ->UseManualTime()
    ->Iterations(200)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TwoStageSearch)
    ->ArgNames({"selection", "tokens"})
    ->ArgsProduct({{0, 1, 2, 3}, {32768, 131072}})
    ->UseManualTime()
    ->Iterations(100)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SqSearch)
    ->ArgNames({"bits", "tokens", "path", "graph"})
    ->ArgsProduct({{4, 8}, {8192, 32768, 131072, 524288, 1048576}, {0, 1, 2}, {0}})
    ->ArgsProduct({{4}, {8192, 32768, 131072}, {1, 2}, {1}})
    ->UseManualTime()
    ->Iterations(100)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ExactSearch)
    ->ArgNames({"tokens"})
    ->Arg(32768)
    ->Arg(131072)
    ->Arg(524288)
    ->Arg(1048576)
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_OriginalDataPath)
    ->ArgNames({"m", "b", "tokens"})
    ->Args({2, 6, 32768})
    ->Args({2, 6, 131072})
    ->Args({2, 6, 524288})
    ->Args({2, 6, 1048576})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_IndexBuild)
    ->ArgNames({"cpu"})
    ->Arg(0)
    ->UseManualTime()
    ->Iterations(5)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_IndexBuild)
    ->ArgNames({"cpu"})
    ->Arg(1)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace pqkv::tools
#endif  // PQKV_HAVE_CUDA
