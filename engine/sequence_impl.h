// The implementation behind pqkv::Sequence: validates every request, keeps the
// sequence's state machine (prefill, then decode steps in layer order), plans
// each step (attention::plan_decode_step) and hands the work to the
// backend's SequenceState, which owns the rows and indexes.
#pragma once

#include <tbb/task_arena.h>
#include <tbb/task_group.h>

#include <exception>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "attention/decode_plan.h"
#include "engine/sequence_state.h"
#include "pqkv/sequence.h"

namespace pqkv {

class Sequence::Impl {
 public:
  // `arena` belongs to the Store and outlives the sequence; `owner`
  // identifies that Store (batched calls check it).
  Impl(std::string name, const ModelSpec& spec, const SequenceOptions& options,
       std::unique_ptr<engine::SequenceState> executor, tbb::task_arena* arena, const void* owner);
  // Waits for the index builds still running as tasks.
  ~Impl();
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  // Runs `fn` (returning Status) where the sequence's work belongs: CPU work
  // on the Store's worker threads, CUDA work on the calling thread (its
  // launches are then enqueued from the caller's thread, never a worker). An
  // exception thrown inside (allocation failure) becomes a Status.
  template <class Fn>
  Status run(Fn&& fn) {
    return guarded([&] {
      if (executor_->device().is_cuda()) return fn();
      return arena_->execute(fn);
    });
  }
  // `fn` with any exception turned into ResourceExhausted or Internal.
  template <class Fn>
  static Status guarded(Fn&& fn) {
    try {
      return fn();
    } catch (const std::bad_alloc&) {
      return Status::resource_exhausted("out of host memory");
    } catch (const std::exception& e) {
      return Status::internal(std::string("unexpected exception: ") + e.what());
    } catch (...) {
      return Status::internal("unexpected exception");
    }
  }
  tbb::task_arena* task_arena() const { return arena_; }
  const void* owner() const { return owner_; }
  Device device() const { return executor_->device(); }

  const std::string& name() const { return name_; }
  const ModelSpec& spec() const { return spec_; }
  const SequenceOptions& options() const { return options_; }
  int64_t length(int layer) const { return executor_->length(layer); }
  bool prefilled() const { return prefilled_; }
  int64_t prefill_length() const { return prefill_length_; }
  // The backend state, for saving and loading (engine/saved_sequences.h).
  engine::SequenceState& state() { return *executor_; }
  const engine::SequenceState& state() const { return *executor_; }
  // Marks a loaded sequence as past its prompt of `prefill_length` tokens,
  // its indexes restored (no training).
  void restore_prefill(int64_t prefill_length) {
    prefilled_ = true;
    prefill_length_ = prefill_length;
  }
  int64_t host_bytes() const { return executor_->host_bytes(); }
  // The index of `layer`, or null before it is trained: for tools that inspect it.
  const index::LayerIndex* layer_index(int layer) const { return executor_->layer_index(layer); }

  Status append(int layer, const TensorView& keys, const TensorView& values, Stream stream);
  // `layer`'s drift (Sequence::drift_stats).
  Result<DriftStats> drift_stats(int layer) const;
  // Waits for the refits running on their threads (cpu stores); each
  // is swapped in by its layer's next append or step. For tests and tools.
  void wait_refits() { wait_layer_builds(); }
  Status finish_prefill(const BuildProgressCallback& on_progress);
  Status finish_prefill_layer(int layer, Stream stream);
  Status attend(int layer, const TensorView& queries, const TensorView& out, Stream stream,
                AttendTrace* trace);
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out, Stream stream);
  Status check_health() { return executor_->check_health(); }
  Status take_output_report() { return executor_->take_output_report(); }
  // Sequence::check_health: the appends, the index fits, the steps' outputs.
  Status check_all_health() {
    PQKV_RETURN_IF_ERROR(executor_->check_health());
    return executor_->check_fits();
  }
  Status sync_length(Stream stream);
  Status reserve(int64_t max_tokens);
  Result<int64_t> max_selected(int layer) const;

  // Checks of a decode step (attend or select) before any work: prefilled,
  // layer in range, queries (and out, when `with_out`) of the right shape
  // and place.
  Status check_step(int layer, const TensorView& queries, const TensorView* out) const;
  // Builds `layer`'s index when the context has grown past the sink since
  // the prompt left nothing to train on.
  Status ensure_index(int layer, const attention::DecodePlan& plan, Stream stream);
  attention::DecodePlan plan(int layer) const;
  // Writes the positions of the next step of `layer` to positions
  // [kv_heads, max_selected] (-1 padded), on the host or, when
  // `positions_on_device`, the sequence's GPU. Checked by the caller.
  Status select(int layer, const TensorView& queries, int32_t* positions, int64_t max_selected,
                bool positions_on_device, Stream stream);

 private:
  Status check_layer(int layer) const;
  Status check_tensor_device(const char* what, const TensorView& t) const;
  Status check_append_order(int layer, int64_t n) const;
  Status check_queries(const TensorView& queries, const TensorView& out) const;
  // FailedPrecondition while appends captured in a graph may have run
  // without the host knowing (until sync_length). Once the sequence has had
  // appends captured, this waits for `stream` to compare the device's
  // lengths with the host's: replays are invisible to pqkv.
  Status check_host_length(const char* call, Stream stream) const;
  // The first token the index trains on: the end of the sink.
  int64_t train_begin(int64_t length) const;
  // Starts a refit of `layer`'s index (cpu stores: on a thread of its own;
  // cuda stores: on the index's build stream, after the work queued on
  // `stream`) when its drift passed SequenceOptions::refit_threshold
  // (refit_min_tokens after its last fit, no refit running). A refit that
  // cannot start is kept in
  // refit_error_ and tried again at the next append: the append itself
  // succeeded.
  void maybe_refit(int layer, Stream stream);
  // Waits for the build tasks and refit threads (cpu stores).
  void wait_layer_builds();
  // Forgets the layers ended by finish_prefill_layer and their indexes.
  void drop_layer_builds();

  std::string name_;
  ModelSpec spec_;
  SequenceOptions options_;
  std::unique_ptr<engine::SequenceState> executor_;
  tbb::task_arena* arena_;
  const void* owner_;
  bool prefilled_ = false;
  int64_t prefill_length_ = 0;
  // Layers whose prompt finish_prefill_layer ended, and each one's build
  // result (written by its task on a cpu store, read after wait_layer_builds).
  std::vector<char> layer_ended_;
  std::vector<Status> layer_build_;
  tbb::task_group layer_tasks_;  // cpu stores: the builds and refits running on the arena
  // Per layer: why the last refit could not start, empty when it did.
  std::vector<std::string> refit_error_;
  // cpu stores, per layer: the thread of the last refit; joined by
  // wait_layer_builds or the layer's next refit.
  std::vector<std::thread> refit_threads_;
  // Set by an append captured in a CUDA graph: its replays advance the
  // device-side length only, so the host's is stale until sync_length.
  bool replayed_appends_ = false;
  // Set for good by the first captured append: the graph can be replayed at
  // any time after it.
  bool captured_appends_ = false;
};

}  // namespace pqkv
