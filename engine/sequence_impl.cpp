#include "engine/sequence_impl.h"

#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <thread>

#include <algorithm>

#include "core/host_memory.h"

namespace pqkv {
namespace {

// OK when every element of a host tensor [n, heads, dim] is finite and stays
// finite once stored as `storage` (fp32 input above 65504 overflows fp16);
// otherwise names the first bad element and its value. Device tensors are
// checked on the device after conversion (see check_health).
Status check_storable(const char* what, const TensorView& t, DType storage) {
  if (!t.device.is_cpu()) return ok_status();
  const int64_t i = find_unstorable(t.data, t.dtype, t.numel(), storage);
  if (i < 0) return ok_status();
  const int64_t heads = t.dim(1);
  const int64_t dim = t.dim(2);
  const float v = load_as_float(t.data, t.dtype, i);
  const std::string where = " at token " + std::to_string(i / (heads * dim)) + ", head " +
                            std::to_string((i / dim) % heads) + ", dim " + std::to_string(i % dim) +
                            "; nothing was appended";
  if (!std::isfinite(v)) {
    return Status::invalid_argument(std::string(what) + " contain a non-finite value (" +
                                    (std::isnan(v) ? "NaN" : "Inf") + ")" + where);
  }
  return Status::invalid_argument(
      std::string(what) + " contain " + std::to_string(v) + ", which overflows " +
      dtype_name(storage) + " storage" +
      (storage == DType::kF16 ? " (largest finite fp16 is 65504)" : "") + where +
      "; scale the input or store bf16 or fp32");
}

// The most tokens reserve() sizes a sequence for: past any real context, and
// low enough that block and byte counts of it fit int64.
constexpr int64_t kMaxReserveTokens = int64_t{1} << 40;

}  // namespace

Sequence::Impl::Impl(std::string name, const ModelSpec& spec, const SequenceOptions& options,
                     std::unique_ptr<engine::SequenceState> executor, tbb::task_arena* arena,
                     const void* owner)
    : name_(std::move(name)),
      spec_(spec),
      options_(options),
      executor_(std::move(executor)),
      arena_(arena),
      owner_(owner),
      layer_ended_(static_cast<size_t>(spec.num_layers), 0),
      layer_build_(static_cast<size_t>(spec.num_layers)),
      refit_error_(static_cast<size_t>(spec.num_layers)),
      refit_threads_(static_cast<size_t>(spec.num_layers)) {}

Sequence::Impl::~Impl() {
  wait_layer_builds();
}

void Sequence::Impl::wait_layer_builds() {
  arena_->execute([&] { layer_tasks_.wait(); });
  for (std::thread& t : refit_threads_) {
    if (t.joinable()) t.join();
  }
}

void Sequence::Impl::drop_layer_builds() {
  wait_layer_builds();
  executor_->drop_indexes();
  std::fill(layer_ended_.begin(), layer_ended_.end(), 0);
  std::fill(layer_build_.begin(), layer_build_.end(), ok_status());
}

Status Sequence::Impl::check_layer(int layer) const {
  if (layer >= 0 && layer < spec_.num_layers) return ok_status();
  return Status::invalid_argument("layer " + std::to_string(layer) + " is out of range: " +
                                  spec_.name + " has " + std::to_string(spec_.num_layers) +
                                  " layers (0.." + std::to_string(spec_.num_layers - 1) + ")");
}

Status Sequence::Impl::check_tensor_device(const char* what, const TensorView& t) const {
  const Device here = executor_->device();
  if (t.device.is_cpu() || t.device == here) return ok_status();
  return Status::invalid_argument(std::string(what) + " are on " + t.device.to_string() +
                                  " but this sequence runs on " + here.to_string() +
                                  "; pass host memory" +
                                  (here.is_cuda() ? " or memory of " + here.to_string() : ""));
}

int64_t Sequence::Impl::train_begin(int64_t length) const {
  return std::min(options_.budget.sink.resolve(length), length);
}

Status Sequence::Impl::check_append_order(int layer, int64_t n) const {
  if (!prefilled_) {
    if (layer_ended_[layer] == 0) return ok_status();
    return Status::failed_precondition(
        "append to layer " + std::to_string(layer) +
        " after finish_prefill_layer ended its prompt; append the whole prompt of a layer "
        "before ending it, and decode tokens after finish_prefill()");
  }
  if (layer > 0 && executor_->length(layer) + n > executor_->length(layer - 1)) {
    return Status::failed_precondition(
        "append out of order: layer " + std::to_string(layer) + " would hold " +
        std::to_string(executor_->length(layer) + n) + " tokens, more than layer " +
        std::to_string(layer - 1) + " (" + std::to_string(executor_->length(layer - 1)) +
        "); during decode append each new token to layer 0 first, then 1, 2, ...");
  }
  const int last = spec_.num_layers - 1;
  if (layer == 0 && executor_->length(0) != executor_->length(last)) {
    return Status::failed_precondition(
        "append out of order: layer 0 starts a new decode step, but layer " + std::to_string(last) +
        " has not received the previous token yet (it holds " +
        std::to_string(executor_->length(last)) + " tokens, layer 0 holds " +
        std::to_string(executor_->length(0)) + ")");
  }
  return ok_status();
}

Status Sequence::Impl::check_host_length(const char* call, Stream stream) const {
  bool behind = replayed_appends_;
  if (!behind && captured_appends_) {
    PQKV_ASSIGN_OR_RETURN(behind, executor_->lengths_behind(stream));
  }
  if (!behind) return ok_status();
  return Status::failed_precondition(
      std::string(call) + " on sequence '" + name_ +
      "', whose appends were captured in a CUDA graph: replays advance its length on the device "
      "only; call Sequence::sync_length(stream) after the replays, before any direct call");
}

Status Sequence::Impl::sync_length(Stream stream) {
  Status s = executor_->sync_length(stream);
  // The lengths are taken even when a replayed append overflowed.
  if (s.ok() || s.code() == StatusCode::kOutOfRange) replayed_appends_ = false;
  return s;
}

Status Sequence::Impl::append(int layer, const TensorView& keys, const TensorView& values,
                              Stream stream) {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  if (executor_->capturing(stream)) {
    // A decode step recorded for replay: its position is the device-side
    // length at each replay, so the host-side order checks do not apply.
    if (!prefilled_) {
      return Status::failed_precondition(
          "only decode steps can be captured in a CUDA graph: call finish_prefill() first");
    }
    PQKV_RETURN_IF_ERROR(keys.expect_shape("keys", {-1, spec_.num_kv_heads, spec_.head_dim}));
    PQKV_RETURN_IF_ERROR(
        values.expect_shape("values", {keys.dim(0), spec_.num_kv_heads, spec_.head_dim}));
    PQKV_RETURN_IF_ERROR(check_tensor_device("keys", keys));
    PQKV_RETURN_IF_ERROR(check_tensor_device("values", values));
    if (keys.dim(0) == 0) return ok_status();
    PQKV_RETURN_IF_ERROR(executor_->append(layer, keys, values, stream));
    replayed_appends_ = true;
    captured_appends_ = true;
    return ok_status();
  }
  PQKV_RETURN_IF_ERROR(check_host_length("append", stream));
  PQKV_RETURN_IF_ERROR(keys.expect_shape("keys", {-1, spec_.num_kv_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(
      values.expect_shape("values", {keys.dim(0), spec_.num_kv_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(check_tensor_device("keys", keys));
  PQKV_RETURN_IF_ERROR(check_tensor_device("values", values));
  // Rows the store would take, before any input is read: a token count past
  // the machine's memory (a byte count passed as tokens) cannot be input the
  // caller holds.
  PQKV_RETURN_IF_ERROR(check_fits_host_memory(
      static_cast<double>(keys.dim(0)) * static_cast<double>(spec_.row_bytes()),
      "the rows of " + std::to_string(keys.dim(0)) + " appended tokens"));
  PQKV_RETURN_IF_ERROR(check_storable("keys", keys, spec_.dtype));
  PQKV_RETURN_IF_ERROR(check_storable("values", values, spec_.dtype));
  PQKV_RETURN_IF_ERROR(check_append_order(layer, keys.dim(0)));
  if (keys.dim(0) == 0) return ok_status();
  // Isolated, so that the encoding's parallel loop never picks up a refit
  // task of the arena and holds the decode step for its length.
  PQKV_RETURN_IF_ERROR(tbb::this_task_arena::isolate(
      [&] { return executor_->append(layer, keys, values, stream); }));
  maybe_refit(layer, stream);
  return ok_status();
}

void Sequence::Impl::maybe_refit(int layer, Stream stream) {
  if (!prefilled_ || options_.refit_threshold <= 0) return;
  const index::LayerIndex* index = executor_->layer_index(layer);
  if (index == nullptr) return;
  const DriftStats d = index->drift_stats();
  if (!d.tracking || d.refit_running || d.tokens_since_fit < options_.refit_min_tokens ||
      d.max_error_ratio <= options_.refit_threshold) {
    return;
  }
  // A CUDA index enqueues its refit on its build stream after the work
  // queued on `stream`. On the CPU the job runs on a thread of its own, its
  // parallel loops on TBB's workers. Not a task of the Store's arena: one
  // spawned or enqueued from here was seen to wait until this thread next
  // waited in the arena, and a
  // thread entering the arena holds one of its slots for the whole refit,
  // so that this thread's next append could wait for a slot. The layer's
  // previous refit thread has finished (its refit was swapped in): joined
  // here.
  const Status s = guarded([&] {
    return executor_->refit_index(layer, train_begin(executor_->length(layer)), stream,
                                  [this, layer](std::function<void()> job) {
                                    std::thread& t = refit_threads_[layer];
                                    if (t.joinable()) t.join();
                                    t = std::thread(std::move(job));
                                  });
  });
  refit_error_[layer] = s.ok() ? std::string() : s.to_string();
}

Result<DriftStats> Sequence::Impl::drift_stats(int layer) const {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  const index::LayerIndex* index = executor_->layer_index(layer);
  if (index == nullptr) {
    return Status::failed_precondition(
        "layer " + std::to_string(layer) + " of sequence '" + name_ +
        "' has no index yet: drift is tracked from finish_prefill on");
  }
  DriftStats d = index->drift_stats();
  if (d.last_refit_error.empty()) d.last_refit_error = refit_error_[layer];
  return d;
}

Status Sequence::Impl::finish_prefill_layer(int layer, Stream stream) {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(check_host_length("finish_prefill_layer", stream));
  if (prefilled_) {
    return Status::failed_precondition("finish_prefill_layer on sequence '" + name_ +
                                       "' after finish_prefill: its indexes are built already");
  }
  if (layer_ended_[layer] != 0) {
    return Status::failed_precondition("finish_prefill_layer was already called for layer " +
                                       std::to_string(layer) + " of sequence '" + name_ + "'");
  }
  const int64_t length = executor_->length(layer);
  if (length == 0) {
    return Status::failed_precondition("finish_prefill_layer on layer " + std::to_string(layer) +
                                       ", which holds no tokens: append its prompt first");
  }
  layer_ended_[layer] = 1;
  const int64_t begin = train_begin(length);
  if (executor_->device().is_cuda()) {
    // Enqueued on the Store's build stream: returns without waiting.
    layer_build_[layer] = executor_->build_index(layer, begin, stream);
    return ok_status();
  }
  // Runs on the Store's worker threads (this call is inside its arena); the
  // task reads only this layer's rows and writes only its index.
  layer_tasks_.run([this, layer, begin] {
    layer_build_[layer] =
        guarded([&] { return executor_->build_index(layer, begin, Stream::host()); });
  });
  return ok_status();
}

Status Sequence::Impl::finish_prefill(const BuildProgressCallback& on_progress) {
  PQKV_RETURN_IF_ERROR(check_host_length("finish_prefill", Stream::host()));
  if (prefilled_) {
    return Status::failed_precondition("finish_prefill was already called on sequence '" + name_ +
                                       "'; append decode tokens and call attend");
  }
  wait_layer_builds();
  // On an error below the rows stay and the layers reopen for appends: the
  // caller can fix the prompt and call finish_prefill again.
  const auto fail = [&](Status s) {
    drop_layer_builds();
    return s;
  };
  const int64_t length = executor_->length(0);
  for (int l = 0; l < spec_.num_layers; ++l) {
    if (executor_->length(l) != length) {
      return fail(Status::failed_precondition(
          "finish_prefill needs every layer to hold the prompt, but layer 0 holds " +
          std::to_string(length) + " tokens and layer " + std::to_string(l) + " holds " +
          std::to_string(executor_->length(l))));
    }
  }
  if (length == 0) {
    return fail(
        Status::failed_precondition("finish_prefill on an empty sequence: append the prompt's "
                                    "keys and values to every layer first"));
  }
  // Before training, so that a bad device key is named, not blamed on k-means.
  if (Status s = check_health(); !s.ok()) return fail(s);
  const auto start = std::chrono::steady_clock::now();
  // The caller's code: an exception from it must not leave half the indexes.
  auto report = [&](int layers_done) -> Status {
    if (!on_progress) return ok_status();
    BuildProgress progress;
    progress.layers_done = layers_done;
    progress.num_layers = spec_.num_layers;
    progress.tokens = length;
    progress.elapsed_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return guarded([&] {
      on_progress(progress);
      return ok_status();
    });
  };
  if (Status s = report(0); !s.ok()) {
    return fail(s.with_context("the progress callback of finish_prefill"));
  }
  for (int l = 0; l < spec_.num_layers; ++l) {
    // Builds wait for the prefill's appends on their own; no caller stream is
    // needed. Layers ended by finish_prefill_layer have theirs started.
    Status s = layer_ended_[l] != 0
                   ? layer_build_[l]
                   : executor_->build_index(l, train_begin(length), Stream::host());
    if (!s.ok()) return fail(s.with_context("training the index of layer " + std::to_string(l)));
    s = report(l + 1);
    if (!s.ok()) return fail(s.with_context("the progress callback of finish_prefill"));
  }
  std::fill(layer_ended_.begin(), layer_ended_.end(), 0);
  prefilled_ = true;
  prefill_length_ = length;
  return ok_status();
}

Status Sequence::Impl::check_queries(const TensorView& queries, const TensorView& out) const {
  PQKV_RETURN_IF_ERROR(queries.expect_shape("queries", {spec_.num_q_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(out.expect_shape("out", {spec_.num_q_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(check_tensor_device("queries", queries));
  PQKV_RETURN_IF_ERROR(check_tensor_device("out", out));
  for (int64_t i = 0; queries.device.is_cpu() && i < queries.numel(); ++i) {
    if (!std::isfinite(load_as_float(queries.data, queries.dtype, i))) {
      return Status::invalid_argument("queries contain a non-finite value at element " +
                                      std::to_string(i));
    }
  }
  return ok_status();
}

Status Sequence::Impl::check_step(int layer, const TensorView& queries,
                                  const TensorView* out) const {
  if (!prefilled_) {
    return Status::failed_precondition(
        "decode step before finish_prefill on sequence '" + name_ +
        "': append the prompt to every layer and call finish_prefill() first");
  }
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  return check_queries(queries, out == nullptr ? queries : *out);
}

attention::DecodePlan Sequence::Impl::plan(int layer) const {
  return attention::plan_decode_step(options_.budget, executor_->length(layer), prefill_length_);
}

Status Sequence::Impl::ensure_index(int layer, const attention::DecodePlan& plan, Stream stream) {
  if (plan.search_k > 0 && executor_->layer_index(layer) == nullptr) {
    // The prompt left nothing past the sink to train on; the context has grown since.
    return executor_->build_index(layer, train_begin(plan.length), stream);
  }
  return ok_status();
}

Status Sequence::Impl::attend(int layer, const TensorView& queries, const TensorView& out,
                              Stream stream, AttendTrace* trace) {
  PQKV_RETURN_IF_ERROR(check_step(layer, queries, &out));
  const attention::DecodePlan p = plan(layer);
  // A captured step makes its plan on the device at each replay.
  if (executor_->capturing(stream)) return executor_->attend(layer, p, queries, out, stream, trace);
  PQKV_RETURN_IF_ERROR(check_host_length("attend", stream));
  PQKV_RETURN_IF_ERROR(ensure_index(layer, p, stream));
  // A trace synchronises anyway: the cheapest place to look at the device check.
  if (trace != nullptr) PQKV_RETURN_IF_ERROR(check_health());
  // Isolated as append is: a running refit stays on the other workers.
  return tbb::this_task_arena::isolate(
      [&] { return executor_->attend(layer, p, queries, out, stream, trace); });
}

Status Sequence::Impl::select(int layer, const TensorView& queries, int32_t* positions,
                              int64_t max_selected, bool positions_on_device, Stream stream) {
  PQKV_RETURN_IF_ERROR(check_host_length("select", stream));
  const attention::DecodePlan p = plan(layer);
  PQKV_RETURN_IF_ERROR(ensure_index(layer, p, stream));
  return tbb::this_task_arena::isolate([&] {
    return executor_->select(layer, p, queries, positions, max_selected, positions_on_device,
                             stream);
  });
}

Result<int64_t> Sequence::Impl::max_selected(int layer) const {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(check_host_length("max_selected", Stream::host()));
  if (!prefilled_) {
    return Status::failed_precondition("max_selected before finish_prefill on sequence '" + name_ +
                                       "': the budget is known once the prompt is in");
  }
  return plan(layer).tokens_per_head();
}

Status Sequence::Impl::reserve(int64_t max_tokens) {
  if (max_tokens < 0) {
    return Status::invalid_argument("reserve: max_tokens must be non-negative, got " +
                                    std::to_string(max_tokens));
  }
  // Past it, the block and byte counts below overflow int64 (INT64_MAX was
  // undefined behaviour in the row store); no machine holds such a context.
  if (max_tokens > kMaxReserveTokens) {
    return Status::resource_exhausted("reserve: " + std::to_string(max_tokens) +
                                      " tokens is past the " + std::to_string(kMaxReserveTokens) +
                                      " (2^40) a sequence can be sized for");
  }
  PQKV_RETURN_IF_ERROR(check_host_length("reserve", Stream::host()));
  // The largest step up to max_tokens: budgets only grow with the length.
  const int64_t prefill = prefilled_ ? prefill_length_ : max_tokens;
  const attention::DecodePlan p = attention::plan_decode_step(options_.budget, max_tokens, prefill);
  return executor_->reserve(max_tokens, p);
}

Status Sequence::Impl::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                    Stream stream) {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(check_queries(queries, out));
  PQKV_RETURN_IF_ERROR(check_host_length("attend_exact", stream));
  if (executor_->length(layer) == 0) {
    return Status::failed_precondition("attend_exact on layer " + std::to_string(layer) +
                                       ", which holds no tokens yet");
  }
  return executor_->attend_exact(layer, queries, out, stream);
}

}  // namespace pqkv
