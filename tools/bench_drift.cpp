#include "tools/bench_drift.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "pqkv/device.h"
#include "pqkv/store.h"
#include "tools/cli_checks.h"
#include "tools/progress.h"
#include "workload/quality_metrics.h"
#include "workload/synthetic_workload.h"

#if PQKV_HAVE_CUDA
#include "core/cuda_handles.h"
#endif

namespace pqkv::tools {
namespace {

using Clock = std::chrono::steady_clock;

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

bool uses_pq(const SelectionConfig& s) {
  return s.code == KeyCode::kPq || (s.two_stage() && s.rerank == KeyCode::kPq);
}

std::string selection_name(const SelectionConfig& s, const PqConfig& pq, int head_dim) {
  std::string name = s.to_string();
  if (uses_pq(s)) {
    name += " m=" + std::to_string(pq.resolved_m(head_dim)) + ",b=" + std::to_string(pq.bits);
  }
  return name;
}

// Keys and values of every token, prompt and generated, per layer.
struct Tensors {
  std::vector<std::vector<float>> keys;
  std::vector<std::vector<float>> values;
};

Result<DriftRow> run_one(const BenchConfig& cfg, const DriftBenchConfig& drift,
                         const SelectionConfig& selection, const PqConfig& pq, bool refit,
                         const workload::SyntheticWorkload& wl, const Tensors& data,
                         bool progress) {
  const ModelSpec& spec = cfg.spec;
  const int layers = spec.num_layers;
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;
  const int64_t total = cfg.context + drift.generated;

  // The decode steps' stream: the Store's, or one of the greatest priority
  // (declared first: it outlives the store).
  Stream step_stream = Stream::host();
#if PQKV_HAVE_CUDA
  gpu::StreamHandle high_priority;
  if (drift.high_priority_stream) {
    // The device first, so that a machine without one gets the message every
    // cuda run gets rather than the stream call's CUDA error.
    PQKV_RETURN_IF_ERROR(check_device_usable(cfg.device));
    PQKV_ASSIGN_OR_RETURN(high_priority, gpu::make_ranked_stream(0, 1));
    step_stream = Stream::cuda(high_priority.get());
  }
#endif
  PQKV_ASSIGN_OR_RETURN(auto store, Store::open(bench_store_options(cfg)));
  SequenceOptions options = bench_sequence_options(cfg, pq, selection);
  options.refit_threshold = refit ? drift.refit_threshold : 0.0;
  options.refit_min_tokens = drift.refit_min_tokens;
  PQKV_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, store->create_sequence("drift", options));
  PQKV_RETURN_IF_ERROR(seq->reserve(total));

  DriftRow out;
  out.selection = selection_name(selection, pq, spec.head_dim);
  out.refit = refit;
  const auto kv = [&](const std::vector<float>& v, int64_t begin, int64_t n) {
    return host_view(v.data() + begin * row, {n, spec.num_kv_heads, spec.head_dim});
  };
  constexpr int64_t kChunk = 4096;
  for (int l = 0; l < layers; ++l) {
    for (int64_t b = 0; b < cfg.context; b += kChunk) {
      const int64_t n = std::min(kChunk, cfg.context - b);
      PQKV_RETURN_IF_ERROR(
          seq->append(l, kv(data.keys[l], b, n), kv(data.values[l], b, n), Stream::host()));
    }
  }
  PQKV_RETURN_IF_ERROR(seq->finish_prefill());

  const int64_t every = std::max<int64_t>(1, drift.generated / std::max(drift.samples, 1));
  std::array<double, 4> quarter_sum{};
  std::array<int, 4> quarter_count{};
  int measured = 0;
  double append_sum = 0;
  const size_t q_elems = static_cast<size_t>(spec.num_q_heads) * spec.head_dim;
  std::vector<std::vector<float>> q(static_cast<size_t>(layers), std::vector<float>(q_elems));
  std::vector<float> attn(q_elems);
  const auto q_view = [&](const std::vector<float>& v) {
    return host_view(v.data(), {spec.num_q_heads, spec.head_dim});
  };
  std::array<double, 2> step_sum{};  // without, with a refit being built
  std::array<int64_t, 2> step_count{};
  Progress bar(progress ? "generating " + out.selection + (refit ? " with refits" : "") : "",
               progress ? drift.generated : 0);
  for (int64_t step = 0; step < drift.generated; ++step) {
    const int64_t pos = cfg.context + step;
    // Whether a refit of any layer is being built when this step starts or
    // when it ends: the step that starts one and the one that swaps it in
    // count as refit steps too.
    const auto refit_running = [&]() -> Result<bool> {
      bool running = false;
      for (int l = 0; l < layers && refit; ++l) {
        PQKV_ASSIGN_OR_RETURN(const DriftStats stats, seq->drift_stats(l));
        running = running || stats.refit_running;
      }
      return running;
    };
    PQKV_ASSIGN_OR_RETURN(const bool running_before, refit_running());
    for (int l = 0; l < layers; ++l)
      PQKV_RETURN_IF_ERROR(wl.query(l, pos, q[l].data()));
    // The last sample at the last step, when the drift is at its full size.
    const bool sampled = (drift.generated - 1 - step) % every == 0;
    const auto step_start = Clock::now();
    for (int l = 0; l < layers; ++l) {
      const auto t0 = Clock::now();
      PQKV_RETURN_IF_ERROR(
          seq->append(l, kv(data.keys[l], pos, 1), kv(data.values[l], pos, 1), step_stream));
      const double us = us_since(t0);
      append_sum += us;
      out.append_max_us = std::max(out.append_max_us, us);
    }
    if (!sampled) {
      // A whole decode step: every layer's append, then its attention.
      for (int l = 0; l < layers; ++l) {
        PQKV_RETURN_IF_ERROR(
            seq->attend(l, q_view(q[l]), q_view(attn), step_stream, /*trace=*/nullptr));
      }
      const double us = us_since(step_start);
      PQKV_ASSIGN_OR_RETURN(const bool running_after, refit_running());
      const int building = running_before || running_after ? 1 : 0;
      step_sum[building] += us;
      ++step_count[building];
      out.step_max_us = std::max(out.step_max_us, us);
    } else {
      const int quarter = static_cast<int>(std::min<int64_t>(3, step * 4 / drift.generated));
      for (int l = 0; l < layers; ++l) {
        AttendTrace trace;
        PQKV_RETURN_IF_ERROR(seq->attend(l, q_view(q[l]), q_view(attn), step_stream, &trace));
        const workload::StepTensors tensors{q[l].data(), data.keys[l].data(), data.values[l].data(),
                                            pos + 1};
        PQKV_ASSIGN_OR_RETURN(auto quality, workload::evaluate_step(spec, tensors, trace.attended,
                                                                    trace.budget, cfg.aggregation));
        quarter_sum[quarter] += quality.mass_recall;
        ++quarter_count[quarter];
        out.recall_mean += quality.mass_recall;
        out.recall_min =
            measured == 0 ? quality.mass_recall : std::min(out.recall_min, quality.mass_recall);
        ++measured;
      }
    }
    if (progress) bar.tick();
  }
  for (int i = 0; i < 4; ++i)
    out.recall_quarter[i] = quarter_count[i] > 0 ? quarter_sum[i] / quarter_count[i] : 0;
  out.recall_mean /= std::max(measured, 1);
  out.append_us = append_sum / static_cast<double>(drift.generated * layers);
  for (int i = 0; i < 2; ++i)
    out.step_us[i] = step_count[i] > 0 ? step_sum[i] / static_cast<double>(step_count[i]) : 0;
  out.refit_steps = step_count[1];
  for (int l = 0; l < layers; ++l) {
    PQKV_ASSIGN_OR_RETURN(const DriftStats stats, seq->drift_stats(l));
    out.refits += stats.refits;
    out.refit_ms += stats.total_refit_ms;
    out.end_error_ratio = std::max(out.end_error_ratio, stats.max_error_ratio);
    if (!stats.last_refit_error.empty()) {
      return Status::internal("a refit of layer " + std::to_string(l) +
                              " failed: " + stats.last_refit_error);
    }
  }
  return out;
}

}  // namespace

Result<DriftReport> run_drift_bench(const BenchConfig& config, const DriftBenchConfig& drift,
                                    bool progress) {
  PQKV_RETURN_IF_ERROR(config.spec.validate());
  PQKV_RETURN_IF_ERROR(config.budget.validate());
  if (config.context < 1 || drift.generated < 4) {
    return Status::invalid_argument(
        "--drift needs a context of at least 1 token and at least 4 generated tokens (one per "
        "quarter)");
  }
  if (drift.high_priority_stream && !config.device.is_cuda()) {
    return Status::invalid_argument(
        "--drift-stream high runs the decode steps on a CUDA stream: it needs --backend cuda");
  }
  if (!(drift.refit_threshold > 1) || std::isinf(drift.refit_threshold)) {
    return Status::invalid_argument("--drift-threshold must be a finite error ratio above 1, got " +
                                    std::to_string(drift.refit_threshold));
  }
  // Every key and value of the run, fp32, held at once (overflow-safe in double).
  PQKV_RETURN_IF_ERROR(check_fits_in_memory(
      2.0 * config.spec.num_layers * (static_cast<double>(config.context) + drift.generated) *
          config.spec.num_kv_heads * config.spec.head_dim * sizeof(float),
      "the drift run's keys and values", "--context, --drift or --layers"));
  workload::WorkloadOptions wo;
  wo.seed = config.seed;
  wo.prompt_tokens = config.context;
  wo.drift_start = config.context;
  wo.drift_tokens = drift.generated;
  wo.drift_scale = drift.scale;
  wo.drift_offset = drift.offset;
  wo.drift_outlier_growth = drift.outlier_growth;
  PQKV_ASSIGN_OR_RETURN(auto wl, workload::SyntheticWorkload::create(config.spec, wo));
  const int64_t total = config.context + drift.generated;
  const size_t per_layer =
      static_cast<size_t>(total) * config.spec.num_kv_heads * config.spec.head_dim;
  Tensors data;
  for (int l = 0; l < config.spec.num_layers; ++l) {
    data.keys.emplace_back(per_layer);
    data.values.emplace_back(per_layer);
    PQKV_RETURN_IF_ERROR(wl.keys(l, 0, total, data.keys.back().data()));
    PQKV_RETURN_IF_ERROR(wl.values(l, 0, total, data.values.back().data()));
  }
  DriftReport report;
  report.config = config;
  report.drift = drift;
  for (const SelectionConfig& selection : config.selections) {
    for (const PqConfig& pq : config.pq) {
      for (bool refit : {false, true}) {
        PQKV_ASSIGN_OR_RETURN(DriftRow row,
                              run_one(config, drift, selection, pq, refit, wl, data, progress));
        report.rows.push_back(row);
      }
      if (!uses_pq(selection)) break;
    }
  }
  return report;
}

}  // namespace pqkv::tools
