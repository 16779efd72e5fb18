// Micro-benchmarks of the model runtime's prefill attention, run by
// `pqkv micro --benchmark_filter=Prefill`. One layer, one pass over the whole
// prompt, causal, random queries, keys and values of unit variance (fp32 activations,
// as the backends keep them).
//
//   BM_PrefillAttentionCpu    the CPU backend's blocked BLAS kernel (model/cpu),
//                             8 query heads, 2 KV heads, d = 64, 2K and 8K
//                             tokens; host clock.
//   BM_PrefillFlashAttention  the CUDA backend's bf16 tensor-core kernel,
//                             Llama-3.1-8B layer geometry (32 query heads,
//                             8 KV heads, d = 128), 8K, 32K and 128K tokens;
//                             CUDA events; the bf16 conversion of the keys
//                             and values included.
//   BM_PrefillAttentionFp32   the fp32 kernel of the CUDA backend (one block
//                             per query row), the same geometry, 8K tokens.
//
// Counter TFLOP/s: 4 * T^2/2 * q_heads * d (the causal half of QK^T and PV).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "model/cpu/cpu_ops.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#include "model/cuda/causal_attention.cuh"
#include "model/cuda/flash_attention.cuh"
#endif

namespace pqkv::tools {
namespace {

// Uniform floats of unit variance from a xorshift generator: fast enough to
// fill the 2 GB of a 128K-token layer.
std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (auto& f : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    f = (static_cast<float>(x >> 40) * 0x1p-24f - 0.5f) * 3.4641016f;  // [-sqrt 3, sqrt 3)
  }
  return v;
}

// Throughput of `iterations` causal passes that took `seconds` in all.
double tflops(int64_t tokens, int q_heads, int head_dim, int64_t iterations, double seconds) {
  const double flops =
      4.0 * static_cast<double>(tokens) * static_cast<double>(tokens) / 2.0 * q_heads * head_dim;
  return flops * static_cast<double>(iterations) / std::max(seconds, 1e-12) * 1e-12;
}

void BM_PrefillAttentionCpu(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  constexpr int kQ = 8;
  constexpr int kKv = 2;
  constexpr int kD = 64;
  const auto q = random_floats(tokens * kQ * kD, 1);
  const auto k = random_floats(tokens * kKv * kD, 2);
  const auto v = random_floats(tokens * kKv * kD, 3);
  std::vector<float> out(q.size());
  model::cpu::configure_cpu_blas();
  const model::cpu::AttentionArgs args{q.data(), nullptr, nullptr, k.data(), v.data(),  0,
                                       tokens,   kQ,      kKv,     kD,       out.data()};
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    model::cpu::causal_attention(args);
    benchmark::DoNotOptimize(out.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(s);
    seconds += s;
  }
  state.counters["TFLOP/s"] = tflops(tokens, kQ, kD, state.iterations(), seconds);
}
BENCHMARK(BM_PrefillAttentionCpu)
    ->Arg(2048)
    ->Arg(8192)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

#if PQKV_HAVE_CUDA

bool failed(benchmark::State& state, const Status& s) {
  if (s.ok()) return false;
  state.SkipWithError(s.to_string().c_str());
  return true;
}

Result<gpu::DeviceBuffer> device_normal(size_t n, uint64_t seed) {
  const auto host = random_floats(n, seed);
  PQKV_ASSIGN_OR_RETURN(gpu::DeviceBuffer buf, gpu::DeviceBuffer::allocate(n * sizeof(float)));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(buf.data(), host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  return Result<gpu::DeviceBuffer>(std::move(buf));
}

// Llama-3.1-8B's attention geometry; `flash` picks the kernel.
void run_gpu_prefill(benchmark::State& state, bool flash) {
  if (cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int64_t tokens = state.range(0);
  constexpr int kQ = 32;
  constexpr int kKv = 8;
  constexpr int kD = 128;
  auto q = device_normal(tokens * kQ * kD, 1);
  auto k = device_normal(tokens * kKv * kD, 2);
  auto v = device_normal(tokens * kKv * kD, 3);
  auto out = gpu::DeviceBuffer::allocate(tokens * kQ * kD * sizeof(float));
  const model::cuda::AttentionArgs args{q.ok() ? q->as<float>() : nullptr,
                                        nullptr,
                                        nullptr,
                                        k.ok() ? k->as<float>() : nullptr,
                                        v.ok() ? v->as<float>() : nullptr,
                                        0,
                                        tokens,
                                        kQ,
                                        kKv,
                                        kD,
                                        out.ok() ? out->as<float>() : nullptr};
  auto workspace =
      gpu::DeviceBuffer::allocate(flash ? model::cuda::flash_attention_workspace_bytes(args) : 1);
  for (const Status& s : {q.status(), k.status(), v.status(), out.status(), workspace.status()}) {
    if (failed(state, s)) return;
  }
  auto stream = gpu::make_stream();
  auto start = gpu::make_timing_event();
  auto stop = gpu::make_timing_event();
  for (const Status& s : {stream.status(), start.status(), stop.status()}) {
    if (failed(state, s)) return;
  }
  const auto launch = [&] {
    return flash ? model::cuda::flash_attention(args, workspace->data(), workspace->bytes(),
                                                stream->get())
                 : model::cuda::causal_attention(args, stream->get());
  };
  const auto cuda_failed = [&](cudaError_t e, const char* what) {
    return failed(state, cuda_status(e, what, __FILE__, __LINE__));
  };
  if (failed(state, launch())) return;  // warm-up
  if (cuda_failed(cudaStreamSynchronize(stream->get()), "warm-up")) return;
  double seconds = 0;
  for (auto _ : state) {
    if (cuda_failed(cudaEventRecord(start->get(), stream->get()), "start event")) return;
    if (failed(state, launch())) return;
    if (cuda_failed(cudaEventRecord(stop->get(), stream->get()), "stop event")) return;
    if (cuda_failed(cudaEventSynchronize(stop->get()), "timing")) return;
    float ms = 0;
    if (cuda_failed(cudaEventElapsedTime(&ms, start->get(), stop->get()), "elapsed")) return;
    state.SetIterationTime(ms * 1e-3);
    seconds += ms * 1e-3;
  }
  state.counters["TFLOP/s"] = tflops(tokens, kQ, kD, state.iterations(), seconds);
}

void BM_PrefillFlashAttention(benchmark::State& state) {
  run_gpu_prefill(state, true);
}
void BM_PrefillAttentionFp32(benchmark::State& state) {
  run_gpu_prefill(state, false);
}
BENCHMARK(BM_PrefillFlashAttention)
    ->Arg(8192)
    ->Arg(32768)
    ->Arg(131072)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PrefillAttentionFp32)->Arg(8192)->UseManualTime()->Unit(benchmark::kMillisecond);

#endif  // PQKV_HAVE_CUDA

}  // namespace
}  // namespace pqkv::tools
