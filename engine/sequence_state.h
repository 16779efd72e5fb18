// A sequence's state on one backend: its rows (a KvRowStore over the Store's
// block arena), its per-layer indexes, device row tables and the decode
// step's workspace. It appends rows, trains and grows the indexes, and runs
// each decode step through attention/'s stateless step (plan -> fetch ->
// attend) over views of that state. Sequence::Impl validates every request
// and keeps the state machine; a SequenceState assumes valid input. Two
// implementations side by side: cpu/sequence_state_cpu.h and
// cuda/sequence_state_cuda.h.
#pragma once

#include <cstdint>
#include <memory>

#include "attention/decode_plan.h"
#include "index/layer_index.h"
#include "pqkv/options.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"
#include "storage/block_arena.h"
#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"
#include "tiering/block_cache_policy.h"
#include "tiering/fetch_plan.h"

namespace pqkv::engine {

class SequenceState {
 public:
  virtual ~SequenceState() = default;

  // How much of the device this sequence's searches may hold
  // (index::SearchRequest::sm_share, in [0, 1]): the Store's batched attend
  // and select lower it for the batch's duration, since the batch's steps
  // run side by side on other streams, and a device state passes it to its
  // step. Read by the thread issuing the sequence's steps, which is the one
  // that sets it.
  void set_search_sm_share(float share) { search_sm_share_ = share; }
  float search_sm_share() const { return search_sm_share_; }

  // Where the work runs; tensors may live there or on the host.
  virtual Device device() const = 0;
  virtual int64_t length(int layer) const = 0;
  // Host bytes of the row blocks this sequence holds.
  virtual int64_t host_bytes() const = 0;

  // Sizes every buffer for contexts of up to `max_tokens` tokens under
  // `plan` (the plan of the largest step): row blocks of every layer, device
  // tables, index capacity and the step's workspaces. All-or-nothing for the
  // row blocks.
  virtual Status reserve(int64_t max_tokens, const attention::DecodePlan& plan) = 0;

  // Appends keys and values [n, kv_heads, head_dim] to `layer`; once the
  // layer's index is trained, the new keys are encoded too. All or nothing.
  virtual Status append(int layer, const TensorView& keys, const TensorView& values,
                        Stream stream) = 0;

  // Trains `layer`'s index on the stored keys of tokens [train_begin, length)
  // and encodes every stored key. A no-op when that range is empty. On a
  // device the build is enqueued on the Store's build stream after the
  // layer's appends and the work queued so far on `stream`, and the call
  // returns at once; readiness is the index's (LayerIndex::wait_ready). On
  // the CPU it runs in the call; it may run on a worker thread while the
  // caller appends to other layers (it reads only `layer`'s rows).
  virtual Status build_index(int layer, int64_t train_begin, Stream stream) = 0;
  virtual const index::LayerIndex* layer_index(int layer) const = 0;
  // Starts a refit of `layer`'s index on the stored keys of every token, fit
  // on tokens [train_begin, length), and the index swaps the result in at a
  // later append or step. On the CPU (LayerIndex::refit) the keys are copied
  // in the call and the fit and re-encoding run through `run`; on a device
  // (LayerIndex::refit_on_device) the keys are read and the refit enqueued
  // on the index's background stream after the work queued on `stream`, and
  // `run` is not used. FailedPrecondition without an index; Unimplemented
  // where the backend cannot refit (the default).
  virtual Status refit_index(int layer, int64_t train_begin, Stream stream,
                             const index::LayerIndex::BackgroundRunner& run) {
    (void)layer, (void)train_begin, (void)stream, (void)run;
    return Status::unimplemented("this sequence's backend cannot refit its indexes");
  }
  virtual void drop_indexes() = 0;

  // One decode step of `layer` under `plan`. `trace` may be null; filling it
  // may synchronise the stream.
  virtual Status attend(int layer, const attention::DecodePlan& plan, const TensorView& queries,
                        const TensorView& out, Stream stream, AttendTrace* trace) = 0;
  // Writes the positions `attend` would attend to under `plan` to
  // positions [kv_heads, max_selected] (host memory, or device memory of the
  // executor's device when `positions_on_device`): per KV head the sink, the
  // index's picks (or the whole middle), then the window, padded with -1.
  // max_selected >= plan.tokens_per_head() (checked by the caller).
  virtual Status select(int layer, const attention::DecodePlan& plan, const TensorView& queries,
                        int32_t* positions, int64_t max_selected, bool positions_on_device,
                        Stream stream) = 0;

  // Exact attention over every stored token of `layer`.
  virtual Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                              Stream stream) = 0;

  // Waits for the appends issued so far and reports a key or value that a
  // device-side check found NaN, Inf or overflowing the row dtype
  // (InvalidArgument, naming layer, token, head and dim); OK when none.
  // Host input is checked before it reaches a state, so the default has
  // nothing to report. Then a non-finite output a finished step recorded
  // (take_output_report).
  virtual Status check_health() { return ok_status(); }
  // InvalidArgument describing the NaN or Inf output that a finished decode
  // step recorded on the device, clearing the record; OK when none did (and
  // always where steps answer at the call, as on the CPU).
  virtual Status take_output_report() { return ok_status(); }
  // Waits for the layers' index builds and returns the first layer's
  // LayerIndex::fit_status error (keys its codec cannot fit); OK when every
  // fit held. Only the public Sequence::check_health asks it: inside
  // finish_prefill or a step it would wait for builds meant to overlap.
  virtual Status check_fits() { return ok_status(); }

  // The rows in host memory, for saving. On a CUDA store, check_health()
  // first, so that appends from device memory have landed.
  virtual const storage::KvRowStore& rows() const = 0;
  // Installs a saved index for `layer` (IndexSnapshot from LayerIndex::snapshot
  // of the same options) over rows already in place: no training. Keys
  // stored past the snapshot's tokens are encoded. Corruption when it does
  // not fit; Unimplemented where the backend's index cannot restore.
  virtual Status restore_index(int layer, const index::IndexSnapshot& snapshot, Stream stream) = 0;
  // Graph replay (CUDA). True while `stream` is capturing a CUDA graph;
  // appends and attends then record a step that reads its position and
  // counts from the device-side lengths, and leave the host-side lengths as
  // they are. Always false on the CPU.
  virtual bool capturing(Stream stream) const {
    (void)stream;
    return false;
  }
  // Waits for `stream` and takes the device-side lengths that replayed
  // appends advanced as the host-side lengths (rows and index). OutOfRange
  // when a replayed append would have passed the reserved length (it was
  // dropped). A no-op where nothing runs on a device.
  virtual Status sync_length(Stream stream) {
    (void)stream;
    return ok_status();
  }
  // Whether replayed appends advanced the device-side lengths past the
  // host-side ones. Waits for `stream` (for the whole device when it is a
  // host stream): a host sync. Always false on the CPU.
  virtual Result<bool> lengths_behind(Stream stream) {
    (void)stream;
    return false;
  }

 private:
  float search_sm_share_ = 1.0f;
};

// What a Store lends each sequence's state: nothing in it is created per
// sequence.
struct SequenceStateConfig {
  ModelSpec spec;
  SequenceOptions options;
  Device device;
  // The Store's arena of row blocks (heap for cpu, pinned and mapped for cuda).
  std::shared_ptr<storage::BlockArena> arena;
  // The Store's tiers: where each step's rows are fetched from.
  const tiering::FetchPlanner* tiers = nullptr;
  // CUDA stores: the Store's stream for callers that pass Stream::host().
  Stream host_stream;
  // CUDA stores: the Store's low-priority stream this sequence's index builds
  // run on (lent, shared with other sequences; the Store outlives them).
  Stream build_stream;
  // CUDA stores: the Store's budget of device memory for resident rows.
  storage::MemoryBudget* hbm_budget = nullptr;
  // The block cache: its options (num_slots unused: a state takes its slots
  // from `cache_budget` at reserve) and the Store's budget of cache bytes,
  // or null for no cache (StoreOptions::block_cache_bytes 0).
  tiering::BlockCacheOptions block_cache;
  storage::MemoryBudget* cache_budget = nullptr;
  // CUDA stores: the Store's stream for cache admissions.
  Stream copy_stream;
  // Where cold rows go when the DRAM budget is reached (off by default).
  storage::SpillConfig spill;
};

// The cache options of a state of `config` reserved for `max_tokens`
// tokens: num_slots set from what is left of config.cache_budget (0: no
// cache).
tiering::BlockCacheOptions block_cache_for(const SequenceStateConfig& config, int64_t max_tokens);

// The state for config.device.
Result<std::unique_ptr<SequenceState>> make_sequence_state(const SequenceStateConfig& config);

}  // namespace pqkv::engine
