#include "tools/bench_batch.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>

#include "pqkv/store.h"
#include "tools/bench_graph.h"
#include "tools/progress.h"
#include "workload/quality_metrics.h"
#include "workload/synthetic_workload.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#endif

namespace pqkv::tools {
namespace {

using Clock = std::chrono::steady_clock;

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// Prompt length of sequence i: context x 1, 0.75, 0.5, 0.25, 1, ...
int64_t prompt_length(int64_t context, int i) {
  return std::max<int64_t>(1, context * (4 - i % 4) / 4);
}

#if PQKV_HAVE_CUDA
// The batched step of every layer captured once in a CUDA graph, with each
// sequence's query for its last position in device memory, then replayed:
// the device time of one layer's batched step (us), with the host's launch
// work of every sequence taken out.
Result<double> replay_batched_step(Store& store, const std::vector<std::shared_ptr<Sequence>>& seqs,
                                   workload::SyntheticWorkload& wl,
                                   const std::vector<int64_t>& lengths, const BenchConfig& config) {
  constexpr int kWarmup = 3;
  const ModelSpec& spec = config.spec;
  const int layers = spec.num_layers;
  const size_t batch = seqs.size();
  const int64_t qsize = int64_t{spec.num_q_heads} * spec.head_dim;
  const size_t bytes = sizeof(float) * static_cast<size_t>(qsize);
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config.device));
  PQKV_ASSIGN_OR_RETURN(auto stream, gpu::make_stream());
  const cudaStream_t s = stream.get();
  PQKV_ASSIGN_OR_RETURN(auto queries, gpu::DeviceBuffer::allocate(layers * batch * bytes));
  PQKV_ASSIGN_OR_RETURN(auto outs, gpu::DeviceBuffer::allocate(layers * batch * bytes));
  std::vector<float> q(static_cast<size_t>(qsize));
  std::vector<std::vector<SequenceStep>> steps(layers, std::vector<SequenceStep>(batch));
  for (int l = 0; l < layers; ++l) {
    for (size_t i = 0; i < batch; ++i) {
      PQKV_RETURN_IF_ERROR(wl.query(l, lengths[i] + config.steps - 1, q.data()));
      const size_t at = (static_cast<size_t>(l) * batch + i) * static_cast<size_t>(qsize);
      float* dq = queries.as<float>() + at;
      PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dq, q.data(), bytes, cudaMemcpyHostToDevice));
      steps[l][i] = {seqs[i].get(),
                     TensorView(dq, DType::kF32, config.device, {spec.num_q_heads, spec.head_dim}),
                     TensorView(outs.as<float>() + at, DType::kF32, config.device,
                                {spec.num_q_heads, spec.head_dim})};
    }
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  Status captured = ok_status();
  for (int l = 0; l < layers && captured.ok(); ++l)
    captured = store.attend(l, steps[l], Stream::cuda(s));
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(s, &graph);
  std::unique_ptr<CUgraph_st, decltype(&cudaGraphDestroy)> graph_owner(graph, cudaGraphDestroy);
  PQKV_RETURN_IF_ERROR(captured);
  PQKV_CUDA_RETURN_IF_ERROR(ended);
  cudaGraphExec_t exec = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaGraphInstantiate(&exec, graph, cudaGraphInstantiateFlagUseNodePriority));
  std::unique_ptr<CUgraphExec_st, decltype(&cudaGraphExecDestroy)> exec_owner(exec,
                                                                              cudaGraphExecDestroy);
  PQKV_ASSIGN_OR_RETURN(const double us, time_graph_replays(exec, s, kWarmup, config.steps));
  return us / layers;
}
#endif

}  // namespace

Result<BatchReport> run_batch_bench(const BenchConfig& config, int batch, bool progress) {
  PQKV_RETURN_IF_ERROR(check_bench_config(config));
  if (batch < 1) return Status::invalid_argument("--batch must be at least 1");
  const ModelSpec& spec = config.spec;
  const int layers = spec.num_layers;
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  workload::WorkloadOptions wo;
  wo.seed = config.seed;
  wo.prompt_tokens = config.context;
  PQKV_ASSIGN_OR_RETURN(auto wl, workload::SyntheticWorkload::create(spec, wo));
  const int64_t tokens = config.context + config.steps;
  std::vector<std::vector<float>> keys(layers), values(layers);
  for (int l = 0; l < layers; ++l) {
    keys[l].resize(static_cast<size_t>(tokens * row));
    values[l].resize(keys[l].size());
    PQKV_RETURN_IF_ERROR(wl.keys(l, 0, tokens, keys[l].data()));
    PQKV_RETURN_IF_ERROR(wl.values(l, 0, tokens, values[l].data()));
  }

  PQKV_ASSIGN_OR_RETURN(auto store, Store::open(bench_store_options(config)));
  const SequenceOptions seq_options = first_sequence_options(config);

  BatchReport report;
  report.config = config;
  report.batch = batch;
  std::vector<std::shared_ptr<Sequence>> seqs(batch);
  std::vector<int64_t> lengths(batch);
  {
    Progress bar(progress ? "prefilling the batch" : "", progress ? batch : 0);
    for (int i = 0; i < batch; ++i) {
      PQKV_ASSIGN_OR_RETURN(seqs[i],
                            store->create_sequence("batch_s" + std::to_string(i), seq_options));
      lengths[i] = prompt_length(config.context, i);
      PQKV_RETURN_IF_ERROR(seqs[i]->reserve(lengths[i] + config.steps));
      for (int l = 0; l < layers; ++l) {
        PQKV_RETURN_IF_ERROR(seqs[i]->append(
            l, host_view(keys[l].data(), {lengths[i], spec.num_kv_heads, spec.head_dim}),
            host_view(values[l].data(), {lengths[i], spec.num_kv_heads, spec.head_dim}),
            Stream::host()));
      }
      PQKV_RETURN_IF_ERROR(seqs[i]->finish_prefill(build_progress_line(progress)));
      if (progress) bar.tick();
    }
  }
  report.sequences.resize(batch);
  for (int i = 0; i < batch; ++i)
    report.sequences[i].prompt_tokens = lengths[i];

  const size_t qsize = static_cast<size_t>(spec.num_q_heads) * spec.head_dim;
  std::vector<std::vector<float>> q(batch, std::vector<float>(qsize));
  std::vector<std::vector<float>> out(batch, std::vector<float>(qsize));
  std::vector<SequenceStep> steps(batch);
  std::vector<int> counted(batch, 0);
  int64_t measured = 0;
  Progress decode_bar(progress ? "decoding the batch" : "", progress ? config.steps : 0);
  for (int step = 0; step < config.steps; ++step) {
    for (int l = 0; l < layers; ++l) {
      int64_t max_selected = 0;
      for (int i = 0; i < batch; ++i) {
        const int64_t pos = lengths[i] + step;
        PQKV_RETURN_IF_ERROR(seqs[i]->append(
            l, host_view(keys[l].data() + pos * row, {1, spec.num_kv_heads, spec.head_dim}),
            host_view(values[l].data() + pos * row, {1, spec.num_kv_heads, spec.head_dim}),
            Stream::host()));
        PQKV_RETURN_IF_ERROR(wl.query(l, pos, q[i].data()));
        steps[i] = {seqs[i].get(), host_view(q[i].data(), {spec.num_q_heads, spec.head_dim}),
                    host_view(out[i].data(), {spec.num_q_heads, spec.head_dim})};
        PQKV_ASSIGN_OR_RETURN(const int64_t n, seqs[i]->max_selected(l));
        max_selected = std::max(max_selected, n);
      }
      std::vector<int32_t> positions(static_cast<size_t>(batch) * spec.num_kv_heads * max_selected);
      std::vector<int32_t> selected(static_cast<size_t>(batch) * spec.num_kv_heads);
      auto t0 = Clock::now();
      PQKV_RETURN_IF_ERROR(
          store->select(l, steps, {positions.data(), max_selected, selected.data(), Device::cpu()},
                        Stream::host()));
      report.select_us += us_since(t0);
      t0 = Clock::now();
      PQKV_RETURN_IF_ERROR(store->attend(l, steps, Stream::host()));
      report.step_us += us_since(t0);
      t0 = Clock::now();
      for (int i = 0; i < batch; ++i) {
        PQKV_RETURN_IF_ERROR(seqs[i]->attend(l, steps[i].queries, steps[i].out, Stream::host()));
      }
      report.one_by_one_step_us += us_since(t0);
      ++measured;

      for (int i = 0; i < batch; ++i) {
        BatchSequenceRow& r = report.sequences[i];
        r.attended_per_head = selected[static_cast<size_t>(i) * spec.num_kv_heads];
        if (!config.quality) continue;
        const int64_t pos = lengths[i] + step;
        std::vector<std::vector<int64_t>> attended(spec.num_kv_heads);
        for (int h = 0; h < spec.num_kv_heads; ++h) {
          const int32_t* p =
              positions.data() + (static_cast<size_t>(i) * spec.num_kv_heads + h) * max_selected;
          attended[h].assign(p, p + selected[static_cast<size_t>(i) * spec.num_kv_heads + h]);
        }
        const workload::StepTensors tensors{q[i].data(), keys[l].data(), values[l].data(), pos + 1};
        const BudgetPolicy::Counts counts = config.budget.resolve(pos + 1, lengths[i]);
        PQKV_ASSIGN_OR_RETURN(auto quality, workload::evaluate_step(spec, tensors, attended, counts,
                                                                    config.aggregation));
        r.recall_min =
            counted[i] == 0 ? quality.mass_recall : std::min(r.recall_min, quality.mass_recall);
        r.recall_mean += quality.mass_recall;
        ++counted[i];
      }
    }
    if (progress) decode_bar.tick();
  }
  for (int i = 0; i < batch; ++i)
    report.sequences[i].recall_mean /= std::max(counted[i], 1);
  const double m = static_cast<double>(std::max<int64_t>(measured, 1));
  report.step_us /= m;
  report.select_us /= m;
  report.one_by_one_step_us /= m;
  report.per_sequence_us = report.step_us / batch;
#if PQKV_HAVE_CUDA
  if (config.device.is_cuda()) {
    PQKV_ASSIGN_OR_RETURN(report.replayed_step_us,
                          replay_batched_step(*store, seqs, wl, lengths, config));
  }
#endif
  if (!config.save_dir.empty()) {
    seqs.clear();
    for (int i = 0; i < batch; ++i) {
      BenchRow saved;
      PQKV_RETURN_IF_ERROR(save_and_reopen(*store, "batch_s" + std::to_string(i), &saved));
      report.sequences[i].saved_as = saved.saved_as;
      report.sequences[i].save_ms = saved.save_ms;
      report.sequences[i].reopen_ms = saved.reopen_ms;
    }
  }
  return report;
}

}  // namespace pqkv::tools
