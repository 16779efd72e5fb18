#include "tools/bench_graph.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "pqkv/store.h"
#include "tools/progress.h"
#include "workload/synthetic_workload.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#endif

namespace pqkv::tools {

#if PQKV_HAVE_CUDA
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kWarmup = 3;

// Device buffers of one layer's captured step.
struct LayerBuffers {
  gpu::DeviceBuffer keys, values, out;
  float* queries = nullptr;  // [q_heads, head_dim] in the run's query buffer
};

}  // namespace

Result<double> time_graph_replays(cudaGraphExec_t exec, cudaStream_t stream, int warmup,
                                  int replays) {
  for (int i = 0; i < warmup; ++i)
    PQKV_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream));
  PQKV_ASSIGN_OR_RETURN(auto start, gpu::make_timing_event());
  PQKV_ASSIGN_OR_RETURN(auto stop, gpu::make_timing_event());
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), stream));
  for (int i = 0; i < replays; ++i)
    PQKV_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop.get()));
  float ms = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return 1000.0 * ms / std::max(replays, 1);
}

Result<GraphReport> run_graph_bench(const BenchConfig& config, bool progress) {
  PQKV_RETURN_IF_ERROR(check_bench_config(config));
  if (!config.device.is_cuda()) {
    return Status::invalid_argument("--graph replays a CUDA graph: pass --backend cuda");
  }
  const ModelSpec& spec = config.spec;
  const int layers = spec.num_layers;
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  const int64_t qsize = int64_t{spec.num_q_heads} * spec.head_dim;
  workload::WorkloadOptions wo;
  wo.seed = config.seed;
  wo.prompt_tokens = config.context;
  PQKV_ASSIGN_OR_RETURN(auto wl, workload::SyntheticWorkload::create(spec, wo));

  PQKV_ASSIGN_OR_RETURN(auto store, Store::open(bench_store_options(config)));
  const SequenceOptions seq_options = first_sequence_options(config);
  PQKV_ASSIGN_OR_RETURN(auto seq, store->create_sequence("graph", seq_options));
  {
    Progress bar(progress ? "prefilling" : "", progress ? layers : 0);
    std::vector<float> keys(static_cast<size_t>(config.context * row));
    std::vector<float> values(keys.size());
    for (int l = 0; l < layers; ++l) {
      PQKV_RETURN_IF_ERROR(wl.keys(l, 0, config.context, keys.data()));
      PQKV_RETURN_IF_ERROR(wl.values(l, 0, config.context, values.data()));
      PQKV_RETURN_IF_ERROR(
          seq->append(l, host_view(keys.data(), {config.context, spec.num_kv_heads, spec.head_dim}),
                      host_view(values.data(), {config.context, spec.num_kv_heads, spec.head_dim}),
                      Stream::host()));
      if (progress) bar.tick();
    }
  }
  PQKV_RETURN_IF_ERROR(seq->finish_prefill());
  const int replays = kWarmup + config.steps;
  PQKV_RETURN_IF_ERROR(seq->reserve(config.context + replays));

  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config.device));
  PQKV_ASSIGN_OR_RETURN(auto stream, gpu::make_stream());
  const cudaStream_t s = stream.get();
  // One token of the workload in every captured buffer: its values do not
  // change the work a step does.
  std::vector<LayerBuffers> buffers(layers);
  std::vector<float> k(row), v(row), q(qsize);
  // Every layer's queries in one buffer, so a replay's queries are one copy.
  gpu::DeviceBuffer queries;
  PQKV_RETURN_IF_ERROR(queries.reserve(static_cast<size_t>(layers * qsize) * sizeof(float)));
  for (int l = 0; l < layers; ++l) {
    PQKV_RETURN_IF_ERROR(wl.keys(l, config.context, config.context + 1, k.data()));
    PQKV_RETURN_IF_ERROR(wl.values(l, config.context, config.context + 1, v.data()));
    PQKV_RETURN_IF_ERROR(wl.query(l, config.context, q.data()));
    LayerBuffers& b = buffers[l];
    PQKV_RETURN_IF_ERROR(b.keys.reserve(row * sizeof(float)));
    PQKV_RETURN_IF_ERROR(b.values.reserve(row * sizeof(float)));
    b.queries = queries.as<float>() + l * qsize;
    PQKV_RETURN_IF_ERROR(b.out.reserve(qsize * sizeof(float)));
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(b.keys.data(), k.data(), row * sizeof(float), cudaMemcpyHostToDevice));
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(b.values.data(), v.data(), row * sizeof(float), cudaMemcpyHostToDevice));
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(b.queries, q.data(), qsize * sizeof(float), cudaMemcpyHostToDevice));
  }

  GraphReport report;
  report.config = config;
  const Device dev = config.device;
  const auto t_capture = Clock::now();
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  Status captured = ok_status();
  for (int l = 0; l < layers && captured.ok(); ++l) {
    LayerBuffers& b = buffers[l];
    captured = seq->append(
        l, TensorView(b.keys.data(), DType::kF32, dev, {1, spec.num_kv_heads, spec.head_dim}),
        TensorView(b.values.data(), DType::kF32, dev, {1, spec.num_kv_heads, spec.head_dim}),
        Stream::cuda(s));
    if (captured.ok()) {
      captured =
          seq->attend(l, TensorView(b.queries, DType::kF32, dev, {spec.num_q_heads, spec.head_dim}),
                      TensorView(b.out.data(), DType::kF32, dev, {spec.num_q_heads, spec.head_dim}),
                      Stream::cuda(s));
    }
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(s, &graph);
  std::unique_ptr<CUgraph_st, decltype(&cudaGraphDestroy)> graph_owner(graph, cudaGraphDestroy);
  PQKV_RETURN_IF_ERROR(captured);
  PQKV_CUDA_RETURN_IF_ERROR(ended);
  cudaGraphExec_t exec = nullptr;
  // Node priorities kept: the hot rows' policy runs on a stream of the greatest priority.
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaGraphInstantiate(&exec, graph, cudaGraphInstantiateFlagUseNodePriority));
  std::unique_ptr<CUgraphExec_st, decltype(&cudaGraphExecDestroy)> exec_owner(exec,
                                                                              cudaGraphExecDestroy);
  report.capture_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_capture).count();

  if (config.vary_queries) {
    // The queries of every replay's step, pinned, copied before each replay.
    const size_t step_floats = static_cast<size_t>(layers * qsize);
    gpu::PinnedBuffer all;
    PQKV_RETURN_IF_ERROR(all.reserve(step_floats * replays * sizeof(float)));
    for (int i = 0; i < replays; ++i) {
      for (int l = 0; l < layers; ++l)
        PQKV_RETURN_IF_ERROR(
            wl.query(l, config.context + i, all.as<float>() + i * step_floats + l * qsize));
    }
    const auto launch = [&](int i) -> Status {
      PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(queries.data(), all.as<float>() + i * step_floats,
                                                step_floats * sizeof(float), cudaMemcpyHostToDevice,
                                                s));
      PQKV_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, s));
      return ok_status();
    };
    for (int i = 0; i < kWarmup; ++i)
      PQKV_RETURN_IF_ERROR(launch(i));
    PQKV_ASSIGN_OR_RETURN(auto start, gpu::make_timing_event());
    PQKV_ASSIGN_OR_RETURN(auto stop, gpu::make_timing_event());
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), s));
    for (int i = kWarmup; i < replays; ++i)
      PQKV_RETURN_IF_ERROR(launch(i));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), s));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop.get()));
    float ms = 0;
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    report.us_per_token = 1000.0 * ms / std::max(config.steps, 1);
  } else {
    PQKV_ASSIGN_OR_RETURN(report.us_per_token, time_graph_replays(exec, s, kWarmup, config.steps));
  }
  report.us_per_layer = report.us_per_token / layers;
  PQKV_RETURN_IF_ERROR(seq->sync_length(Stream::cuda(s)));
  PQKV_ASSIGN_OR_RETURN(report.attended_per_head, seq->max_selected(layers - 1));
  return report;
}

#else

Result<GraphReport> run_graph_bench(const BenchConfig&, bool) {
  return Status::unimplemented("--graph replays a CUDA graph; this pqkv was built without CUDA");
}

#endif

}  // namespace pqkv::tools
