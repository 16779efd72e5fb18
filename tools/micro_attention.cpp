// Micro-benchmarks of a decode step's GPU data path, run by `pqkv micro`.
//
// GPU work is timed with CUDA events (manual time) after warm-up, on random
// non-zero data; inputs rotate among several copies so that repeated runs read
// memory, not the 50 MB L2.
//
//   BM_GatherRows              the row gather kernel: 10% of a 128K-token
//                              context, 8 KV heads, random positions, rows of
//                              128, 256 or 512 B in pinned mapped host memory.
//                              Counters: GB/s and its ratio to 55 GB/s (PCIe).
//   BM_GatherRowsHostBaseline  the same rows gathered on the host into a
//                              pinned staging buffer, then one cudaMemcpyAsync
//                              per layer (the original method); host clock.
//   BM_SparseAttention         decode attention over the gathered rows,
//                              Llama-3.1-8B geometry (32 q heads, 8 KV heads,
//                              d = 128, bf16), budgets of 5% and 10% of 32K,
//                              128K and 512K tokens; launched on a stream
//                              (graph:0) or replayed from a CUDA graph
//                              (graph:1). Counters: the HBM floor (row bytes
//                              / 3.0 TB/s) and time over it.
//   BM_FullAttention           exact attention over a whole layer resident on
//                              the GPU, 32K and 128K tokens.
#if PQKV_HAVE_CUDA

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "attention/cuda/decode_attention.cuh"
#include "attention/cuda/gather_rows.cuh"
#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#include "pqkv/device.h"
#include "storage/block_arena.h"
#include "storage/cuda/device_row_table.h"
#include "storage/kv_row_store.h"

namespace pqkv::tools {
namespace {

using attention::cuda::DecodeAttentionArgs;
using attention::cuda::DecodeAttentionShape;
using storage::DeviceRowTable;

constexpr double kPcieBytesPerSecond = 55e9;
constexpr double kHbmBytesPerSecond = 3.0e12;
constexpr int64_t kGatherContext = 128 * 1024;
constexpr int kGatherKvHeads = 8;
constexpr int kWarmup = 3;
// Rotating copies of the inputs add up to at least this, five times the L2.
constexpr int64_t kRotationBytes = 256LL << 20;
// Attention launches per timed iteration, at least: a few microseconds each,
// so one event pair around several keeps the events' resolution out of the
// number.
constexpr int kLaunchesPerIteration = 10;

// Skips the benchmark with the status's message when it is an error.
#define PQKV_CUDA_STATUS(expr) ::pqkv::cuda_status((expr), #expr, __FILE__, __LINE__)
bool failed(benchmark::State& state, const Status& s) {
  if (s.ok()) return false;
  state.SkipWithError(s.to_string().c_str());
  return true;
}
#define PQKV_BENCH_CHECK(state, expr) \
  if (failed(state, (expr))) return

// Random non-zero bf16 values: magnitude in [2^-4, 2), either sign.
void fill_bf16(uint16_t* out, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const uint32_t exponent = 123 + static_cast<uint32_t>((x >> 8) % 5);  // 2^-4 .. 2^0
    out[i] = static_cast<uint16_t>(((x & 1) << 15) | (exponent << 7) | ((x >> 16) & 0x7f));
  }
}

// Random bf16 device memory of `bytes` bytes.
Result<gpu::DeviceBuffer> random_device_bf16(size_t bytes, uint64_t seed) {
  std::vector<uint16_t> host(bytes / 2);
  fill_bf16(host.data(), host.size(), seed);
  PQKV_ASSIGN_OR_RETURN(gpu::DeviceBuffer buf, gpu::DeviceBuffer::allocate(bytes));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(buf.data(), host.data(), bytes, cudaMemcpyHostToDevice));
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());  // the timed stream does not wait for it
  return Result<gpu::DeviceBuffer>(std::move(buf));
}

// A stream and an event pair; time() runs `enqueue` between the events.
class GpuTimer {
 public:
  static Result<GpuTimer> create() {
    GpuTimer t;
    PQKV_ASSIGN_OR_RETURN(t.stream_, gpu::make_stream());
    PQKV_ASSIGN_OR_RETURN(t.start_, gpu::make_timing_event());
    PQKV_ASSIGN_OR_RETURN(t.stop_, gpu::make_timing_event());
    return Result<GpuTimer>(std::move(t));
  }
  cudaStream_t stream() const { return stream_.get(); }

  template <class F>
  Result<double> time_seconds(F&& enqueue) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_.get(), stream_.get()));
    PQKV_RETURN_IF_ERROR(enqueue());
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_.get(), stream_.get()));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_.get()));
    float ms = 0;
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start_.get(), stop_.get()));
    return ms * 1e-3;
  }

 private:
  gpu::StreamHandle stream_;
  gpu::EventHandle start_;
  gpu::EventHandle stop_;
};

// One layer of a 128K-token context in pinned mapped blocks (bf16 rows of
// `row_bytes`), its device row table, and rotating sets of random positions
// for 10% of the context per KV head.
struct GatherFixture {
  static constexpr int kPositionSets = 4;
  std::unique_ptr<storage::KvRowStore> kv;
  std::unique_ptr<DeviceRowTable> table;
  int64_t tokens = kGatherContext / 10;
  std::vector<std::vector<int32_t>> positions;  // host, per set: [kv_heads, tokens]
  std::vector<gpu::DeviceBuffer> device_positions;

  int64_t bytes() const { return tokens * kGatherKvHeads * kv->spec().row_bytes(); }
};

Result<GatherFixture*> gather_fixture(int64_t row_bytes) {
  static std::map<int64_t, std::unique_ptr<GatherFixture>> cache;
  if (auto it = cache.find(row_bytes); it != cache.end()) return it->second.get();
  ModelSpec spec;
  spec.name = "gather";
  spec.num_layers = 1;
  spec.num_kv_heads = kGatherKvHeads;
  spec.num_q_heads = kGatherKvHeads;
  spec.head_dim = static_cast<int>(row_bytes / 4);
  spec.dtype = DType::kBF16;
  auto f = std::make_unique<GatherFixture>();
  PQKV_ASSIGN_OR_RETURN(auto arena,
                        storage::BlockArena::pinned(storage::KvRowStore::block_bytes(spec)));
  f->kv = std::make_unique<storage::KvRowStore>(spec, std::move(arena));
  const int64_t chunk = storage::KvRowStore::kTokensPerBlock;
  std::vector<uint16_t> k(chunk * spec.num_kv_heads * spec.head_dim);
  std::vector<uint16_t> v(k.size());
  for (int64_t t = 0; t < kGatherContext; t += chunk) {
    fill_bf16(k.data(), k.size(), 2 * t + 1);
    fill_bf16(v.data(), v.size(), 2 * t + 2);
    const std::initializer_list<int64_t> shape = {chunk, spec.num_kv_heads, spec.head_dim};
    PQKV_RETURN_IF_ERROR(f->kv->append(0, TensorView(k.data(), DType::kBF16, Device::cpu(), shape),
                                       TensorView(v.data(), DType::kBF16, Device::cpu(), shape)));
  }
  PQKV_ASSIGN_OR_RETURN(DeviceRowTable table, DeviceRowTable::create(*f->kv, 0, kGatherContext));
  f->table = std::make_unique<DeviceRowTable>(std::move(table));
  PQKV_RETURN_IF_ERROR(f->table->update(nullptr));
  std::mt19937_64 rng(row_bytes);
  std::vector<int32_t> all(kGatherContext);
  for (int s = 0; s < GatherFixture::kPositionSets; ++s) {
    std::vector<int32_t> set;
    for (int h = 0; h < kGatherKvHeads; ++h) {
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      set.insert(set.end(), all.begin(), all.begin() + f->tokens);
    }
    PQKV_ASSIGN_OR_RETURN(gpu::DeviceBuffer d,
                          gpu::DeviceBuffer::allocate(set.size() * sizeof(int32_t)));
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(d.data(), set.data(), set.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    f->positions.push_back(std::move(set));
    f->device_positions.push_back(std::move(d));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return (cache[row_bytes] = std::move(f)).get();
}

void set_pcie_counters(benchmark::State& state, double bytes, double seconds) {
  const double rate = bytes / seconds;
  state.counters["MB"] = bytes / 1e6;
  state.counters["GB_per_s"] = rate / 1e9;
  state.counters["of_55GBps"] = rate / kPcieBytesPerSecond;
}

void BM_GatherRows(benchmark::State& state) {
  if (cuda_device_count() == 0) return state.SkipWithError("no CUDA device");
  auto fixture = gather_fixture(state.range(0));
  PQKV_BENCH_CHECK(state, fixture.status());
  GatherFixture& f = *fixture.value();
  auto timer = GpuTimer::create();
  PQKV_BENCH_CHECK(state, timer.status());
  auto out = gpu::DeviceBuffer::allocate(f.bytes());
  PQKV_BENCH_CHECK(state, out.status());

  int next = 0;
  auto gather = [&]() {
    const auto& positions = f.device_positions[next++ % GatherFixture::kPositionSets];
    attention::cuda::GatherRowsArgs args;
    args.table = f.table->view();
    args.positions = positions.as<int32_t>();
    args.tokens = f.tokens;
    args.out = out->as<std::byte>();
    return attention::cuda::launch_gather_rows(args, timer->stream());
  };
  for (int i = 0; i < kWarmup; ++i)
    PQKV_BENCH_CHECK(state, timer->time_seconds(gather).status());
  double total = 0;
  for (auto _ : state) {
    auto seconds = timer->time_seconds(gather);
    PQKV_BENCH_CHECK(state, seconds.status());
    state.SetIterationTime(*seconds);
    total += *seconds;
  }
  set_pcie_counters(state, static_cast<double>(f.bytes()), total / state.iterations());
}

void BM_GatherRowsHostBaseline(benchmark::State& state) {
  if (cuda_device_count() == 0) return state.SkipWithError("no CUDA device");
  auto fixture = gather_fixture(state.range(0));
  PQKV_BENCH_CHECK(state, fixture.status());
  GatherFixture& f = *fixture.value();
  auto timer = GpuTimer::create();
  PQKV_BENCH_CHECK(state, timer.status());
  auto staging = gpu::PinnedBuffer::allocate(f.bytes());
  PQKV_BENCH_CHECK(state, staging.status());
  auto out = gpu::DeviceBuffer::allocate(f.bytes());
  PQKV_BENCH_CHECK(state, out.status());
  const int64_t row = f.kv->spec().row_bytes();
  const int64_t rows = f.tokens * kGatherKvHeads;

  int next = 0;
  using Clock = std::chrono::steady_clock;
  double gather_total = 0;
  double total = 0;
  auto step = [&]() -> Status {
    const auto& positions = f.positions[next++ % GatherFixture::kPositionSets];
    const auto t0 = Clock::now();
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, rows, 1024), [&](const auto& r) {
      for (int64_t i = r.begin(); i < r.end(); ++i) {
        const int head = static_cast<int>(i / f.tokens);
        std::memcpy(staging->as<std::byte>() + i * row, f.kv->row(0, head, positions[i]), row);
      }
    });
    const auto t1 = Clock::now();
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->data(), staging->data(), f.bytes(),
                                              cudaMemcpyHostToDevice, timer->stream()));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(timer->stream()));
    gather_total += std::chrono::duration<double>(t1 - t0).count();
    total += std::chrono::duration<double>(Clock::now() - t0).count();
    return ok_status();
  };
  for (int i = 0; i < kWarmup; ++i)
    PQKV_BENCH_CHECK(state, step());
  gather_total = total = 0;
  for (auto _ : state) {
    const double before = total;
    PQKV_BENCH_CHECK(state, step());
    state.SetIterationTime(total - before);
  }
  const double iterations = static_cast<double>(state.iterations());
  set_pcie_counters(state, static_cast<double>(f.bytes()), total / iterations);
  state.counters["host_gather_us"] = gather_total / iterations * 1e6;
  state.counters["copy_us"] = (total - gather_total) / iterations * 1e6;
}

// Times `launch(set)` over rotating input sets, max(sets, 10) launches per
// timed iteration, enqueued one by one on the stream or (graph) replayed as
// one captured CUDA graph; sets the HBM counters for `bytes` read per launch.
template <class Launch>
void time_attention(benchmark::State& state, GpuTimer& timer, int sets, bool graph, double bytes,
                    Launch&& launch) {
  const int launches = std::max(kLaunchesPerIteration, sets);
  auto batch = [&]() -> Status {
    for (int i = 0; i < launches; ++i)
      PQKV_RETURN_IF_ERROR(launch(i % sets));
    return ok_status();
  };
  gpu::GraphHandle captured;
  gpu::GraphExecHandle exec;
  if (graph) {
    cudaGraph_t g = nullptr;
    PQKV_BENCH_CHECK(state, PQKV_CUDA_STATUS(cudaStreamBeginCapture(
                                timer.stream(), cudaStreamCaptureModeThreadLocal)));
    const Status enqueued = batch();
    PQKV_BENCH_CHECK(state, PQKV_CUDA_STATUS(cudaStreamEndCapture(timer.stream(), &g)));
    captured = gpu::GraphHandle(g);
    PQKV_BENCH_CHECK(state, enqueued);
    cudaGraphExec_t e = nullptr;
    PQKV_BENCH_CHECK(state, PQKV_CUDA_STATUS(cudaGraphInstantiate(&e, captured.get(), 0)));
    exec = gpu::GraphExecHandle(e);
  }
  auto run = [&]() -> Status {
    if (!graph) return batch();
    PQKV_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec.get(), timer.stream()));
    return ok_status();
  };
  for (int i = 0; i < kWarmup; ++i)
    PQKV_BENCH_CHECK(state, timer.time_seconds(run).status());
  double total = 0;
  for (auto _ : state) {
    auto seconds = timer.time_seconds(run);
    PQKV_BENCH_CHECK(state, seconds.status());
    state.SetIterationTime(*seconds / launches);
    total += *seconds / launches;
  }
  const double per_launch = total / state.iterations();
  const double floor = bytes / kHbmBytesPerSecond;
  state.counters["rows_MB"] = bytes / 1e6;
  state.counters["floor_us"] = floor * 1e6;
  state.counters["x_floor"] = per_launch / floor;
  state.counters["TB_per_s"] = bytes / per_launch / 1e12;
}

// Device inputs of one attention benchmark: `sets` copies of the rows
// ([kv_heads, stride, row] each), queries, output and workspace.
struct AttentionInputs {
  gpu::DeviceBuffer rows;
  gpu::DeviceBuffer queries;
  gpu::DeviceBuffer out;
  gpu::DeviceBuffer workspace;
  int sets = 0;
  size_t set_bytes = 0;

  static Result<AttentionInputs> create(const DecodeAttentionShape& shape) {
    AttentionInputs in;
    in.set_bytes = static_cast<size_t>(shape.kv_heads) * shape.stride() * shape.row_bytes();
    in.sets = static_cast<int>(
        std::clamp<int64_t>((kRotationBytes + static_cast<int64_t>(in.set_bytes) - 1) /
                                static_cast<int64_t>(in.set_bytes),
                            1, 64));
    const size_t head_bytes = static_cast<size_t>(shape.q_heads) * shape.head_dim;
    PQKV_ASSIGN_OR_RETURN(in.rows, random_device_bf16(in.set_bytes * in.sets, 1));
    PQKV_ASSIGN_OR_RETURN(in.queries, random_device_bf16(head_bytes * 2, 2));
    PQKV_ASSIGN_OR_RETURN(in.out,
                          gpu::DeviceBuffer::allocate(head_bytes * dtype_size(shape.out_dtype)));
    PQKV_ASSIGN_OR_RETURN(
        in.workspace,
        gpu::DeviceBuffer::allocate(attention::cuda::decode_attention_workspace_bytes(shape)));
    return Result<AttentionInputs>(std::move(in));
  }

  DecodeAttentionArgs args(const DecodeAttentionShape& shape, int set) const {
    DecodeAttentionArgs a;
    a.shape = shape;
    a.rows = rows.as<std::byte>() + set * set_bytes;
    a.queries = queries.data();
    a.out = out.data();
    a.workspace = workspace.data();
    a.workspace_bytes = workspace.bytes();
    return a;
  }
};

DecodeAttentionShape llama_shape(int64_t tokens) {
  DecodeAttentionShape shape = DecodeAttentionShape::from_spec(ModelSpec::llama31_8b(), tokens);
  shape.query_dtype = DType::kBF16;
  shape.out_dtype = DType::kBF16;
  return shape;
}

// Attention over `tokens` rows per KV head: the gathered rows of a sparse
// step, or (full) a whole layer through launch_full_attention.
void run_attention(benchmark::State& state, int64_t tokens, bool full, bool graph) {
  if (cuda_device_count() == 0) return state.SkipWithError("no CUDA device");
  const DecodeAttentionShape shape = llama_shape(tokens);
  auto timer = GpuTimer::create();
  PQKV_BENCH_CHECK(state, timer.status());
  auto inputs = AttentionInputs::create(shape);
  PQKV_BENCH_CHECK(state, inputs.status());
  const double bytes = static_cast<double>(shape.kv_heads) * shape.tokens * shape.row_bytes();
  time_attention(state, *timer, inputs->sets, graph, bytes, [&](int set) {
    const DecodeAttentionArgs a = inputs->args(shape, set);
    if (!full) return attention::cuda::launch_decode_attention(a, timer->stream());
    attention::cuda::FullAttentionArgs f;
    f.spec = ModelSpec::llama31_8b();
    f.layer_rows = a.rows;
    f.capacity = tokens;
    f.context = tokens;
    f.query_dtype = shape.query_dtype;
    f.out_dtype = shape.out_dtype;
    f.queries = a.queries;
    f.out = a.out;
    f.workspace = a.workspace;
    f.workspace_bytes = a.workspace_bytes;
    return attention::cuda::launch_full_attention(f, timer->stream());
  });
  state.counters["tokens"] = static_cast<double>(tokens);
}

void BM_SparseAttention(benchmark::State& state) {
  run_attention(state, state.range(0) * state.range(1) / 100, false, state.range(2) != 0);
}

void BM_FullAttention(benchmark::State& state) {
  run_attention(state, state.range(0), true, state.range(1) != 0);
}

BENCHMARK(BM_GatherRows)
    ->ArgName("row_bytes")
    ->Arg(128)
    ->Arg(256)
    ->Arg(512)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_GatherRowsHostBaseline)
    ->ArgName("row_bytes")
    ->Arg(128)
    ->Arg(256)
    ->Arg(512)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SparseAttention)
    ->ArgNames({"context", "budget_pct", "graph"})
    ->ArgsProduct({{32768, 131072, 524288}, {5, 10}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FullAttention)
    ->ArgNames({"context", "graph"})
    ->ArgsProduct({{32768, 131072}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace pqkv::tools

#endif  // PQKV_HAVE_CUDA
