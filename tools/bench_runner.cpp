#include "tools/bench_runner.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <numeric>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "engine/inspector.h"
#include "pqkv/store.h"
#include "storage/kv_row_store.h"
#include "tools/cli_checks.h"
#include "tools/faiss_baseline.h"
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

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// On a CUDA store finish_prefill and open_sequence only enqueue the index
// builds and uploads: the host waits for them here, so that build_ms and
// reopen_ms time the work, not its enqueueing. Nothing to wait for on a cpu
// store.
Status wait_for_indexes(const Sequence& seq) {
#if PQKV_HAVE_CUDA
  if (!seq.device().is_cuda()) return ok_status();
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(seq.device()));
  PQKV_ASSIGN_OR_RETURN(gpu::StreamHandle stream, gpu::make_stream());
  for (int l = 0; l < seq.spec().num_layers; ++l) {
    const index::LayerIndex* index = engine::Inspector::layer_index(seq, l);
    if (index != nullptr) PQKV_RETURN_IF_ERROR(index->wait_ready(Stream::cuda(stream.get())));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.get()));
#else
  (void)seq;
#endif
  return ok_status();
}

// Keys and values of every token the run touches, for one layer: the engine
// gets them chunk by chunk, the metrics read them whole.
struct LayerTensors {
  std::vector<float> keys;    // [tokens, kv_heads, head_dim]
  std::vector<float> values;  // [tokens, kv_heads, head_dim]
};

// How the index's picks recur from step to step (BenchRow::reuse_*).
class SelectionReuse {
 public:
  void add(int layer, const std::vector<std::vector<int64_t>>& selected, int step) {
    if (heads_.size() <= static_cast<size_t>(layer)) heads_.resize(static_cast<size_t>(layer) + 1);
    auto& heads = heads_[static_cast<size_t>(layer)];
    if (heads.size() < selected.size()) heads.resize(selected.size());
    for (size_t h = 0; h < selected.size(); ++h) {
      History& hist = heads[h];
      for (const int64_t p : selected[h]) {
        if (p < 0) continue;
        if (static_cast<int64_t>(hist.last.size()) <= p) {
          hist.last.resize(static_cast<size_t>(p) + 1, -1);
          hist.recent.resize(static_cast<size_t>(p) + 1, 0);
        }
        const int last = hist.last[static_cast<size_t>(p)];
        uint8_t& recent = hist.recent[static_cast<size_t>(p)];
        // recent: bit i = picked at step (last - i), 8 steps.
        const int gap = last < 0 ? 8 : step - last;
        const uint8_t window = gap >= 8 ? 0 : static_cast<uint8_t>(recent << gap);
        if (step > 0) {
          ++picks_;
          previous_ += gap == 1;
          any_ += last >= 0;
          twice_ += window != 0;  // with this step, two of the last 8
        }
        recent = static_cast<uint8_t>(window | 1u);
        hist.last[static_cast<size_t>(p)] = step;
      }
      if (step > 0) {
        for (const int shift : {4, 6}) {
          blocks_.clear();
          for (const int64_t p : selected[h])
            if (p >= 0) blocks_.push_back(p >> shift);
          std::sort(blocks_.begin(), blocks_.end());
          const auto touched = std::unique(blocks_.begin(), blocks_.end()) - blocks_.begin();
          (shift == 4 ? touched16_ : touched64_) += static_cast<double>(touched);
        }
      }
    }
  }
  void finish(BenchRow* row) const {
    if (picks_ == 0) return;
    const double n = static_cast<double>(picks_);
    row->reuse_previous = static_cast<double>(previous_) / n;
    row->reuse_any = static_cast<double>(any_) / n;
    row->reuse_twice_in_8 = static_cast<double>(twice_) / n;
    row->picks_per_block16 = touched16_ > 0 ? n / touched16_ : 0;
    row->picks_per_block64 = touched64_ > 0 ? n / touched64_ : 0;
  }

 private:
  struct History {
    std::vector<int> last;        // per position: the step that last picked it, or -1
    std::vector<uint8_t> recent;  // per position: the steps of the last 8 that picked it
  };
  std::vector<std::vector<History>> heads_;  // [layer][kv_head]
  std::vector<int64_t> blocks_;
  int64_t picks_ = 0, previous_ = 0, any_ = 0, twice_ = 0;
  double touched16_ = 0, touched64_ = 0;
};

// Sums over (step, layer) that become one BenchRow.
class RowAccumulator {
 public:
  explicit RowAccumulator(std::string name) { row_.name = std::move(name); }

  void add(const workload::StepQuality& q, int64_t attended_per_head) {
    ++count_;
    row_.recall_mean += q.mass_recall;
    row_.recall_min = count_ == 1 ? q.mass_recall : std::min(row_.recall_min, q.mass_recall);
    row_.output_error_mean += q.output_error;
    row_.output_error_max = std::max(row_.output_error_max, q.output_error);
    if (q.needle_hit) {
      ++row_.needle_steps;
      row_.needle_hits += *q.needle_hit;
    }
    row_.attended_per_head = attended_per_head;
  }
  // A step measured for time only.
  void count_step(int64_t attended_per_head) {
    ++count_;
    row_.attended_per_head = attended_per_head;
  }
  void add_times(const AttendTrace& t, double attend_us) {
    row_.score_us += t.score_us;
    row_.topk_us += t.topk_us;
    row_.gather_us += t.gather_us;
    row_.attention_us += t.attention_us;
    row_.attend_us += attend_us;
    row_.resident_rows += static_cast<double>(t.fetch.resident_rows);
    row_.resident_bytes += static_cast<double>(t.fetch.resident_bytes);
    row_.dram_rows += static_cast<double>(t.fetch.dram_rows);
    row_.dram_bytes += static_cast<double>(t.fetch.dram_bytes);
    row_.cache_hits += static_cast<double>(t.fetch.cache_hits);
    row_.cache_bytes += static_cast<double>(t.fetch.cache_bytes);
    row_.ssd_rows += static_cast<double>(t.fetch.ssd_rows);
    row_.ssd_bytes += static_cast<double>(t.fetch.ssd_bytes);
    row_.ssd_pages += static_cast<double>(t.fetch.ssd_pages);
    row_.ssd_hits += static_cast<double>(t.fetch.ssd_hits);
    row_.ssd_us += t.fetch.ssd_us;
    row_.cache_policy_us += t.fetch.cache_policy_us;
    row_.cache_enqueue_us += t.fetch.cache_enqueue_us;
  }
  void add_exact_time(double exact_us) { row_.exact_us += exact_us; }
  BenchRow& row() { return row_; }
  BenchRow finish() {
    const double n = std::max(count_, 1);
    for (double* f :
         {&row_.recall_mean,     &row_.output_error_mean, &row_.score_us,  &row_.topk_us,
          &row_.gather_us,       &row_.attention_us,      &row_.attend_us, &row_.exact_us,
          &row_.resident_rows,   &row_.resident_bytes,    &row_.dram_rows, &row_.dram_bytes,
          &row_.cache_hits,      &row_.cache_bytes,       &row_.ssd_rows,  &row_.ssd_bytes,
          &row_.ssd_pages,       &row_.ssd_hits,          &row_.ssd_us,    &row_.cache_policy_us,
          &row_.cache_enqueue_us}) {
      *f /= n;
    }
    return row_;
  }

 private:
  BenchRow row_;
  int count_ = 0;
};

Result<std::vector<LayerTensors>> generate_tensors(const workload::SyntheticWorkload& wl,
                                                   int layers, int64_t tokens, bool progress) {
  const ModelSpec& spec = wl.spec();
  const size_t per_layer = static_cast<size_t>(tokens) * spec.num_kv_heads * spec.head_dim;
  std::vector<LayerTensors> out(layers);
  Progress bar(progress ? "generating workload" : "", progress ? layers : 0);
  for (int l = 0; l < layers; ++l) {
    out[l].keys.resize(per_layer);
    out[l].values.resize(per_layer);
    PQKV_RETURN_IF_ERROR(wl.keys(l, 0, tokens, out[l].keys.data()));
    PQKV_RETURN_IF_ERROR(wl.values(l, 0, tokens, out[l].values.data()));
    if (progress) bar.tick();
  }
  return out;
}

// The attended set of a baseline selection: the same sink and window as the
// engine's step, plus `selected`.
std::vector<std::vector<int64_t>> with_sink_and_window(
    const std::vector<std::vector<int64_t>>& selected, const BudgetPolicy::Counts& c,
    int64_t length) {
  std::vector<std::vector<int64_t>> out(selected.size());
  for (size_t h = 0; h < selected.size(); ++h) {
    for (int64_t t = 0; t < c.sink; ++t)
      out[h].push_back(t);
    out[h].insert(out[h].end(), selected[h].begin(), selected[h].end());
    for (int64_t t = length - c.window; t < length; ++t)
      out[h].push_back(t);
  }
  return out;
}

struct RunRows {
  BenchRow pq;
  std::optional<BenchRow> faiss;
};

bool uses_pq(const SelectionConfig& s) {
  return s.code == KeyCode::kPq || (s.two_stage() && s.rerank == KeyCode::kPq);
}

Result<RunRows> run_one(const BenchConfig& cfg, const PqConfig& pq,
                        const SelectionConfig& selection, const workload::SyntheticWorkload& wl,
                        const std::vector<LayerTensors>& data, bool progress) {
  const ModelSpec& spec = cfg.spec;
  const int layers = spec.num_layers;
  const int64_t row = int64_t{spec.num_kv_heads} * spec.head_dim;

  PQKV_ASSIGN_OR_RETURN(auto store, Store::open(bench_store_options(cfg)));
  const int m = pq.resolved_m(spec.head_dim);
  const std::string pq_setting = "m=" + std::to_string(m) + ",b=" + std::to_string(pq.bits);
  std::string setting = pq_setting;
  if (selection.is_oracle()) {
    setting = "oracle";
  } else if (selection.two_stage()) {
    setting = selection.to_string() + (uses_pq(selection) ? " " + pq_setting : "");
  } else if (selection.code != KeyCode::kPq) {
    setting = selection.to_string();
  }
  // The name a --save stores it under: the setting with no spaces.
  std::string name =
      selection.code == KeyCode::kPq && !selection.two_stage() ? "pq_" + setting : setting;
  std::replace(name.begin(), name.end(), ' ', '_');
  PQKV_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                        store->create_sequence(name, bench_sequence_options(cfg, pq, selection)));
  // Sized once for the whole run, as an engine does: no step allocates.
  PQKV_RETURN_IF_ERROR(seq->reserve(cfg.context + cfg.steps));
  RowAccumulator acc("pqkv " + setting);
  SelectionReuse reuse;
  RowAccumulator faiss_acc("faiss IndexPQ " + pq_setting);
  faiss_acc.row().code_bytes_per_token = (int64_t{m} * pq.bits + 7) / 8;
  faiss_acc.row().search_only = true;

  // Prefill in chunks, as an engine does.
  constexpr int64_t kChunk = 4096;
  auto t0 = Clock::now();
  for (int l = 0; l < layers; ++l) {
    for (int64_t b = 0; b < cfg.context; b += kChunk) {
      const int64_t n = std::min(kChunk, cfg.context - b);
      PQKV_RETURN_IF_ERROR(seq->append(
          l, host_view(data[l].keys.data() + b * row, {n, spec.num_kv_heads, spec.head_dim}),
          host_view(data[l].values.data() + b * row, {n, spec.num_kv_heads, spec.head_dim}),
          Stream::host()));
    }
  }
  acc.row().prefill_ms = ms_since(t0);
  t0 = Clock::now();
  PQKV_RETURN_IF_ERROR(seq->finish_prefill(build_progress_line(progress)));
  PQKV_RETURN_IF_ERROR(wait_for_indexes(*seq));
  acc.row().build_ms = ms_since(t0);
  if (const index::LayerIndex* index = engine::Inspector::layer_index(*seq, 0); index != nullptr) {
    acc.row().code_bytes_per_token = index->code_bytes_per_token();
  }

  std::vector<std::optional<FaissPqBaseline>> faiss(layers);
  // Faiss's IndexPQ shares the PQ codebooks of a one-stage PQ selection.
  const bool one_stage_pq = selection.code == KeyCode::kPq && !selection.two_stage();
  if (cfg.compare_faiss && cfg.quality && one_stage_pq) {
    const int64_t sink = cfg.budget.resolve(cfg.context, cfg.context).sink;
    for (int l = 0; l < layers; ++l) {
      const index::LayerIndex* index = engine::Inspector::layer_index(*seq, l);
      if (index == nullptr) continue;
      PQKV_ASSIGN_OR_RETURN(auto b, FaissPqBaseline::build(*index, sink, cfg.context));
      faiss[l] = std::move(b);
    }
  }

  std::vector<float> q(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
  std::vector<float> out(q.size());
  Progress bar(progress ? "decoding " + setting : "", progress ? cfg.steps : 0);
  for (int step = 0; step < cfg.steps; ++step) {
    const int64_t pos = cfg.context + step;
    const auto needle = wl.needle_for_query(pos);
    for (int l = 0; l < layers; ++l) {
      PQKV_RETURN_IF_ERROR(seq->append(
          l, host_view(data[l].keys.data() + pos * row, {1, spec.num_kv_heads, spec.head_dim}),
          host_view(data[l].values.data() + pos * row, {1, spec.num_kv_heads, spec.head_dim}),
          Stream::host()));
      PQKV_RETURN_IF_ERROR(wl.query(l, pos, q.data()));
      AttendTrace trace;
      t0 = Clock::now();
      PQKV_RETURN_IF_ERROR(seq->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                       host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                       Stream::host(), &trace));
      acc.add_times(trace, ms_since(t0) * 1000.0);
      reuse.add(l, trace.selected, step);
      // Exact attention over every token, the time a sparse step is judged by.
      t0 = Clock::now();
      PQKV_RETURN_IF_ERROR(seq->attend_exact(
          l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
          host_view(out.data(), {spec.num_q_heads, spec.head_dim}), Stream::host()));
      acc.add_exact_time(ms_since(t0) * 1000.0);

      if (!cfg.quality) {
        acc.count_step(static_cast<int64_t>(trace.attended[0].size()));
        continue;
      }
      const workload::StepTensors tensors{q.data(), data[l].keys.data(), data[l].values.data(),
                                          pos + 1};
      const std::optional<int64_t> needle_pos =
          needle ? std::optional<int64_t>(needle->position) : std::nullopt;
      PQKV_ASSIGN_OR_RETURN(auto quality,
                            workload::evaluate_step(spec, tensors, trace.attended, trace.budget,
                                                    cfg.aggregation, needle_pos));
      acc.add(quality, static_cast<int64_t>(trace.attended[0].size()));

      if (faiss[l] && !trace.exact) {
        std::vector<std::vector<int64_t>> selected;
        const int64_t k = trace.budget.top_k;
        t0 = Clock::now();
        PQKV_RETURN_IF_ERROR(faiss[l]->search(q.data(), spec.num_q_heads, k,
                                              pos + 1 - trace.budget.window, &selected));
        AttendTrace faiss_trace;
        faiss_trace.score_us = ms_since(t0) * 1000.0;
        faiss_acc.add_times(faiss_trace, faiss_trace.score_us);
        const auto attended = with_sink_and_window(selected, trace.budget, pos + 1);
        PQKV_ASSIGN_OR_RETURN(
            auto fq, workload::evaluate_step(spec, tensors, attended, trace.budget, cfg.aggregation,
                                             needle_pos));
        faiss_acc.add(fq, static_cast<int64_t>(attended[0].size()));
      }
    }
    if (progress) bar.tick();
  }
  RunRows rows{acc.finish(), std::nullopt};
  reuse.finish(&rows.pq);
  if (!cfg.save_dir.empty()) {
    seq.reset();
    PQKV_RETURN_IF_ERROR(save_and_reopen(*store, name, &rows.pq));
  }
  if (cfg.compare_faiss && cfg.quality && one_stage_pq) rows.faiss = faiss_acc.finish();
  return rows;
}

}  // namespace

namespace {

// The synthetic workload of a run.
workload::WorkloadOptions workload_options(const BenchConfig& config) {
  workload::WorkloadOptions wo;
  wo.seed = config.seed;
  wo.prompt_tokens = config.context;
  // Spread the needle queries over the decode steps the run makes.
  wo.needle_query_interval = std::max<int64_t>(1, config.steps / std::max(wo.num_needles, 1));
  return wo;
}

}  // namespace

Status check_bench_config(const BenchConfig& config) {
  PQKV_RETURN_IF_ERROR(config.spec.validate());
  PQKV_RETURN_IF_ERROR(config.budget.validate());
  if (config.context < 1 || config.steps < 1) {
    return Status::invalid_argument(
        fmt::format("bench needs a context of at least 1 token and 1 decode step, got --context "
                    "{} --steps {}",
                    config.context, config.steps));
  }
  StoreOptions store = bench_store_options(config);
  store.device = Device::cpu();  // a missing GPU is not a usage error: Store::open says so
  PQKV_RETURN_IF_ERROR(store.validate());
  // The workload holds fp32 keys and values of every token and layer.
  const double workload_bytes = (static_cast<double>(config.context) + config.steps) *
                                config.spec.num_layers * config.spec.num_kv_heads *
                                config.spec.head_dim * 2 * sizeof(float);
  PQKV_RETURN_IF_ERROR(check_fits_in_memory(
      workload_bytes,
      fmt::format("--context {} and --steps {} over {} layers: the workload's keys and values",
                  config.context, config.steps, config.spec.num_layers),
      "--context, --steps or --layers"));
  // A context too short for the workload's needles, say, is a usage error.
  return workload_options(config)
      .validate(config.spec)
      .with_context(
          fmt::format("--context {} is too short for the synthetic workload", config.context));
}

Result<BenchReport> run_bench(const BenchConfig& config, bool progress) {
  PQKV_RETURN_IF_ERROR(check_bench_config(config));
  const workload::WorkloadOptions wo = workload_options(config);
  PQKV_ASSIGN_OR_RETURN(auto wl, workload::SyntheticWorkload::create(config.spec, wo));
  PQKV_ASSIGN_OR_RETURN(auto data, generate_tensors(wl, config.spec.num_layers,
                                                    config.context + config.steps, progress));
  BenchReport report;
  report.config = config;
  for (const SelectionConfig& selection : config.selections) {
    for (const PqConfig& pq : config.pq) {
      PQKV_ASSIGN_OR_RETURN(auto rows, run_one(config, pq, selection, wl, data, progress));
      report.rows.push_back(rows.pq);
      if (rows.faiss && selection.code == KeyCode::kPq) report.rows.push_back(*rows.faiss);
      // The PQ settings change nothing for a selection without PQ: one run.
      if (!uses_pq(selection)) break;
    }
  }
  return report;
}

SequenceOptions bench_sequence_options(const BenchConfig& config, const PqConfig& pq,
                                       const SelectionConfig& selection) {
  SequenceOptions o;
  o.pq = pq;
  o.selection = selection;
  o.budget = config.budget;
  o.aggregation = config.aggregation;
  o.resident_sink_window = config.resident;
  return o;
}

SequenceOptions first_sequence_options(const BenchConfig& config) {
  return bench_sequence_options(
      config, config.pq.empty() ? PqConfig{} : config.pq.front(),
      config.selections.empty() ? SelectionConfig{} : config.selections.front());
}

StoreOptions bench_store_options(const BenchConfig& config) {
  StoreOptions so;
  so.spec = config.spec;
  so.device = config.device;
  so.num_threads = config.num_threads;
  so.block_cache_bytes = config.block_cache_bytes;
  so.block_cache_tokens = config.block_cache_tokens;
  so.block_cache_aging_steps = config.block_cache_aging_steps;
  so.block_cache_admit_steps = config.block_cache_admit_steps;
  if (config.ssd_fraction > 0) {
    const int64_t blocks_per_head =
        (config.context + config.steps + storage::KvRowStore::kTokensPerBlock - 1) /
        storage::KvRowStore::kTokensPerBlock;
    const double bytes = static_cast<double>(blocks_per_head) * config.spec.num_layers *
                         config.spec.num_kv_heads * storage::KvRowStore::kTokensPerBlock *
                         static_cast<double>(config.spec.row_bytes());
    so.dram_budget_bytes = static_cast<int64_t>((1.0 - config.ssd_fraction) * bytes);
    so.directory = config.ssd_directory;
    so.spill_to_disk = true;
  }
  if (!config.save_dir.empty()) {
    so.directory = config.save_dir;
    so.model_fingerprint = bench_model_fingerprint(config);
  }
  return so;
}

std::string bench_model_fingerprint(const BenchConfig& config) {
  return "pqkv-bench synthetic " + config.spec.name + " seed " + std::to_string(config.seed);
}

Status save_and_reopen(Store& store, const std::string& name, BenchRow* row) {
  // A save replaces an earlier one of its name: a bench run only adds.
  PQKV_ASSIGN_OR_RETURN(const std::vector<std::string> saved, store.saved_sequence_names());
  if (std::find(saved.begin(), saved.end(), name) != saved.end()) {
    return Status::already_exists(
        "--save: the store already holds a saved sequence '" + name +
        "' (from an earlier run); nothing was replaced: give --save a new folder");
  }
  PQKV_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, store.get_sequence(name));
  auto t0 = Clock::now();
  PQKV_RETURN_IF_ERROR(store.save(*seq));
  row->save_ms = ms_since(t0);
  seq.reset();
  PQKV_RETURN_IF_ERROR(store.close_sequence(name));
  t0 = Clock::now();
  PQKV_ASSIGN_OR_RETURN(seq, store.open_sequence(name));
  PQKV_RETURN_IF_ERROR(wait_for_indexes(*seq));
  row->reopen_ms = ms_since(t0);
  row->saved_as = name;
  return ok_status();
}

}  // namespace pqkv::tools
