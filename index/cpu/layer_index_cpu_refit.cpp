// Drift tracking and refits of the CPU index (LayerIndex::drift_stats,
// LayerIndex::refit): the fit's error measured on a sample of its keys, new
// keys' error measured as they are added (layer_index_cpu.cpp), and a refit
// built from the keys it is given through the caller's runner, swapped in by
// the owner's next add or search.
#include <tbb/parallel_for.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "index/cpu/catch_status.h"
#include "index/cpu/key_codecs_cpu.h"
#include "index/cpu/layer_index_cpu.h"

namespace pqkv::index {
namespace {

// Fit keys the fit error is measured on, evenly spaced: enough for a mean
// within a few percent, bounded so that training does not pay a second full
// encoding.
constexpr int64_t kFitSample = 4096;

// Errors below this share of the fit keys' mean squared norm count as none:
// both means of a ratio get it added. Without it int8's rounding error is so
// small that the rare in-distribution key just past the fitted range (clipped
// by a fraction of a sigma) doubles the ratio; with it a ratio moves only
// once new keys quantize worse by a share of their own size (0.1% of the
// squared norm, about 3% of the norm).
constexpr double kRelativeErrorFloor = 1e-3;

// Mean squared error of a fit key for every KV head of `stage`'s codec, on
// up to kFitSample of `keys`.
template <class Stage>
void measure_fit(const cpu::HostKeys& keys, int kv_heads, Stage* stage) {
  const KeyCodec& codec = *stage->codec;
  stage->fit_error.assign(static_cast<size_t>(kv_heads), 0.0);
  stage->error_floor.assign(static_cast<size_t>(kv_heads), 0.0);
  stage->since_error.assign(static_cast<size_t>(kv_heads), 0.0);
  if (codec.code() == KeyCode::kExact || keys.n == 0) return;
  const int64_t count = std::min(keys.n, kFitSample);
  const int d = keys.head_dim;
  std::vector<float> sample(static_cast<size_t>(count * keys.row_elements()));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = i * keys.n / count;
    for (int h = 0; h < kv_heads; ++h)
      keys.gather(h, 0, d, t, t + 1, sample.data() + i * keys.row_elements() + int64_t{h} * d);
  }
  const cpu::HostKeys view{sample.data(), DType::kF32, count, kv_heads, d};
  tbb::parallel_for(0, kv_heads, [&](int h) {
    std::vector<uint8_t> codes(static_cast<size_t>(count * codec.code_size()));
    codec.encode(view, h, codes.data());
    double norm = 0;
    std::vector<float> key(static_cast<size_t>(d));
    for (int64_t t = 0; t < count; ++t) {
      view.gather(h, 0, d, t, t + 1, key.data());
      for (float v : key)
        norm += static_cast<double>(v) * v;
    }
    stage->error_floor[h] = std::max(kRelativeErrorFloor * norm / static_cast<double>(count),
                                     std::numeric_limits<double>::min());
    stage->fit_error[h] =
        cpu::squared_error(codec, view, h, codes.data()) / static_cast<double>(count);
  });
}

double millis_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

// Everything a refit needs, owned by the job: the task may outlive the index
// (the index then just drops its reference and the result with it).
struct LayerIndexCpu::RefitJob {
  std::vector<float> keys;  // tokens [0, n), [n][kv_heads][head_dim]
  int64_t n = 0;
  int64_t fit_begin = 0;
  int head_dim = 0;
  int kv_heads = 0;
  PqConfig config;
  std::vector<KeyCode> codes;  // one per stage

  // Written by the task, read by the owner once `done` is set.
  std::vector<Stage> stages;
  Status status;
  double build_ms = 0;
  std::atomic<bool> done{false};

  void run() {
    const auto start = std::chrono::steady_clock::now();
    status = cpu::catch_as_status("refitting the CPU index", [&]() -> Status {
      // Checked here, off the owner's thread: one pass over every key.
      const auto bad =
          std::find_if(keys.begin(), keys.end(), [](float v) { return !std::isfinite(v); });
      if (bad != keys.end()) {
        const int64_t i = bad - keys.begin();
        const int64_t row = int64_t{kv_heads} * head_dim;
        return Status::invalid_argument(
            "refit keys hold NaN or Inf at token " + std::to_string(i / row) + ", KV head " +
            std::to_string(i % row / head_dim) + ", dim " + std::to_string(i % head_dim));
      }
      const cpu::HostKeys all{keys.data(), DType::kF32, n, kv_heads, head_dim};
      const cpu::HostKeys fit{keys.data() + fit_begin * all.row_elements(), DType::kF32,
                              n - fit_begin, kv_heads, head_dim};
      std::vector<Stage> built;
      for (KeyCode code : codes) {
        PQKV_ASSIGN_OR_RETURN(auto codec, make_key_codec(code, head_dim, kv_heads, config));
        PQKV_RETURN_IF_ERROR(codec->train(fit, config));
        Stage s{std::move(codec), std::vector<std::vector<uint8_t>>(kv_heads), {}, {}, {}};
        measure_fit(fit, kv_heads, &s);
        built.push_back(std::move(s));
      }
      const int num_stages = static_cast<int>(built.size());
      cpu::TaskErrors errors;
      tbb::parallel_for(0, num_stages * kv_heads, [&](int task) {
        errors.run("re-encoding keys", [&] {
          Stage& s = built[task / kv_heads];
          auto& head = s.codes[task % kv_heads];
          head.resize(static_cast<size_t>(n * s.codec->code_size()));
          s.codec->encode(all, task % kv_heads, head.data());
          return ok_status();
        });
      });
      PQKV_RETURN_IF_ERROR(errors.status());
      stages = std::move(built);
      return ok_status();
    });
    build_ms = millis_since(start);
    // The keys are not needed past here: free them before the swap.
    std::vector<float>().swap(keys);
    done.store(true, std::memory_order_release);
  }
};

void LayerIndexCpu::start_drift_tracking(const cpu::HostKeys& keys) {
  refit_.reset();
  refit_keys_.clear();
  tracking_ = false;
  for (Stage& s : stages_) {
    measure_fit(keys, kv_heads_, &s);
    tracking_ = tracking_ || s.codec->code() != KeyCode::kExact;
  }
  fit_context_pending_ = true;
  fit_tokens_ = keys.n;
  tokens_since_fit_ = 0;
  refits_ = 0;
  last_refit_ms_ = 0;
  total_refit_ms_ = 0;
  last_refit_error_.clear();
}

void LayerIndexCpu::stop_drift_tracking() {
  refit_.reset();
  refit_keys_.clear();
  tracking_ = false;
  fit_context_pending_ = false;
  fit_tokens_ = 0;
  tokens_since_fit_ = 0;
  for (Stage& s : stages_) {
    s.fit_error.assign(static_cast<size_t>(kv_heads_), 0.0);
    s.error_floor.assign(static_cast<size_t>(kv_heads_), 0.0);
    s.since_error.assign(static_cast<size_t>(kv_heads_), 0.0);
  }
}

DriftStats LayerIndexCpu::drift_stats() const {
  DriftStats d;
  d.tracking = tracking_;
  d.fit_tokens = fit_tokens_;
  d.tokens_since_fit = tokens_since_fit_;
  d.refits = refits_;
  d.refit_running = refit_ != nullptr;
  d.last_refit_ms = last_refit_ms_;
  d.total_refit_ms = total_refit_ms_;
  d.last_refit_error = last_refit_error_;
  if (!tracking_) return d;
  d.head_error_ratio.assign(static_cast<size_t>(kv_heads_), 0.0);
  if (tokens_since_fit_ == 0) return d;
  for (const Stage& s : stages_) {
    if (s.codec->code() == KeyCode::kExact) continue;
    for (int h = 0; h < kv_heads_; ++h) {
      const double ratio =
          (s.since_error[h] / static_cast<double>(tokens_since_fit_) + s.error_floor[h]) /
          (s.fit_error[h] + s.error_floor[h]);
      d.head_error_ratio[h] = std::max(d.head_error_ratio[h], ratio);
    }
  }
  double sum = 0;
  for (double r : d.head_error_ratio) {
    sum += r;
    d.max_error_ratio = std::max(d.max_error_ratio, r);
  }
  d.mean_error_ratio = sum / kv_heads_;
  return d;
}

Status LayerIndexCpu::refit(std::vector<float> keys, int64_t fit_begin, const PqConfig& config,
                            const BackgroundRunner& run) {
  if (!trained()) {
    return Status::failed_precondition(
        "refit needs a trained index: train it first (a refit replaces a fit)");
  }
  if (refit_ != nullptr) {
    return Status::failed_precondition(
        "a refit of this index is still being built; wait for it to be swapped in (the next add "
        "or search after it finishes) before starting another");
  }
  if (pq_stage() != nullptr) PQKV_RETURN_IF_ERROR(shape_.check_config(config));
  const int64_t row = int64_t{kv_heads_} * shape_.head_dim;
  const auto n = static_cast<int64_t>(keys.size()) / row;
  if (static_cast<int64_t>(keys.size()) != num_tokens() * row) {
    return Status::failed_precondition(
        "refit re-encodes every token: pass the keys of tokens [0, " +
        std::to_string(num_tokens()) + "), " + std::to_string(num_tokens() * row) +
        " floats, got " + std::to_string(keys.size()));
  }
  if (fit_begin < 0 || fit_begin >= n) {
    return Status::invalid_argument("refit's fit_begin " + std::to_string(fit_begin) +
                                    " is not within the " + std::to_string(n) + " tokens");
  }
  PQKV_RETURN_IF_ERROR(cpu::catch_as_status("starting a refit", [&]() -> Status {
    auto job = std::make_shared<RefitJob>();
    job->keys = std::move(keys);
    job->n = n;
    job->fit_begin = fit_begin;
    job->head_dim = shape_.head_dim;
    job->kv_heads = kv_heads_;
    job->config = config;
    for (const Stage& s : stages_)
      job->codes.push_back(s.codec->code());
    refit_ = std::move(job);
    refit_keys_.clear();
    return ok_status();
  }));
  std::shared_ptr<RefitJob> job = refit_;
  if (run) {
    run([job] { job->run(); });
  } else {
    job->run();
    install_refit();
  }
  return ok_status();
}

void LayerIndexCpu::install_refit() {
  if (refit_ == nullptr || !refit_->done.load(std::memory_order_acquire)) return;
  std::shared_ptr<RefitJob> job = std::move(refit_);
  std::vector<float> added = std::move(refit_keys_);
  refit_keys_.clear();
  Status s = job->status;
  if (s.ok()) {
    s = cpu::catch_as_status("swapping in a refit", [&]() -> Status {
      // The keys added while the refit was built, encoded with its codecs.
      const int64_t extra =
          static_cast<int64_t>(added.size()) / (int64_t{kv_heads_} * shape_.head_dim);
      if (job->n + extra != num_tokens()) {
        return Status::internal("a refit of " + std::to_string(job->n) + " tokens plus " +
                                std::to_string(extra) + " added since does not cover the index's " +
                                std::to_string(num_tokens()));
      }
      const cpu::HostKeys host{added.data(), DType::kF32, extra, kv_heads_, shape_.head_dim};
      for (Stage& st : job->stages) {
        for (int h = 0; h < kv_heads_; ++h) {
          auto& head = st.codes[h];
          const size_t old_size = head.size();
          head.resize(old_size + static_cast<size_t>(extra * st.codec->code_size()));
          st.codec->encode(host, h, head.data() + old_size);
          if (st.codec->code() != KeyCode::kExact) {
            st.since_error[h] = cpu::squared_error(*st.codec, host, h, head.data() + old_size);
          }
        }
      }
      stages_ = std::move(job->stages);
      tracking_ = std::any_of(stages_.begin(), stages_.end(),
                              [](const Stage& st) { return st.codec->code() != KeyCode::kExact; });
      fit_tokens_ = job->n - job->fit_begin;
      tokens_since_fit_ = extra;
      fit_context_pending_ = false;
      return ok_status();
    });
  }
  if (!s.ok()) {
    last_refit_error_ = s.to_string();
    return;
  }
  ++refits_;
  last_refit_ms_ = job->build_ms;
  total_refit_ms_ += job->build_ms;
  last_refit_error_.clear();
}

}  // namespace pqkv::index
