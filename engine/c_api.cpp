// The C API: thin wrappers that turn C structs into the C++ types, Status into
// codes plus a thread-local message, and keep every exception inside.
#include "pqkv/pqkv.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "engine/c_handles.h"
#include "pqkv/store.h"

// Handles are ids checked on every call (engine/c_handles.h).
namespace capi = pqkv::capi;

namespace {

thread_local std::string g_last_error;
thread_local pqkv_status g_last_error_code = PQKV_OK;

pqkv_status report(const pqkv::Status& s) {
  g_last_error = s.ok() ? std::string() : s.to_string();
  g_last_error_code = static_cast<pqkv_status>(s.code());
  return g_last_error_code;
}

// Runs `fn` (returning Status); a thrown exception (allocation failure, say)
// becomes an Internal status instead of crossing into C.
template <class Fn>
pqkv_status guarded(Fn&& fn) {
  try {
    return report(fn());
  } catch (const std::bad_alloc&) {
    return report(pqkv::Status::resource_exhausted("out of host memory"));
  } catch (const std::exception& e) {
    return report(pqkv::Status::internal(std::string("unexpected exception: ") + e.what()));
  } catch (...) {
    return report(pqkv::Status::internal("unexpected exception"));
  }
}

pqkv::ModelSpec to_spec(const pqkv_model_spec& s) {
  pqkv::ModelSpec spec;
  spec.name = "custom";
  spec.num_layers = s.num_layers;
  spec.num_q_heads = s.num_q_heads;
  spec.num_kv_heads = s.num_kv_heads;
  spec.head_dim = s.head_dim;
  spec.dtype = static_cast<pqkv::DType>(s.dtype);
  return spec;
}

// The integer a C caller stored in an enum field or argument. Read through
// memcpy: in C any int is a valid enum value, while in C++ loading a value
// outside the enumerators' range is undefined.
template <class Enum>
int code_of(const Enum& e) {
  static_assert(sizeof(Enum) == sizeof(int));
  int v = 0;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

pqkv::Status check_dtype(const pqkv_dtype& t) {
  const int code = code_of(t);
  if (code == PQKV_BF16 || code == PQKV_F16 || code == PQKV_F32) return pqkv::ok_status();
  return pqkv::Status::invalid_argument("unknown dtype code " + std::to_string(code) +
                                        ": use PQKV_BF16, PQKV_F16 or PQKV_F32");
}

pqkv::Stream to_stream(void* stream) {
  return stream == nullptr ? pqkv::Stream::host() : pqkv::Stream::cuda(stream);
}

// Where a caller's buffer lives, as the C++ API must be told: always the host
// for a cpu store; for a CUDA store whatever CUDA says of the pointer, so a
// device pointer is never labelled (and read) as host memory.
pqkv::Device memory_of(const pqkv::Device& store, const void* ptr) {
  return store.is_cpu() ? pqkv::Device::cpu() : pqkv::memory_device_of(ptr);
}

pqkv::Status null_argument(const char* what) {
  return pqkv::Status::invalid_argument(std::string(what) + " is NULL");
}

}  // namespace

extern "C" {

const char* pqkv_last_error(void) {
  return g_last_error.c_str();
}

pqkv_status pqkv_last_error_code(void) {
  return g_last_error_code;
}

const char* pqkv_status_name(pqkv_status s) {
  // Switched on the stored integer: a C caller may pass any int.
  switch (code_of(s)) {
    case PQKV_OK:
      return "OK";
    case PQKV_INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case PQKV_FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case PQKV_NOT_FOUND:
      return "NOT_FOUND";
    case PQKV_ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case PQKV_OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case PQKV_RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case PQKV_UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case PQKV_UNAVAILABLE:
      return "UNAVAILABLE";
    case PQKV_IO_ERROR:
      return "IO_ERROR";
    case PQKV_CORRUPTION:
      return "CORRUPTION";
    case PQKV_INTERNAL:
      return "INTERNAL";
  }
  return "UNKNOWN";
}

const char* pqkv_version(void) {
  return PQKV_VERSION_STRING;
}

pqkv_status pqkv_model_spec_preset(const char* name, pqkv_model_spec* out) {
  return guarded([&] {
    if (name == nullptr || out == nullptr) return null_argument("name or out");
    auto spec = pqkv::ModelSpec::preset(name);
    if (!spec.ok()) return spec.status();
    *out = {spec->num_layers, spec->num_q_heads, spec->num_kv_heads, spec->head_dim,
            static_cast<pqkv_dtype>(spec->dtype)};
    return pqkv::ok_status();
  });
}

void pqkv_store_options_init(pqkv_store_options* options, const pqkv_model_spec* spec) {
  if (options == nullptr) return;
  *options = {};
  if (spec != nullptr) options->spec = *spec;
  options->cuda_device = -1;
  const pqkv::StoreOptions d;
  options->hbm_budget_bytes = d.hbm_budget_bytes;
  options->block_cache_bytes = d.block_cache_bytes;
  options->block_cache_tokens = d.block_cache_tokens;
  options->block_cache_aging_steps = d.block_cache_aging_steps;
  options->block_cache_admit_steps = d.block_cache_admit_steps;
}

void pqkv_sequence_options_init(pqkv_sequence_options* options) {
  if (options == nullptr) return;
  const pqkv::SequenceOptions d;
  *options = {};
  options->pq_m = d.pq.m;
  options->pq_bits = d.pq.bits;
  options->kmeans_iters = d.pq.kmeans_iters;
  options->sink = {d.budget.sink.tokens, d.budget.sink.ratio};
  options->window = {d.budget.window.tokens, d.budget.window.ratio};
  options->top_k = {d.budget.top_k.tokens, d.budget.top_k.ratio};
  options->fixed_at_prefill = d.budget.fixed_at_prefill ? 1 : 0;
  options->aggregation = static_cast<pqkv_gqa_aggregation>(d.aggregation);
  options->max_train_points_per_centroid = d.pq.max_train_points_per_centroid;
  options->seed = d.pq.seed;
  options->selection = nullptr;
  options->resident_sink_window = d.resident_sink_window ? 1 : 0;
  options->refit_threshold = d.refit_threshold;
  options->refit_min_tokens = d.refit_min_tokens;
}

pqkv_status pqkv_store_open(const pqkv_store_options* options, pqkv_store** out) {
  return guarded([&] {
    if (options == nullptr || out == nullptr) return null_argument("options or out");
    *out = nullptr;
    // Checked before the cast: an out-of-range code would wrap into a valid one.
    PQKV_RETURN_IF_ERROR(check_dtype(options->spec.dtype));
    if (options->cuda_device < -1) {
      return pqkv::Status::invalid_argument(
          "cuda_device must be -1 (cpu) or a GPU ordinal >= 0, got " +
          std::to_string(options->cuda_device));
    }
    pqkv::StoreOptions o;
    o.spec = to_spec(options->spec);
    o.device =
        options->cuda_device < 0 ? pqkv::Device::cpu() : pqkv::Device::cuda(options->cuda_device);
    o.dram_budget_bytes = options->dram_budget_bytes;
    o.num_threads = options->num_threads;
    if (options->hbm_budget_bytes < 0) {
      return pqkv::Status::invalid_argument("hbm_budget_bytes must be >= 0 (0 = unlimited), got " +
                                            std::to_string(options->hbm_budget_bytes));
    }
    o.hbm_budget_bytes = options->hbm_budget_bytes;
    o.block_cache_bytes = options->block_cache_bytes;
    // 0 (a zeroed struct) keeps the default.
    if (options->block_cache_tokens != 0) o.block_cache_tokens = options->block_cache_tokens;
    o.block_cache_aging_steps = options->block_cache_aging_steps;
    // 0 (a zeroed struct) keeps the default; StoreOptions::validate refuses
    // the rest of what is out of range.
    if (options->block_cache_admit_steps != 0) {
      o.block_cache_admit_steps = options->block_cache_admit_steps;
    }
    o.spill_to_disk = options->spill_to_disk != 0;
    o.dram_prealloc_bytes = options->dram_prealloc_bytes;
    if (options->directory != nullptr) o.directory = options->directory;
    if (options->model_fingerprint != nullptr) o.model_fingerprint = options->model_fingerprint;
    auto store = pqkv::Store::open(o);
    if (!store.ok()) return store.status();
    *out = capi::add_store(std::move(store).value());
    return pqkv::ok_status();
  });
}

void pqkv_store_close(pqkv_store* store) {
  if (store == nullptr) {
    report(pqkv::ok_status());
    return;
  }
  static_cast<void>(guarded([&] { return capi::close_store(store); }));
}

int64_t pqkv_store_dram_bytes_used(const pqkv_store* store) {
  int64_t n = -1;
  static_cast<void>(guarded([&] {
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    n = st->store->dram_bytes_used();
    return pqkv::ok_status();
  }));
  return n;
}

pqkv_status pqkv_store_preallocate_dram(pqkv_store* store, int64_t bytes) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    return st->store->preallocate_dram(bytes);
  });
}

int64_t pqkv_store_dram_bytes_for_tokens(const pqkv_store* store, int64_t tokens) {
  int64_t n = -1;
  static_cast<void>(guarded([&] {
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    n = st->store->dram_bytes_for_tokens(tokens);
    return pqkv::ok_status();
  }));
  return n;
}

}  // extern "C"

namespace {

pqkv::Result<pqkv::SequenceOptions> to_sequence_options(const pqkv_sequence_options* options) {
  pqkv::SequenceOptions o;
  o.pq.m = options->pq_m;
  o.pq.bits = options->pq_bits;
  o.pq.kmeans_iters = options->kmeans_iters;
  o.pq.max_train_points_per_centroid = options->max_train_points_per_centroid;
  o.pq.seed = options->seed;
  o.budget.sink = {options->sink.tokens, options->sink.ratio};
  o.budget.window = {options->window.tokens, options->window.ratio};
  o.budget.top_k = {options->top_k.tokens, options->top_k.ratio};
  o.budget.fixed_at_prefill = options->fixed_at_prefill != 0;
  const int aggregation = code_of(options->aggregation);
  if (aggregation != PQKV_GQA_SOFTMAX_SUM && aggregation != PQKV_GQA_MAX) {
    return pqkv::Status::invalid_argument("unknown GQA aggregation code " +
                                          std::to_string(aggregation) +
                                          ": use PQKV_GQA_SOFTMAX_SUM or PQKV_GQA_MAX");
  }
  o.aggregation = static_cast<pqkv::GqaAggregation>(aggregation);
  if (options->selection != nullptr) {
    auto selection = pqkv::SelectionConfig::parse(options->selection);
    if (!selection.ok()) return selection.status();
    o.selection = *selection;
  }
  o.resident_sink_window = options->resident_sink_window != 0;
  o.refit_threshold = options->refit_threshold;
  // 0 (a zeroed struct) keeps the default.
  if (options->refit_min_tokens != 0) o.refit_min_tokens = options->refit_min_tokens;
  return o;
}

// Runs `make` (giving a Result<shared_ptr<Sequence>>) under the store's handle
// lock and sets *out to the sequence's handle.
template <class Make>
pqkv::Status make_handle(pqkv_store* store, pqkv_sequence** out, Make&& make) {
  PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
  std::lock_guard lock(st->mu);
  // A close on another thread between resolving and locking.
  if (st->closed) return capi::resolve_store(store, "store").status();
  PQKV_ASSIGN_OR_RETURN(auto seq, make(*st->store));
  *out = capi::sequence_handle(st, std::move(seq));
  return pqkv::ok_status();
}

// Runs `remove` (Store::drop or Store::close_sequence of `name`) under the
// store's handle lock and releases the handle of the sequence it removed
// from memory.
template <class Remove>
pqkv::Status remove_name(pqkv_store* store, const char* name, Remove&& remove) {
  if (name == nullptr) return null_argument("name");
  PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
  std::shared_ptr<pqkv::Sequence> released;  // dropped after the lock, before `st`
  std::lock_guard lock(st->mu);
  if (st->closed) return capi::resolve_store(store, "store").status();
  auto before = st->store->get_sequence(name);
  const pqkv::Status s = remove(*st->store);
  // Checked after any outcome: a failed drop may still have forgotten the name.
  if (before.ok()) {
    auto after = st->store->get_sequence(name);
    if (!after.ok() || after.value() != before.value()) {
      released = capi::release_sequence(*st, before.value().get());
    }
  }
  return s;
}

}  // namespace

extern "C" {

pqkv_status pqkv_sequence_create(pqkv_store* store, const char* name,
                                 const pqkv_sequence_options* options, pqkv_sequence** out) {
  return guarded([&] {
    if (name == nullptr || options == nullptr || out == nullptr) {
      return null_argument("name, options or out");
    }
    *out = nullptr;
    PQKV_ASSIGN_OR_RETURN(const pqkv::SequenceOptions o, to_sequence_options(options));
    return make_handle(store, out, [&](pqkv::Store& s) { return s.create_sequence(name, o); });
  });
}

pqkv_status pqkv_sequence_get(pqkv_store* store, const char* name, pqkv_sequence** out) {
  return guarded([&] {
    if (name == nullptr || out == nullptr) return null_argument("name or out");
    *out = nullptr;  // as every call that makes a handle: none on failure
    return make_handle(store, out, [&](pqkv::Store& s) { return s.get_sequence(name); });
  });
}

pqkv_status pqkv_sequence_drop(pqkv_store* store, const char* name) {
  return guarded(
      [&] { return remove_name(store, name, [&](pqkv::Store& s) { return s.drop(name); }); });
}

pqkv_status pqkv_sequence_save(pqkv_store* store, pqkv_sequence* seq) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    if (s.store != st) {
      return pqkv::Status::invalid_argument(
          "seq is a sequence of another store: save it with the store that made it");
    }
    return st->store->save(*s.seq);
  });
}

pqkv_status pqkv_sequence_open(pqkv_store* store, const char* name, pqkv_sequence** out) {
  return guarded([&] {
    if (name == nullptr || out == nullptr) return null_argument("name or out");
    *out = nullptr;
    return make_handle(store, out, [&](pqkv::Store& s) { return s.open_sequence(name); });
  });
}

pqkv_status pqkv_sequence_close(pqkv_store* store, const char* name) {
  return guarded([&] {
    return remove_name(store, name, [&](pqkv::Store& s) { return s.close_sequence(name); });
  });
}

pqkv_status pqkv_store_compact(pqkv_store* store) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    return st->store->compact();
  });
}

pqkv_status pqkv_store_saved_sequence_names(pqkv_store* store, char* names, int64_t capacity,
                                            int64_t* needed) {
  return guarded([&] {
    if (needed == nullptr) return null_argument("needed");
    if (capacity < 0 || (names == nullptr && capacity > 0)) {
      return pqkv::Status::invalid_argument(
          "names may be NULL only with capacity 0, and capacity must be >= 0");
    }
    PQKV_ASSIGN_OR_RETURN(auto st, capi::resolve_store(store, "store"));
    PQKV_ASSIGN_OR_RETURN(const std::vector<std::string> saved, st->store->saved_sequence_names());
    std::string packed;
    for (const std::string& name : saved) {
      packed += name;
      packed += '\0';
    }
    packed += '\0';
    *needed = static_cast<int64_t>(packed.size());
    if (capacity < *needed) {
      return pqkv::Status::out_of_range("the saved names take " + std::to_string(*needed) +
                                        " bytes; capacity is " + std::to_string(capacity));
    }
    std::copy(packed.begin(), packed.end(), names);
    return pqkv::ok_status();
  });
}

int64_t pqkv_sequence_length(const pqkv_sequence* seq, int layer) {
  int64_t n = -1;
  static_cast<void>(guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    const int layers = s.seq->spec().num_layers;
    if (layer < 0 || layer >= layers) {
      return pqkv::Status::invalid_argument("layer " + std::to_string(layer) +
                                            " is out of range: the sequence has " +
                                            std::to_string(layers) + " layers");
    }
    n = s.seq->length(layer);
    return pqkv::ok_status();
  }));
  return n;
}

pqkv_status pqkv_sequence_append(pqkv_sequence* seq, int layer, const void* keys,
                                 const void* values, int64_t num_tokens, pqkv_dtype dtype,
                                 void* stream) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    PQKV_RETURN_IF_ERROR(check_dtype(dtype));
    const pqkv::ModelSpec& spec = s.seq->spec();
    const auto t = static_cast<pqkv::DType>(dtype);
    const pqkv::Device store = s.seq->device();
    return s.seq->append(layer,
                         pqkv::TensorView(keys, t, memory_of(store, keys),
                                          {num_tokens, spec.num_kv_heads, spec.head_dim}),
                         pqkv::TensorView(values, t, memory_of(store, values),
                                          {num_tokens, spec.num_kv_heads, spec.head_dim}),
                         to_stream(stream));
  });
}

pqkv_status pqkv_sequence_finish_prefill(pqkv_sequence* seq) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    return s.seq->finish_prefill();
  });
}

pqkv_status pqkv_sequence_finish_prefill_layer(pqkv_sequence* seq, int layer, void* stream) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    return s.seq->finish_prefill_layer(layer, to_stream(stream));
  });
}

pqkv_status pqkv_sequence_finish_prefill_with_progress(pqkv_sequence* seq,
                                                       pqkv_build_progress_fn progress,
                                                       void* user_data) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    pqkv::BuildProgressCallback callback;
    if (progress != nullptr) {
      callback = [progress, user_data](const pqkv::BuildProgress& p) {
        progress(p.layers_done, p.num_layers, p.tokens, p.elapsed_s, user_data);
      };
    }
    return s.seq->finish_prefill(callback);
  });
}

}  // extern "C"

namespace {

// `dtype` by reference, as every internal function takes a C enum: a copy
// of a value outside the enumerators is undefined in C++ (check_dtype reads
// the stored integer).
pqkv_status attend_impl(pqkv_sequence* seq, int layer, const void* queries, void* out,
                        const pqkv_dtype& dtype, void* stream, bool exact) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    PQKV_RETURN_IF_ERROR(check_dtype(dtype));
    const pqkv::ModelSpec& spec = s.seq->spec();
    const auto t = static_cast<pqkv::DType>(dtype);
    const pqkv::Device store = s.seq->device();
    const pqkv::TensorView q(queries, t, memory_of(store, queries),
                             {spec.num_q_heads, spec.head_dim});
    const pqkv::TensorView o(out, t, memory_of(store, out), {spec.num_q_heads, spec.head_dim});
    const pqkv::Stream st = to_stream(stream);
    return exact ? s.seq->attend_exact(layer, q, o, st) : s.seq->attend(layer, q, o, st);
  });
}

}  // namespace

extern "C" {

pqkv_status pqkv_sequence_attend(pqkv_sequence* seq, int layer, const void* queries, void* out,
                                 pqkv_dtype dtype, void* stream) {
  return attend_impl(seq, layer, queries, out, dtype, stream, false);
}

pqkv_status pqkv_sequence_attend_exact(pqkv_sequence* seq, int layer, const void* queries,
                                       void* out, pqkv_dtype dtype, void* stream) {
  return attend_impl(seq, layer, queries, out, dtype, stream, true);
}

pqkv_status pqkv_sequence_check_health(pqkv_sequence* seq) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    return s.seq->check_health();
  });
}

pqkv_status pqkv_sequence_sync_length(pqkv_sequence* seq, void* stream) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    return s.seq->sync_length(to_stream(stream));
  });
}

pqkv_status pqkv_sequence_reserve(pqkv_sequence* seq, int64_t max_tokens) {
  return guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    return s.seq->reserve(max_tokens);
  });
}

int64_t pqkv_sequence_max_selected(const pqkv_sequence* seq, int layer) {
  int64_t n = -1;
  const pqkv_status status = guarded([&] {
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    PQKV_ASSIGN_OR_RETURN(n, s.seq->max_selected(layer));
    return pqkv::ok_status();
  });
  return status == PQKV_OK ? n : -1;
}

pqkv_status pqkv_sequence_drift_stats(const pqkv_sequence* seq, int layer, pqkv_drift_stats* out) {
  return guarded([&] {
    if (out == nullptr) return null_argument("out");
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef s, capi::resolve_sequence(seq, "seq"));
    auto r = s.seq->drift_stats(layer);
    if (!r.ok()) return r.status();
    const pqkv::DriftStats& d = r.value();
    *out = {};
    out->tracking = d.tracking ? 1 : 0;
    out->fit_tokens = d.fit_tokens;
    out->tokens_since_fit = d.tokens_since_fit;
    out->mean_error_ratio = d.mean_error_ratio;
    out->max_error_ratio = d.max_error_ratio;
    out->refits = d.refits;
    out->refit_running = d.refit_running ? 1 : 0;
    out->last_refit_ms = d.last_refit_ms;
    out->total_refit_ms = d.total_refit_ms;
    return pqkv::ok_status();
  });
}

}  // extern "C"

namespace {

// A batched C call's store, the sequences it names (held for the call) and
// its steps, with each pointer's memory labelled.
struct Batch {
  std::shared_ptr<capi::StoreState> store;
  std::vector<capi::SequenceRef> refs;
  std::vector<pqkv::SequenceStep> steps;
};

pqkv::Status make_batch(pqkv_store* store, int n, pqkv_sequence* const* seqs,
                        const void* const* queries, void* const* outs, const pqkv_dtype& dtype,
                        Batch* batch) {
  PQKV_ASSIGN_OR_RETURN(batch->store, capi::resolve_store(store, "store"));
  if (n < 0)
    return pqkv::Status::invalid_argument("n must be non-negative, got " + std::to_string(n));
  if (n > 0 && (seqs == nullptr || queries == nullptr)) return null_argument("seqs or queries");
  PQKV_RETURN_IF_ERROR(check_dtype(dtype));
  const pqkv::ModelSpec& spec = batch->store->store->options().spec;
  const pqkv::Device device = batch->store->store->options().device;
  const auto t = static_cast<pqkv::DType>(dtype);
  batch->refs.reserve(n);
  batch->steps.resize(n);
  for (int i = 0; i < n; ++i) {
    const std::string what = "seqs[" + std::to_string(i) + "]";
    PQKV_ASSIGN_OR_RETURN(capi::SequenceRef ref, capi::resolve_sequence(seqs[i], what));
    if (ref.store != batch->store) {
      return pqkv::Status::invalid_argument(what +
                                            " is a sequence of another store: a batch takes "
                                            "sequences of the store it is called on");
    }
    batch->steps[i].sequence = ref.seq.get();
    batch->refs.push_back(std::move(ref));
    batch->steps[i].queries = pqkv::TensorView(queries[i], t, memory_of(device, queries[i]),
                                               {spec.num_q_heads, spec.head_dim});
    if (outs != nullptr) {
      batch->steps[i].out = pqkv::TensorView(outs[i], t, memory_of(device, outs[i]),
                                             {spec.num_q_heads, spec.head_dim});
    }
  }
  return pqkv::ok_status();
}

}  // namespace

extern "C" {

pqkv_status pqkv_attend_batch(pqkv_store* store, int layer, int n, pqkv_sequence* const* seqs,
                              const void* const* queries, void* const* outs, pqkv_dtype dtype,
                              void* stream) {
  return guarded([&] {
    if (n > 0 && outs == nullptr) return null_argument("outs");
    Batch batch;
    PQKV_RETURN_IF_ERROR(make_batch(store, n, seqs, queries, outs, dtype, &batch));
    return batch.store->store->attend(layer, batch.steps, to_stream(stream));
  });
}

pqkv_status pqkv_select_batch(pqkv_store* store, int layer, int n, pqkv_sequence* const* seqs,
                              const void* const* queries, pqkv_dtype dtype, int32_t* positions,
                              int64_t max_selected, int32_t* lengths, void* stream) {
  return guarded([&] {
    Batch batch;
    PQKV_RETURN_IF_ERROR(make_batch(store, n, seqs, queries, nullptr, dtype, &batch));
    const pqkv::Device device = batch.store->store->options().device;
    pqkv::SelectOutput out;
    out.positions = positions;
    out.max_selected = max_selected;
    out.lengths = lengths;
    out.memory = memory_of(device, positions);
    if (memory_of(device, lengths) != out.memory) {
      return pqkv::Status::invalid_argument(
          "positions and lengths must both be host memory or both device memory");
    }
    return batch.store->store->select(layer, batch.steps, out, to_stream(stream));
  });
}

}  // extern "C"
