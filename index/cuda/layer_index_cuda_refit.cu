// Drift tracking and refits of the CUDA index (layer_index_cuda.h, "Drift
// and refits"): the fit's error measured when it is trained, new keys'
// error measured beside each add's encode, and a refit built on the build
// stream and swapped in on a caller's stream once its event has completed.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda_check.h"
#include "index/cuda/layer_index_cuda_refit.h"
#include "index/cuda/pq_kmeans.cuh"
#include "index/cuda/sq_scan.cuh"

namespace pqkv::index {
namespace {

// Rows [begin, end) of keys [n, kv_heads, head_dim].
TensorView rows_of(const TensorView& keys, int64_t begin, int64_t end) {
  const int64_t row_bytes = keys.dim(1) * keys.dim(2) * dtype_size(keys.dtype);
  return TensorView(static_cast<const char*>(keys.data) + begin * row_bytes, keys.dtype,
                    keys.device, {end - begin, keys.dim(1), keys.dim(2)});
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
         status == cudaStreamCaptureStatusActive;
}

}  // namespace

Status LayerIndexCuda::init_drift(cudaStream_t stream) {
  PQKV_ASSIGN_OR_RETURN(drift_state_, gpu::DeviceArray<double>::allocate(
                                          cuda::drift_state_doubles(kv_heads_), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(drift_state_.get(), 0, drift_state_.bytes(), stream));
  PQKV_ASSIGN_OR_RETURN(drift_sums_,
                        gpu::DeviceArray<double>::allocate(2 * int64_t{kv_heads_}, stream));
  const auto mirror_bytes = static_cast<size_t>(cuda::drift_mirror_bytes(kv_heads_));
  PQKV_ASSIGN_OR_RETURN(drift_mirror_, gpu::PinnedBuffer::allocate(mirror_bytes));
  std::memset(drift_mirror_.data(), 0, mirror_bytes);
  drift_read_.assign(3 * static_cast<size_t>(kv_heads_), 0.0);
  return ok_status();
}

cuda::DriftCodec LayerIndexCuda::drift_codec(const CodecView& codec) const {
  cuda::DriftCodec c;
  c.kv_heads = kv_heads_;
  c.head_dim = shape_.head_dim;
  if (is_pq()) {
    c.m = shape_.m;
    c.ksub = shape_.ksub();
    c.centroids = codec.centroids;
  } else {
    c.bits = sq_bits();
    c.scale = codec.scale;
    c.offset = codec.offset;
  }
  return c;
}

Status LayerIndexCuda::start_drift(const TensorView& fit_keys, cudaStream_t stream) {
  tracking_ = selection_.code != KeyCode::kExact;
  fit_context_pending_ = true;
  fit_tokens_ = fit_keys.dim(0);
  refits_ = 0;
  last_refit_ms_ = 0;
  total_refit_ms_ = 0;
  last_refit_error_.clear();
  if (!tracking_) return ok_status();
  cuda::DriftFitArgs fit;
  fit.codec = drift_codec(live_codec());
  fit.keys = fit_keys.data;
  fit.dtype = fit_keys.dtype;
  fit.n = fit_keys.dim(0);
  fit.sums = drift_sums_.get();
  PQKV_RETURN_IF_ERROR(cuda::launch_drift_fit(fit, stream));
  cuda::DriftStartArgs start;
  start.kv_heads = kv_heads_;
  start.m = is_pq() ? shape_.m : 0;
  start.sums = drift_sums_.get();
  start.objective = is_pq() ? objective_.get() : nullptr;
  start.n = fit.n;
  start.generation = ++fit_generation_;
  start.state = drift_state_.get();
  start.mirror = drift_mirror_.as<cuda::DriftMirror>();
  return cuda::launch_drift_start(start, stream);
}

void LayerIndexCuda::stop_drift() {
  drop_refit("");
  tracking_ = false;
  fit_context_pending_ = false;
  fit_tokens_ = 0;
}

Status LayerIndexCuda::measure_drift(const TensorView& keys, int64_t first_token,
                                     const int64_t* first_position, cudaStream_t stream) {
  cuda::DriftMeasureArgs m;
  m.codec = drift_codec(live_codec());
  m.keys = keys.data;
  m.dtype = keys.dtype;
  m.n = keys.dim(0);
  m.codes = codes_.get();
  m.head_stride = capacity_ * code_size_;
  m.first_token = first_token;
  m.first_position = first_position;
  m.max_tokens = capacity_;
  m.state = drift_state_.get();
  m.mirror = drift_mirror_.as<cuda::DriftMirror>();
  return cuda::launch_drift_measure(m, stream);
}

Status LayerIndexCuda::after_add(const TensorView& keys, int64_t first_token,
                                 const int64_t* first_position, cudaStream_t stream) {
  if (tracking_ && !fit_context_pending_) {
    PQKV_RETURN_IF_ERROR(measure_drift(keys, first_token, first_position, stream));
  }
  fit_context_pending_ = false;
  // Keys added at a device-side position (replayed steps) are not kept:
  // advance() drops the refit when it counts them.
  if (refit_ == nullptr || first_position != nullptr) return ok_status();
  Refit& r = *refit_;
  const int64_t row = int64_t{kv_heads_} * shape_.head_dim;
  PQKV_RETURN_IF_ERROR(cuda::launch_keys_to_float(keys.data, keys.dtype, keys.dim(0), row,
                                                  r.pending.get(), first_token - r.n, stream));
  r.pending_tokens += keys.dim(0);
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(r.pending_used.get(), stream));
  return ok_status();
}

DriftStats LayerIndexCuda::drift_stats() const {
  DriftStats d = stage_drift_stats();
  if (rerank_ == nullptr) return d;
  // As the CPU index: per KV head, the stage that drifts most.
  const DriftStats r = rerank_->stage_drift_stats();
  if (!d.tracking) {
    d.fit_tokens = r.fit_tokens;
    d.tokens_since_fit = r.tokens_since_fit;
  }
  d.tracking = d.tracking || r.tracking;
  d.refits = std::max(d.refits, r.refits);
  d.refit_running = d.refit_running || r.refit_running;
  // Both builds run one after the other on the build stream.
  d.last_refit_ms += r.last_refit_ms;
  d.total_refit_ms += r.total_refit_ms;
  if (d.last_refit_error.empty()) d.last_refit_error = r.last_refit_error;
  if (!d.tracking) return d;
  d.head_error_ratio.resize(static_cast<size_t>(kv_heads_), 0.0);
  for (size_t h = 0; h < r.head_error_ratio.size() && h < d.head_error_ratio.size(); ++h)
    d.head_error_ratio[h] = std::max(d.head_error_ratio[h], r.head_error_ratio[h]);
  double sum = 0;
  d.max_error_ratio = 0;
  for (double ratio : d.head_error_ratio) {
    sum += ratio;
    d.max_error_ratio = std::max(d.max_error_ratio, ratio);
  }
  d.mean_error_ratio = sum / kv_heads_;
  return d;
}

DriftStats LayerIndexCuda::stage_drift_stats() const {
  DriftStats d;
  d.tracking = tracking_;
  d.fit_tokens = fit_tokens_;
  d.refits = refits_;
  d.refit_running = refit_ != nullptr;
  d.last_refit_ms = last_refit_ms_;
  d.total_refit_ms = total_refit_ms_;
  d.last_refit_error = last_refit_error_;
  if (!tracking_) return d;
  // A whole publish: the same even sequence number before and after the
  // read. A kernel writing now leaves the last whole read in place.
  const auto* m = drift_mirror_.as<const cuda::DriftMirror>();
  const size_t values = drift_read_.size();
  std::vector<double> read(values);
  for (int attempt = 0; attempt < 4; ++attempt) {
    const uint64_t before = m->seq;
    if (before % 2 != 0) continue;
    std::atomic_thread_fence(std::memory_order_acquire);
    const uint64_t generation = m->generation;
    const uint64_t tokens = m->tokens_since_fit;
    for (size_t i = 0; i < values; ++i)
      read[i] = m->values[i];
    std::atomic_thread_fence(std::memory_order_acquire);
    if (m->seq != before) continue;
    // Figures of an earlier fit: this fit's start has not run yet.
    if (generation != fit_generation_) break;
    drift_read_ = read;
    drift_read_tokens_ = tokens;
    drift_read_generation_ = generation;
    break;
  }
  d.head_error_ratio.assign(static_cast<size_t>(kv_heads_), 0.0);
  if (drift_read_generation_ != fit_generation_) return d;
  d.tokens_since_fit = static_cast<int64_t>(drift_read_tokens_);
  if (d.tokens_since_fit == 0) return d;
  const double tokens = static_cast<double>(d.tokens_since_fit);
  double sum = 0;
  for (int h = 0; h < kv_heads_; ++h) {
    const double fit = drift_read_[h];
    const double floor = drift_read_[kv_heads_ + h];
    const double since = drift_read_[2 * kv_heads_ + h];
    const double ratio = (since / tokens + floor) / (fit + floor);
    d.head_error_ratio[h] = ratio;
    sum += ratio;
    d.max_error_ratio = std::max(d.max_error_ratio, ratio);
  }
  d.mean_error_ratio = sum / kv_heads_;
  return d;
}

Status LayerIndexCuda::refit_on_device(const TensorView& keys, int64_t fit_begin,
                                       const PqConfig& config, Stream stream) {
  if (!trained()) {
    return Status::failed_precondition(
        "refit needs a trained index: train it first (a refit replaces a fit)");
  }
  // The stages with a quantization error: every one but exact keys.
  std::vector<LayerIndexCuda*> stages;
  for (LayerIndexCuda* s : {this, rerank_.get()}) {
    if (s != nullptr && s->selection_.code != KeyCode::kExact) stages.push_back(s);
  }
  if (stages.empty()) {
    return Status::failed_precondition("an index of exact keys has no quantization error to refit");
  }
  for (const LayerIndexCuda* s : stages) {
    if (s->refit_ != nullptr) {
      return Status::failed_precondition(
          "a refit of this index is still being built; wait for it to be swapped in (the first "
          "add or search after its work is done) before starting another");
    }
    if (s->is_pq()) PQKV_RETURN_IF_ERROR(s->shape_.check_config(config));
  }
  PQKV_RETURN_IF_ERROR(check_keys(keys, "refit keys"));
  const int64_t n = keys.dim(0);
  if (n != num_tokens_) {
    return Status::failed_precondition(
        "refit re-encodes every token: pass the keys of tokens [0, " + std::to_string(num_tokens_) +
        "), got " + std::to_string(n));
  }
  if (fit_begin < 0 || fit_begin >= n) {
    return Status::invalid_argument("refit's fit_begin " + std::to_string(fit_begin) +
                                    " is not within the " + std::to_string(n) + " tokens");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  for (LayerIndexCuda* s : stages)
    PQKV_RETURN_IF_ERROR(s->refit_stage(keys, fit_begin, config, caller));
  return ok_status();
}

Status LayerIndexCuda::refit_stage(const TensorView& keys, int64_t fit_begin,
                                   const PqConfig& config, cudaStream_t caller) {
  const int64_t n = keys.dim(0);
  auto r = std::make_unique<Refit>();
  r->n = n;
  r->fit_begin = fit_begin;
  r->capacity = capacity_;
  r->build = build_stream_;
  PQKV_ASSIGN_OR_RETURN(r->started, gpu::make_timing_event());
  PQKV_ASSIGN_OR_RETURN(r->done, gpu::make_timing_event());
  PQKV_ASSIGN_OR_RETURN(r->pending_used, gpu::make_event());
  // The keys added while it is built are written on the callers' streams.
  const int64_t row = int64_t{kv_heads_} * shape_.head_dim;
  PQKV_ASSIGN_OR_RETURN(
      r->pending, gpu::DeviceArray<float>::allocate((capacity_ - n) * row, caller, build_stream_));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(r->pending_used.get(), caller));

  PQKV_RETURN_IF_ERROR(build_after(caller));
  const cudaStream_t s = build_stream_;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(r->started.get(), s));
  const TensorView fit = rows_of(keys, fit_begin, n);
  if (is_pq()) {
    const int64_t centroids = int64_t{kv_heads_} * shape_.m * shape_.ksub() * shape_.dsub();
    PQKV_ASSIGN_OR_RETURN(r->centroids, gpu::DeviceArray<float>::allocate(centroids, s));
    PQKV_ASSIGN_OR_RETURN(r->objective,
                          gpu::DeviceArray<double>::allocate(int64_t{kv_heads_} * shape_.m, s));
    PQKV_RETURN_IF_ERROR(fit_pq(fit, config, r->centroids.get(), r->objective.get(), s));
  } else {
    PQKV_ASSIGN_OR_RETURN(r->scale, gpu::DeviceArray<float>::allocate(row, s));
    PQKV_ASSIGN_OR_RETURN(r->offset, gpu::DeviceArray<float>::allocate(row, s));
    cuda::SqFitArgs sq;
    sq.geo = {kv_heads_, shape_.head_dim, sq_bits()};
    sq.keys = fit.data;
    sq.dtype = fit.dtype;
    sq.n = fit.dim(0);
    sq.scale = r->scale.get();
    sq.offset = r->offset.get();
    PQKV_RETURN_IF_ERROR(cuda::launch_sq_fit(sq, s));
  }
  const CodecView codec{r->centroids.get(), r->scale.get(), r->offset.get()};
  PQKV_ASSIGN_OR_RETURN(r->codes, gpu::DeviceArray<uint8_t>::allocate(
                                      int64_t{kv_heads_} * capacity_ * code_size_, s));
  PQKV_RETURN_IF_ERROR(encode_with(codec, r->codes.get(), capacity_, keys, 0, s));
  PQKV_ASSIGN_OR_RETURN(r->sums, gpu::DeviceArray<double>::allocate(2 * int64_t{kv_heads_}, s));
  cuda::DriftFitArgs measure;
  measure.codec = drift_codec(codec);
  measure.keys = fit.data;
  measure.dtype = fit.dtype;
  measure.n = fit.dim(0);
  measure.sums = r->sums.get();
  PQKV_RETURN_IF_ERROR(cuda::launch_drift_fit(measure, s));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(r->done.get(), s));
  refit_ = std::move(r);
  return note_build();
}

Status LayerIndexCuda::install_refit(cudaStream_t caller) {
  // A rerank stage's refit is swapped in by its owner, with the first stage's.
  if (rerank_stage_) return ok_status();
  if (rerank_ == nullptr || rerank_->refit_ == nullptr) return install_stage_refit(caller);
  if (capturing(caller)) return ok_status();
  // Built after the first stage's on the same stream: once it is done, both are.
  const cudaError_t query = cudaEventQuery(rerank_->refit_->done.get());
  if (query == cudaErrorNotReady) return ok_status();
  PQKV_RETURN_IF_ERROR(install_stage_refit(caller));
  return rerank_->install_stage_refit(caller);
}

Status LayerIndexCuda::install_stage_refit(cudaStream_t caller) {
  if (refit_ == nullptr || capturing(caller)) return ok_status();
  const cudaError_t query = cudaEventQuery(refit_->done.get());
  if (query == cudaErrorNotReady) return ok_status();
  if (query != cudaSuccess) {
    drop_refit(std::string("the refit's work failed on the GPU: ") + cudaGetErrorString(query));
    PQKV_CUDA_RETURN_IF_ERROR(query);
  }
  Refit& r = *refit_;
  const int64_t extra = num_tokens_ - r.n;
  if (extra != r.pending_tokens || r.capacity != capacity_) {
    drop_refit("the index changed in a way the refit did not follow (" + std::to_string(extra) +
               " tokens added, " + std::to_string(r.pending_tokens) + " kept); it was dropped");
    return ok_status();
  }
  float ms = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, r.started.get(), r.done.get()));
  // Done already: these order memory, they do not wait.
  PQKV_RETURN_IF_ERROR(wait_ready(caller));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(caller, r.done.get(), 0));
  // Over the live buffers, whose addresses captured graphs hold.
  const int64_t size = code_size_;
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(codes_.get(), capacity_ * size, r.codes.get(),
                                              r.capacity * size, r.n * size, kv_heads_,
                                              cudaMemcpyDeviceToDevice, caller));
  if (is_pq()) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        centroids_.get(), r.centroids.get(), centroids_.bytes(), cudaMemcpyDeviceToDevice, caller));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        objective_.get(), r.objective.get(), objective_.bytes(), cudaMemcpyDeviceToDevice, caller));
    objective_from_training_ = true;
  } else {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(scale_.get(), r.scale.get(), scale_.bytes(),
                                              cudaMemcpyDeviceToDevice, caller));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(offset_.get(), r.offset.get(), offset_.bytes(),
                                              cudaMemcpyDeviceToDevice, caller));
  }
  cuda::DriftStartArgs start;
  start.kv_heads = kv_heads_;
  start.m = is_pq() ? shape_.m : 0;
  start.sums = r.sums.get();
  start.objective = is_pq() ? r.objective.get() : nullptr;
  start.n = r.n - r.fit_begin;
  start.generation = ++fit_generation_;
  start.state = drift_state_.get();
  start.mirror = drift_mirror_.as<cuda::DriftMirror>();
  PQKV_RETURN_IF_ERROR(cuda::launch_drift_start(start, caller));
  if (extra > 0) {
    // The keys added while it was built, with the new codec, counted as since its fit.
    const TensorView added(r.pending.get(), DType::kF32, device_,
                           {extra, kv_heads_, shape_.head_dim});
    PQKV_RETURN_IF_ERROR(encode(added, r.n, caller));
    PQKV_RETURN_IF_ERROR(measure_drift(added, r.n, nullptr, caller));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(r.pending_used.get(), caller));
  PQKV_RETURN_IF_ERROR(record_ready(caller));
  tracking_ = true;
  fit_context_pending_ = false;
  fit_tokens_ = r.n - r.fit_begin;
  ++refits_;
  last_refit_ms_ = ms;
  total_refit_ms_ += ms;
  last_refit_error_.clear();
  // Freed on the build stream once it has waited for the copies above.
  refit_.reset();
  return ok_status();
}

void LayerIndexCuda::drop_refit(const std::string& why) {
  if (refit_ == nullptr) return;
  if (!why.empty()) last_refit_error_ = why;
  refit_.reset();
}

}  // namespace pqkv::index
