#include "pqkv/store.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "engine/inspector.h"
#include "engine/saved_sequences.h"
#include "engine/sequence_impl.h"
#include "storage/block_arena.h"
#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "tiering/fetch_plan.h"

#if PQKV_HAVE_CUDA
#include "core/cuda_handles.h"
#endif

namespace pqkv {

// What a Store owns and lends its sequences: the DRAM budget, one arena of
// row blocks (heap for cpu, pinned and mapped for cuda), the tiers' fetch
// planner, the worker threads and, on a CUDA store, its per-device streams:
// one for callers that pass Stream::host() and a few low-priority build
// streams that sequences borrow for their index builds (Faiss's
// GpuResources: nothing per sequence or layer makes a stream).
// Declaration order is destruction order reversed: sequences go first and
// give their blocks back, then the arena returns its chunks to the budget.
class Store::Impl {
 public:
  explicit Impl(const StoreOptions& options)
      : options_(options),
        budget_(options.dram_budget_bytes),
        hbm_budget_(options.hbm_budget_bytes, "device memory", "HBM",
                    "StoreOptions::hbm_budget_bytes"),
        cache_budget_(options.block_cache_bytes, "block cache memory", "block cache",
                      "StoreOptions::block_cache_bytes"),
        arena_(options.num_threads > 0 ? options.num_threads : tbb::task_arena::automatic) {}

  Status init() {
    if (!options_.directory.empty()) {
      PQKV_ASSIGN_OR_RETURN(saved_, engine::SavedSequences::open(options_.directory));
    }
    if (options_.spill_to_disk) PQKV_RETURN_IF_ERROR(reset_spill_directory());
    const int64_t block_bytes = storage::KvRowStore::block_bytes(options_.spec);
    if (options_.device.is_cpu()) {
      rows_ = storage::BlockArena::heap(block_bytes, &budget_);
      return preallocate_at_open();
    }
#if PQKV_HAVE_CUDA
    PQKV_RETURN_IF_ERROR(check_device_usable(options_.device));
    gpu::ScopedDevice guard;
    PQKV_RETURN_IF_ERROR(guard.enter(options_.device));
    PQKV_ASSIGN_OR_RETURN(rows_, storage::BlockArena::pinned(block_bytes, &budget_));
    // Decode before builds: the Store's own stream at the device's greatest
    // priority, the batch streams ranked from it down to one level above
    // the least, the block cache's admissions at the lowest batch stream's
    // level, and the build streams (index builds and refits) alone at the
    // least, so that their kernels take the SMs decode leaves.
    PQKV_ASSIGN_OR_RETURN(stream_, gpu::make_ranked_stream(0, 1));
    PQKV_ASSIGN_OR_RETURN(copy_stream_,
                          gpu::make_ranked_stream(kBatchStreams - 1, kBatchStreams + 1));
    for (auto& s : build_streams_) {
      PQKV_ASSIGN_OR_RETURN(s, gpu::make_low_priority_stream());
    }
    for (size_t i = 0; i < kBatchStreams; ++i) {
      PQKV_ASSIGN_OR_RETURN(batch_streams_[i], gpu::make_ranked_stream(i, kBatchStreams + 1));
      PQKV_ASSIGN_OR_RETURN(join_events_[i], gpu::make_event());
    }
    PQKV_ASSIGN_OR_RETURN(fork_event_, gpu::make_event());
    return preallocate_at_open();
#else
    return Status::unavailable("pqkv was built without CUDA; open the store with device cpu");
#endif
  }

  Status preallocate_at_open() {
    const Status s = rows_->preallocate(options_.dram_prealloc_bytes);
    if (s.ok()) return s;
    return s.with_context("taking StoreOptions::dram_prealloc_bytes = " +
                          std::to_string(options_.dram_prealloc_bytes) +
                          " when opening the store; lower it or raise dram_budget_bytes");
  }

  std::string spill_directory() const {
    return options_.directory + "/spill";
  }

  // Creates the spill directory, or empties it: files left there belong to
  // sequences of a Store that did not close (spilled rows live no longer
  // than their sequence).
  Status reset_spill_directory() const {
    std::error_code ec;
    const std::filesystem::path dir = spill_directory();
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return Status::io_error("cannot create the spill directory " + dir.string() + ": " +
                              ec.message());
    }
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      if (entry.path().extension() == ".seg") std::filesystem::remove(entry.path(), ec);
    }
    if (ec) {
      return Status::io_error("cannot empty the spill directory " + dir.string() + ": " +
                              ec.message());
    }
    return ok_status();
  }

  Stream host_stream() const {
#if PQKV_HAVE_CUDA
    if (stream_ != nullptr) return Stream::cuda(stream_.get());
#endif
    return Stream::host();
  }

  // The build stream lent to the next sequence: round robin, so that
  // different sequences' builds may run side by side while one sequence's
  // builds run in layer order on one stream.
  Stream next_build_stream() {
#if PQKV_HAVE_CUDA
    if (build_streams_[0] != nullptr) {
      const size_t i = next_build_stream_++ % build_streams_.size();
      return Stream::cuda(build_streams_[i].get());
    }
#endif
    return Stream::host();
  }

  // Checks every step of a batch before any runs.
  Status check_steps(int layer, std::span<const SequenceStep> steps, bool with_out) const {
    std::unordered_set<const Sequence*> seen;
    for (size_t i = 0; i < steps.size(); ++i) {
      const SequenceStep& step = steps[i];
      const std::string which = "step " + std::to_string(i);
      if (step.sequence == nullptr) {
        return Status::invalid_argument(which + " has no sequence");
      }
      Sequence::Impl* seq = &engine::Inspector::impl(*step.sequence);
      if (seq->owner() != this) {
        return Status::invalid_argument(which + ": sequence '" + step.sequence->name() +
                                        "' belongs to another store");
      }
      if (!seen.insert(step.sequence).second) {
        return Status::invalid_argument(which + ": sequence '" + step.sequence->name() +
                                        "' appears twice in one batch");
      }
      Status s = seq->check_step(layer, step.queries, with_out ? &step.out : nullptr);
      if (!s.ok()) return s.with_context(which + " (sequence '" + step.sequence->name() + "')");
    }
    return ok_status();
  }

  Status need_directory(const char* what) const {
    if (saved_ != nullptr) return ok_status();
    return Status::failed_precondition(std::string(what) +
                                       " needs a store opened on a directory; set "
                                       "StoreOptions::directory");
  }

  // A new sequence's handle, not yet registered.
  Result<std::shared_ptr<Sequence>> make_sequence(const std::string& name,
                                                  const SequenceOptions& options) {
    engine::SequenceStateConfig config;
    config.spec = options_.spec;
    config.options = options;
    config.device = options_.device;
    config.arena = rows_;
    config.tiers = &tiers_;
    config.host_stream = host_stream();
    config.build_stream = next_build_stream();
    config.hbm_budget = &hbm_budget_;
    config.block_cache.tokens_per_block = options_.block_cache_tokens;
    config.block_cache.aging_interval = options_.block_cache_aging_steps;
    config.block_cache.admit_count = options_.block_cache_admit_steps;
    if (options_.block_cache_bytes > 0) config.cache_budget = &cache_budget_;
#if PQKV_HAVE_CUDA
    if (copy_stream_ != nullptr) config.copy_stream = Stream::cuda(copy_stream_.get());
#endif
    if (options_.spill_to_disk) {
      config.spill.directory = spill_directory();
      config.spill.file_prefix = "seq" + std::to_string(next_spill_id_.fetch_add(1));
      config.spill.budget = options.budget;
    }
    PQKV_ASSIGN_OR_RETURN(auto executor, engine::make_sequence_state(config));
    return std::make_shared<Sequence>(std::make_unique<Sequence::Impl>(
        name, options_.spec, options, std::move(executor), &arena_, this));
  }

#if PQKV_HAVE_CUDA
  // A CUDA store's batch (attend or select) forks from the caller's stream
  // onto the Store's batch streams (step i on stream i % kBatchStreams) and
  // joins back, so one sequence's gather over PCIe overlaps another's search
  // and attention, and the small grids of short sequences share the device.
  // Stream i's priority falls with i, so the steps finish in order and
  // their gathers overlap later steps' searches (the replayed batch of 8 ran
  // 1.05x to 1.15x faster with it, docs/benchmarks.md).
  // Host queries and outputs go through one device buffer, copied in before
  // the fork and out after the join, with one host wait for the whole batch.
  // Works inside a stream capture (the fork and join become graph edges).
  struct BatchIo {
    cudaStream_t origin = nullptr;
    bool host_io = false;             // some tensor is on the host: the call waits once at the end
    std::vector<TensorView> queries;  // on the device
    std::vector<TensorView> outs;     // on the device (attend only)
    std::byte* extra = nullptr;       // `extra` bytes of batch_io_ asked by the caller
  };

  cudaStream_t origin_stream(Stream stream) const {
    return static_cast<cudaStream_t>(stream.host_only ? stream_.get() : stream.handle);
  }

  static Result<bool> is_capturing(cudaStream_t s) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(s, &capture));
    return capture != cudaStreamCaptureStatusNone;
  }

  // Device views of every step's queries (and outputs when with_out): the
  // caller's where they are on the device, slices of batch_io_ where they
  // are on the host, host queries copied in on io->origin. Holds
  // batch_mutex_ (the caller's lock) while batch_io_ is in use.
  Status stage_batch(std::span<const SequenceStep> steps, bool with_out, size_t extra,
                     BatchIo* io) {
    size_t staged = 0;
    const auto slice = [&](size_t bytes) {
      const size_t at = staged;
      staged += (bytes + 255) / 256 * 256;
      return at;
    };
    std::vector<size_t> q_at(steps.size());
    std::vector<size_t> out_at(steps.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      if (!steps[i].queries.device.is_cuda()) q_at[i] = slice(steps[i].queries.bytes());
      if (with_out && !steps[i].out.device.is_cuda()) out_at[i] = slice(steps[i].out.bytes());
    }
    const size_t extra_at = slice(extra);
    // Idle here: every call that staged through it waited before returning.
    PQKV_RETURN_IF_ERROR(batch_io_.reserve(staged));
    auto* base = batch_io_.as<std::byte>();
    io->queries.assign(steps.size(), TensorView());
    io->outs.assign(steps.size(), TensorView());
    for (size_t i = 0; i < steps.size(); ++i) {
      TensorView& q = io->queries[i];
      q = steps[i].queries;
      if (!q.device.is_cuda()) {
        io->host_io = true;
        q.data = base + q_at[i];
        q.device = options_.device;
        PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(q.data, steps[i].queries.data, q.bytes(),
                                                  cudaMemcpyHostToDevice, io->origin));
      }
      if (!with_out) continue;
      TensorView& o = io->outs[i];
      o = steps[i].out;
      if (!o.device.is_cuda()) {
        io->host_io = true;
        o.data = base + out_at[i];
        o.device = options_.device;
      }
    }
    io->extra = extra > 0 ? base + extra_at : nullptr;
    return ok_status();
  }

  // Runs fn(i, batch stream of step i) for every step between a fork from
  // `origin` and a join back into it. Every forked stream joins even after
  // a failed step (a capture left with unjoined streams cannot end); the
  // first failure is reported by step.
  template <class Fn>
  Status run_forked(std::span<const SequenceStep> steps, cudaStream_t origin, Fn&& fn) {
    const size_t forks = std::min(steps.size(), kBatchStreams);
    // Steps of a batch run side by side: each one's search holds a share of
    // the SMs only (SequenceState::set_search_sm_share) until the call returns.
    struct SharedDevice {
      std::span<const SequenceStep> steps;
      explicit SharedDevice(std::span<const SequenceStep> s) : steps(s) {
        mark(s.size() > 1 ? kBatchSearchSmShare : 1.0f);
      }
      ~SharedDevice() { mark(1.0f); }
      SharedDevice(const SharedDevice&) = delete;
      SharedDevice& operator=(const SharedDevice&) = delete;
      void mark(float share) const {
        for (const SequenceStep& step : steps)
          engine::Inspector::impl(*step.sequence).state().set_search_sm_share(share);
      }
    } shared(steps);
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(fork_event_.get(), origin));
    for (size_t k = 0; k < forks; ++k)
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(batch_streams_[k].get(), fork_event_.get()));
    std::vector<Status> results(steps.size());
    for (size_t i = 0; i < steps.size(); ++i)
      results[i] = fn(i, Stream::cuda(batch_streams_[i % kBatchStreams].get()));
    for (size_t k = 0; k < forks; ++k) {
      PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(join_events_[k].get(), batch_streams_[k].get()));
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(origin, join_events_[k].get()));
    }
    for (size_t i = 0; i < steps.size(); ++i) {
      if (!results[i].ok()) {
        return results[i].with_context("step " + std::to_string(i) + " (sequence '" +
                                       steps[i].sequence->name() + "')");
      }
    }
    return ok_status();
  }

  // Store::attend on a CUDA store. Host tensors cannot be captured: under a
  // capture they take the one-by-one path and its error.
  Status attend_batch_cuda(int layer, std::span<const SequenceStep> steps, Stream stream) {
    gpu::ScopedDevice guard;
    PQKV_RETURN_IF_ERROR(guard.enter(options_.device));
    BatchIo io;
    io.origin = origin_stream(stream);
    PQKV_ASSIGN_OR_RETURN(const bool capturing, is_capturing(io.origin));
    bool host_io = stream.host_only;
    for (const SequenceStep& step : steps)
      host_io = host_io || !step.queries.device.is_cuda() || !step.out.device.is_cuda();
    if (capturing && host_io) {
      return for_each_step(steps, [&](size_t i) {
        return engine::Inspector::impl(*steps[i].sequence)
            .attend(layer, steps[i].queries, steps[i].out, stream, nullptr);
      });
    }
    std::lock_guard<std::mutex> lock(batch_mutex_);
    PQKV_RETURN_IF_ERROR(stage_batch(steps, /*with_out=*/true, 0, &io));
    PQKV_RETURN_IF_ERROR(run_forked(steps, io.origin, [&](size_t i, Stream on) {
      return engine::Inspector::impl(*steps[i].sequence)
          .attend(layer, io.queries[i], io.outs[i], on, nullptr);
    }));
    for (size_t i = 0; i < steps.size(); ++i) {
      if (steps[i].out.device.is_cuda()) continue;
      PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(steps[i].out.data, io.outs[i].data,
                                                io.outs[i].bytes(), cudaMemcpyDeviceToHost,
                                                io.origin));
    }
    if (!host_io) return ok_status();
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(io.origin));
    // Finished steps: a non-finite output is answered now, as attend() does.
    return for_each_step(steps, [&](size_t i) {
      return engine::Inspector::impl(*steps[i].sequence).take_output_report();
    });
  }

  // Store::select on a CUDA store: positions for host memory are written to
  // a device slice of batch_io_ in the caller's layout and copied out in one
  // piece after the join.
  Status select_batch_cuda(int layer, std::span<const SequenceStep> steps, const SelectOutput& out,
                           Stream stream) {
    gpu::ScopedDevice guard;
    PQKV_RETURN_IF_ERROR(guard.enter(options_.device));
    BatchIo io;
    io.origin = origin_stream(stream);
    const bool host_positions = !out.memory.is_cuda();
    const size_t per_step = sizeof(int32_t) * options_.spec.num_kv_heads * out.max_selected;
    std::lock_guard<std::mutex> lock(batch_mutex_);
    PQKV_RETURN_IF_ERROR(
        stage_batch(steps, /*with_out=*/false, host_positions ? per_step * steps.size() : 0, &io));
    auto* positions = host_positions ? reinterpret_cast<int32_t*>(io.extra) : out.positions;
    PQKV_RETURN_IF_ERROR(run_forked(steps, io.origin, [&](size_t i, Stream on) {
      return engine::Inspector::impl(*steps[i].sequence)
          .select(layer, io.queries[i], positions + i * per_step / sizeof(int32_t),
                  out.max_selected, /*positions_on_device=*/true, on);
    }));
    if (host_positions) {
      PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.positions, positions, per_step * steps.size(),
                                                cudaMemcpyDeviceToHost, io.origin));
    }
    if (host_positions || io.host_io || stream.host_only)
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(io.origin));
    return ok_status();
  }
#endif

  // Runs fn(i) for every step: in parallel on the worker threads for a cpu
  // store, in order on the calling thread for a CUDA store. Reports the first
  // failure by step.
  template <class Fn>
  Status for_each_step(std::span<const SequenceStep> steps, Fn&& fn) {
    std::vector<Status> results(steps.size());
    if (options_.device.is_cpu()) {
      arena_.execute([&] {
        tbb::parallel_for(size_t{0}, steps.size(), [&](size_t i) {
          results[i] = Sequence::Impl::guarded([&] { return fn(i); });
        });
      });
    } else {
      for (size_t i = 0; i < steps.size(); ++i)
        results[i] = fn(i);
    }
    for (size_t i = 0; i < steps.size(); ++i) {
      if (!results[i].ok()) {
        return results[i].with_context("step " + std::to_string(i) + " (sequence '" +
                                       steps[i].sequence->name() + "')");
      }
    }
    return ok_status();
  }

  StoreOptions options_;
  storage::MemoryBudget budget_;
  storage::MemoryBudget hbm_budget_;  // resident rows on a CUDA store
  // Block cache slots of every sequence (also charged to hbm_budget_ on a CUDA store).
  storage::MemoryBudget cache_budget_;
  std::shared_ptr<storage::BlockArena> rows_;
  tiering::FetchPlanner tiers_;            // where each step's rows come from
  std::atomic<int64_t> next_spill_id_{0};  // names each sequence's spill files
#if PQKV_HAVE_CUDA
  // Low-priority streams that index builds borrow (kBuildStreams of them).
  static constexpr size_t kBuildStreams = 4;
  gpu::StreamHandle stream_;
  gpu::StreamHandle copy_stream_;  // block cache admissions of every sequence
  std::array<gpu::StreamHandle, kBuildStreams> build_streams_;
  std::atomic<size_t> next_build_stream_{0};
  // Streams a batched step forks onto, their join events, and the device
  // copies of a batch's host queries and outputs; batch_mutex_ lets one
  // batched CUDA step at a time use them.
  static constexpr size_t kBatchStreams = 8;
  // The share of the SMs each search of a batch of two or more may hold
  // (index::SearchRequest::sm_share): the persistent int4/int8 search on a
  // quarter of the SMs runs beside the other sequences' gathers. Replayed
  // batch of 8 at 32K, 10%: 754 us against 843-859 us with the six-kernel
  // search (0, the previous choice), 799 us at 0.5; holding every SM (1)
  // made it slower still (docs/benchmarks.md).
  static constexpr float kBatchSearchSmShare = 0.25f;
  std::array<gpu::StreamHandle, kBatchStreams> batch_streams_;
  std::array<gpu::EventHandle, kBatchStreams> join_events_;
  gpu::EventHandle fork_event_;
  gpu::DeviceBuffer batch_io_;
  std::mutex batch_mutex_;
#endif
  tbb::task_arena arena_;     // every sequence's CPU work runs here
  mutable std::mutex mutex_;  // guards sequences_
  std::map<std::string, std::shared_ptr<Sequence>> sequences_;
  std::unique_ptr<engine::SavedSequences> saved_;  // null for an in-memory store
};

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::open(const StoreOptions& options) {
  PQKV_RETURN_IF_ERROR(options.validate());
  std::unique_ptr<Impl> impl;
  PQKV_RETURN_IF_ERROR(Sequence::Impl::guarded([&] {
    impl = std::make_unique<Impl>(options);
    return impl->init();
  }));
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

const StoreOptions& Store::options() const {
  return impl_->options_;
}

Result<std::shared_ptr<Sequence>> Store::create_sequence(const std::string& name,
                                                         const SequenceOptions& options) {
  if (name.empty()) return Status::invalid_argument("a sequence needs a non-empty name");
  PQKV_RETURN_IF_ERROR(options.validate(impl_->options_.spec));
  std::shared_ptr<Sequence> made;
  PQKV_RETURN_IF_ERROR(Sequence::Impl::guarded([&]() -> Status {
    std::lock_guard lock(impl_->mutex_);
    if (impl_->sequences_.count(name) != 0) {
      return Status::already_exists("a sequence named '" + name +
                                    "' exists already; drop it first or pick another name");
    }
    PQKV_ASSIGN_OR_RETURN(made, impl_->make_sequence(name, options));
    impl_->sequences_.emplace(name, made);
    return ok_status();
  }));
  return made;
}

Result<std::shared_ptr<Sequence>> Store::get_sequence(const std::string& name) {
  std::lock_guard lock(impl_->mutex_);
  auto it = impl_->sequences_.find(name);
  if (it == impl_->sequences_.end()) {
    return Status::not_found("no sequence named '" + name + "' in this store");
  }
  return it->second;
}

Status Store::drop(const std::string& name) {
  return Sequence::Impl::guarded([&]() -> Status {
    std::lock_guard lock(impl_->mutex_);
    const bool in_memory = impl_->sequences_.erase(name) != 0;
    bool saved = false;
    if (impl_->saved_ != nullptr) {
      Status s = impl_->saved_->drop(name);
      if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
      saved = s.ok();
    }
    if (!in_memory && !saved) {
      return Status::not_found("cannot drop '" + name + "': no such sequence");
    }
    return ok_status();
  });
}

Status Store::save(Sequence& sequence) {
  PQKV_RETURN_IF_ERROR(impl_->need_directory("save"));
  Sequence::Impl& seq = engine::Inspector::impl(sequence);
  if (seq.owner() != impl_.get()) {
    return Status::invalid_argument("save: sequence '" + sequence.name() +
                                    "' belongs to another store");
  }
  return Sequence::Impl::guarded([&] {
    Status s = impl_->saved_->save(seq, impl_->options_.model_fingerprint);
    return s.ok() ? s : s.with_context("saving sequence '" + sequence.name() + "'");
  });
}

Result<std::shared_ptr<Sequence>> Store::open_sequence(const std::string& name) {
  PQKV_RETURN_IF_ERROR(impl_->need_directory("open_sequence"));
  std::shared_ptr<Sequence> made;
  const Status opened = Sequence::Impl::guarded([&]() -> Status {
    std::lock_guard lock(impl_->mutex_);
    if (impl_->sequences_.count(name) != 0) {
      return Status::already_exists("sequence '" + name +
                                    "' is open already: use get_sequence, or close_sequence "
                                    "it first to load its save");
    }
    PQKV_ASSIGN_OR_RETURN(engine::SavedSequenceInfo info, impl_->saved_->info(name));
    const StoreOptions& here = impl_->options_;
    if (info.model_fingerprint != here.model_fingerprint) {
      return Status::failed_precondition(
          "sequence '" + name + "' was saved with model fingerprint '" + info.model_fingerprint +
          "' but this store has '" + here.model_fingerprint +
          "'; open the store with the model it was saved with");
    }
    const ModelSpec& a = info.spec;
    const ModelSpec& b = here.spec;
    if (a.num_layers != b.num_layers || a.num_q_heads != b.num_q_heads ||
        a.num_kv_heads != b.num_kv_heads || a.head_dim != b.head_dim || a.dtype != b.dtype) {
      return Status::failed_precondition("sequence '" + name + "' was saved with geometry " +
                                         a.to_string() + " but this store has " + b.to_string() +
                                         "; open the store with the saved geometry");
    }
    PQKV_RETURN_IF_ERROR(info.options.validate(here.spec));
    PQKV_ASSIGN_OR_RETURN(made, impl_->make_sequence(name, info.options));
    Sequence::Impl& seq = engine::Inspector::impl(*made);
    Status loaded = seq.run([&] { return impl_->saved_->load(name, seq); });
    if (!loaded.ok()) return loaded.with_context("opening saved sequence '" + name + "'");
    impl_->sequences_.emplace(name, made);
    return ok_status();
  });
  if (opened.code() == StatusCode::kCorruption) {
    return Status::corruption(opened.message() + "; its save cannot be used: drop '" + name +
                              "' (Store::drop) and save it again, or restore " +
                              impl_->options_.directory +
                              " from a backup (`pqkv inspect DIR --verify` lists what is damaged)");
  }
  PQKV_RETURN_IF_ERROR(opened);
  return made;
}

Status Store::close_sequence(const std::string& name) {
  std::lock_guard lock(impl_->mutex_);
  if (impl_->sequences_.erase(name) == 0) {
    return Status::not_found("cannot close '" + name + "': it is not in memory");
  }
  return ok_status();
}

Result<std::vector<std::string>> Store::saved_sequence_names() const {
  if (impl_->saved_ == nullptr) return std::vector<std::string>{};
  return impl_->saved_->names();
}

Status Store::compact() {
  PQKV_RETURN_IF_ERROR(impl_->need_directory("compact"));
  return Sequence::Impl::guarded([&] { return impl_->saved_->compact(); });
}

std::vector<std::string> Store::sequence_names() const {
  std::lock_guard lock(impl_->mutex_);
  std::vector<std::string> names;
  for (const auto& [name, seq] : impl_->sequences_)
    names.push_back(name);
  return names;
}

int64_t Store::dram_bytes_used() const {
  return impl_->budget_.used();
}

int64_t Store::dram_bytes_free() const {
  return impl_->rows_->blocks_free() * impl_->rows_->block_bytes();
}

Status Store::preallocate_dram(int64_t bytes) {
  if (bytes < 0) {
    return Status::invalid_argument("preallocate_dram: bytes must be >= 0, got " +
                                    std::to_string(bytes));
  }
  return Sequence::Impl::guarded([&] {
#if PQKV_HAVE_CUDA
    gpu::ScopedDevice guard;
    if (impl_->options_.device.is_cuda()) {
      PQKV_RETURN_IF_ERROR(guard.enter(impl_->options_.device));
    }
#endif
    const Status s = impl_->rows_->preallocate(bytes);
    if (s.ok()) return s;
    return s.with_context("preallocate_dram(" + std::to_string(bytes) +
                          "): nothing was taken; ask for less");
  });
}

int64_t Store::dram_bytes_for_tokens(int64_t tokens) const {
  if (tokens <= 0) return 0;
  const ModelSpec& spec = impl_->options_.spec;
  const int64_t per_block = storage::KvRowStore::kTokensPerBlock;
  const int64_t blocks = tokens / per_block + (tokens % per_block != 0 ? 1 : 0);
  const int64_t per_block_row =
      int64_t{spec.num_layers} * spec.num_kv_heads * storage::KvRowStore::block_bytes(spec);
  // Saturates: no store holds INT64_MAX bytes, and preallocate_dram refuses it.
  if (blocks > std::numeric_limits<int64_t>::max() / per_block_row) {
    return std::numeric_limits<int64_t>::max();
  }
  return blocks * per_block_row;
}

int64_t Store::hbm_bytes_used() const {
  return impl_->hbm_budget_.used();
}

Status Store::attend(int layer, std::span<const SequenceStep> steps, Stream stream) {
  return Sequence::Impl::guarded([&] {
    PQKV_RETURN_IF_ERROR(impl_->check_steps(layer, steps, /*with_out=*/true));
#if PQKV_HAVE_CUDA
    if (impl_->options_.device.is_cuda() && steps.size() > 1) {
      return impl_->attend_batch_cuda(layer, steps, stream);
    }
#endif
    return impl_->for_each_step(steps, [&](size_t i) {
      const SequenceStep& step = steps[i];
      return engine::Inspector::impl(*step.sequence)
          .attend(layer, step.queries, step.out, stream, nullptr);
    });
  });
}

Status Store::select(int layer, std::span<const SequenceStep> steps, const SelectOutput& out,
                     Stream stream) {
  return Sequence::Impl::guarded([&]() -> Status {
    PQKV_RETURN_IF_ERROR(impl_->check_steps(layer, steps, /*with_out=*/false));
    if (!steps.empty() && (out.positions == nullptr || out.lengths == nullptr)) {
      return Status::invalid_argument("select: positions and lengths must be set");
    }
    const Device here = impl_->options_.device;
    if (!out.memory.is_cpu() && out.memory != here) {
      return Status::invalid_argument("select: positions and lengths are on " +
                                      out.memory.to_string() + " but this store runs on " +
                                      here.to_string() + "; pass host memory" +
                                      (here.is_cuda() ? " or memory of " + here.to_string() : ""));
    }
    const int kv_heads = impl_->options_.spec.num_kv_heads;
    std::vector<int32_t> lengths(steps.size() * kv_heads);
    int64_t needed = 0;
    for (size_t i = 0; i < steps.size(); ++i) {
      PQKV_ASSIGN_OR_RETURN(const int64_t n,
                            engine::Inspector::impl(*steps[i].sequence).max_selected(layer));
      needed = std::max(needed, n);
      std::fill_n(lengths.begin() + i * kv_heads, kv_heads, static_cast<int32_t>(n));
    }
    if (needed > out.max_selected) {
      return Status::out_of_range(
          "select: max_selected is " + std::to_string(out.max_selected) + " but layer " +
          std::to_string(layer) + " of this batch needs " + std::to_string(needed) +
          " positions per KV head; pass max_selected >= " + std::to_string(needed));
    }
    const bool on_device = out.memory.is_cuda();
#if PQKV_HAVE_CUDA
    if (here.is_cuda() && steps.size() > 1) {
      PQKV_RETURN_IF_ERROR(impl_->select_batch_cuda(layer, steps, out, stream));
    } else
#endif
    {
      PQKV_RETURN_IF_ERROR(impl_->for_each_step(steps, [&](size_t i) {
        const SequenceStep& step = steps[i];
        return engine::Inspector::impl(*step.sequence)
            .select(layer, step.queries, out.positions + i * kv_heads * out.max_selected,
                    out.max_selected, on_device, stream);
      }));
    }
    if (!on_device) {
      std::copy(lengths.begin(), lengths.end(), out.lengths);
      return ok_status();
    }
#if PQKV_HAVE_CUDA
    gpu::ScopedDevice guard;
    PQKV_RETURN_IF_ERROR(guard.enter(here));
    const auto s =
        static_cast<cudaStream_t>(stream.host_only ? impl_->host_stream().handle : stream.handle);
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        out.lengths, lengths.data(), lengths.size() * sizeof(int32_t), cudaMemcpyHostToDevice, s));
    // The source is this call's host vector: wait for the copy to leave it.
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return ok_status();
#else
    return Status::internal("device memory in a build without CUDA");
#endif
  });
}

}  // namespace pqkv
