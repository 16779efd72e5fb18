// A sequence's state on the GPU: rows in pinned, mapped blocks of the Store's
// arena (the GPU holds no full K/V), a device row table and one CUDA PQ index
// per layer, and the decode step's device workspace. Each step runs
// attention/'s CUDA step (search -> attended positions -> row gather over
// PCIe -> split-K attention), all enqueued on the caller's stream with no
// host synchronisation.
//
// Every entry point makes the store's GPU current and restores the caller's
// device on return (gpu::ScopedDevice), and enqueues from the calling
// thread. Host callers' work runs on the Store's stream.
//
// Graph replay: after reserve(), appends and attends enqueued on a stream
// that is capturing a CUDA graph record a step that reads everything that
// changes per token from device memory: each layer's length (lengths_), which
// a captured append writes at and advances, and the step's plan, derived from
// it on the GPU (attention/cuda/device_plan.cuh). Launches are sized for the
// reserved length and read their counts on the device. One graph of a whole
// decode step of every layer thus replays for the rest of the generation;
// sync_length() then brings the host-side lengths up to the device's.
//
// Spilling to disk (StoreOptions::spill_to_disk): when the DRAM budget is
// reached, cold blocks move to spill files as on the CPU (storage/kv_row_store.h);
// before any block leaves DRAM the state waits for the appends, steps and
// index builds that use its rows, and each layer's device table is updated
// (the spilled blocks' entries become null) before the next kernel reads it.
// A direct step of a layer with spilled rows copies its selected positions
// back and synchronises its stream, reads the spilled ones through io_uring
// and gathers them from pinned staging (attention/cuda/decode_step_cuda.h);
// steps of layers with nothing spilled run as without spilling (no host
// sync, capturable). Such a step refuses a capturing stream
// (FailedPrecondition), and so does a captured append when the DRAM budget
// could not hold the reservation. Replayed graphs must be finished
// (sync_length) before direct appends that may spill, and a graph captured
// before a layer spilled must not be replayed after (its gather reads the
// table, whose spilled entries are then null).
//
// Tensors may be device memory of the store's GPU or host memory; host
// tensors are staged through device buffers and the call then finishes
// before it returns (Stream::host()). Every append is checked on the device
// for NaN, Inf and overflow of the row dtype, without a host sync; the result
// is read by check_health() (storage/cuda/storable_check_cuda.h).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <optional>
#include <vector>

#include "attention/cuda/decode_step_cuda.h"
#include "core/cuda_handles.h"
#include "engine/sequence_state.h"
#include "index/layer_index.h"
#include "storage/cuda/device_row_table.h"
#include "storage/kv_row_store.h"
#include "tiering/cuda/block_cache_cuda.h"
#include "tiering/cuda/hot_rows_cuda.h"
#include "tiering/cuda/resident_rows_cuda.h"

namespace pqkv::engine {

class SequenceStateCuda final : public SequenceState {
 public:
  // Fails (with the reason) where the GPU path cannot serve the geometry.
  static Result<std::unique_ptr<SequenceStateCuda>> create(const SequenceStateConfig& config);

  Device device() const override { return config_.device; }
  int64_t length(int layer) const override { return kv_.length(layer); }
  int64_t host_bytes() const override { return kv_.bytes_held(); }
  Status reserve(int64_t max_tokens, const attention::DecodePlan& plan) override;
  Status append(int layer, const TensorView& keys, const TensorView& values,
                Stream stream) override;
  Status build_index(int layer, int64_t train_begin, Stream stream) override;
  const index::LayerIndex* layer_index(int layer) const override {
    return layers_[layer].index.get();
  }
  // Reads the stored keys on the index's build stream and enqueues the
  // refit there (LayerIndex::refit_on_device); `run` is not used.
  Status refit_index(int layer, int64_t train_begin, Stream stream,
                     const index::LayerIndex::BackgroundRunner& run) override;
  void drop_indexes() override;
  Status attend(int layer, const attention::DecodePlan& plan, const TensorView& queries,
                const TensorView& out, Stream stream, AttendTrace* trace) override;
  Status select(int layer, const attention::DecodePlan& plan, const TensorView& queries,
                int32_t* positions, int64_t max_selected, bool positions_on_device,
                Stream stream) override;
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                      Stream stream) override;
  const storage::KvRowStore& rows() const override { return kv_; }
  Status restore_index(int layer, const index::IndexSnapshot& snapshot, Stream stream) override;
  Status check_health() override;
  Status take_output_report() override;
  Status check_fits() override;
  bool capturing(Stream stream) const override;
  Status sync_length(Stream stream) override;
  Result<bool> lengths_behind(Stream stream) override;

 private:
  struct Layer {
    std::unique_ptr<index::LayerIndex> index;      // null until trained
    std::optional<storage::DeviceRowTable> table;  // device copy of the row table
    gpu::EventHandle appended;                     // recorded after the last row write
    gpu::EventHandle build_after;                  // the caller's work a build waits for
    gpu::EventHandle rows_read;                    // recorded after the last direct step's gather
    gpu::EventHandle build_read;                   // recorded after the last build read the rows
    // The sink and window kept in device memory; made by reserve().
    std::optional<tiering::ResidentRowsCuda> resident;
  };

  explicit SequenceStateCuda(const SequenceStateConfig& config);
  Status init();
  // The spill hook (storage::SpillConfig::before_spill): waits for every
  // append, direct step and index build that reads or writes the rows.
  Status wait_row_users() const;
  // The error of a capture of a step of `layer`, which has spilled rows.
  Status refuse_spilled_capture(int layer) const;
  // The caller's stream, or the Store's for host callers.
  cudaStream_t stream_of(Stream stream) const;
  // An empty index of the sequence's selection, building on the Store's
  // build stream.
  Result<std::unique_ptr<index::LayerIndex>> make_index() const;
  // Makes `layer`'s device row table cover every stored token, with room
  // for at least `room` tokens.
  Status sync_table(int layer, cudaStream_t stream, int64_t room = 0);
  // reserve() past the row blocks: sizes the device tables, indexes,
  // resident rows, block cache, workspace and staging. Resident rows and
  // cache slots are taken from the budgets before either is installed, so a
  // budget that does not fit leaves the sequence as it was.
  Status reserve_device(int64_t max_tokens, const attention::DecodePlan& plan, cudaStream_t stream);
  // Each layer's resident rows sized for `plan`'s sink and window, for the
  // layers whose rows do not cover it yet (empty where they do), taken from
  // the HBM budget (SequenceOptions::resident_sink_window).
  Result<std::vector<std::optional<tiering::ResidentRowsCuda>>> make_resident(
      const attention::DecodePlan& plan) const;
  // The block cache for contexts of up to `max_tokens` under `plan`; null
  // when the sequence has one already or the Store has no cache.
  Result<std::unique_ptr<tiering::BlockCacheCuda>> make_cache(int64_t max_tokens,
                                                              const attention::DecodePlan& plan,
                                                              cudaStream_t stream) const;
  // The hot rows (a block cache of one-token blocks) for contexts of up to
  // `max_tokens`; null when the sequence has them already, the Store has no
  // cache, or its blocks are longer.
  Result<std::unique_ptr<tiering::HotRowsCuda>> make_hot_rows(int64_t max_tokens,
                                                              cudaStream_t stream) const;
  // Enqueues the hot rows' policy of the step of `in` on hot_stream_, forked
  // from `stream` after the step's gather (workspace_.after_gather), so it
  // runs beside the step's attention. `replayed`: the step's counts are read
  // on the device (in.device_plan). A direct step joins it back into
  // `stream` at once; a captured step (of the capture `capture_id`) first
  // joins the policy the previous captured step left running, then leaves
  // its own running beside the next captured step (end_hot_rows).
  Status admit_hot_rows(const attention::DecodeStepInputs& in, bool replayed, cudaStream_t stream,
                        unsigned long long capture_id = 0);
  // `stream` waits for the hot rows' policy left running by a captured step
  // of the capture `capture_id` (0: `stream` is not capturing); a policy of
  // another capture was joined by it (or the capture failed) and is forgotten.
  Status join_hot_rows(cudaStream_t stream, unsigned long long capture_id);
  // After a captured step forked its policy: leaves it running unless
  // `layer` is the last (joined into `stream` there), and swaps the
  // workspace's positions and rows with the spares so the next step does not
  // overwrite what the running policy reads.
  Status end_hot_rows(int layer, cudaStream_t stream, unsigned long long capture_id);
  // The spares match the workspace's sizes (call after it grows).
  Status grow_hot_spares();
  // Enqueues the device-side check of appended keys and values.
  Status check_storable(int layer, const void* keys, const void* values, DType in_dtype,
                        int64_t first, int64_t n, cudaStream_t stream);
  // The append and the step recorded while `stream` captures a graph: they
  // read the layer's position and the step's counts on the device.
  Status append_captured(int layer, const TensorView& keys, const TensorView& values,
                         Stream stream);
  Status attend_captured(int layer, const attention::DecodePlan& plan, const TensorView& queries,
                         const TensorView& out, cudaStream_t stream, AttendTrace* trace);
  // Moves the block cache's hits of a traced direct step from DRAM to the
  // cache in trace->fetch.
  Status add_trace_hits(int layer, const attention::DecodePlan& plan,
                        const attention::DecodeStepInputs& in, AttendTrace* trace) const;
  // The step's view of `layer` under `plan`.
  attention::DecodeStepInputs step_inputs(int layer, const attention::DecodePlan& plan) const;
  // Device memory holding `t`: `t` itself when it is on the GPU, else a copy in `staging`.
  Result<const void*> on_device(const TensorView& t, gpu::DeviceBuffer& staging,
                                cudaStream_t stream);

  SequenceStateConfig config_;
  storage::KvRowStore kv_;
  std::vector<Layer> layers_;
  attention::cuda::DecodeStepCudaWorkspace workspace_;
  gpu::PinnedBuffer storable_report_;  // a storage::StorableReport the append check writes
  gpu::PinnedBuffer output_report_;    // an attention::OutputReport the steps' attention writes

  // Device-side state of replayed steps: each layer's length (kept equal to
  // the host's by direct appends; advanced alone by replayed ones), set when
  // a replayed append would pass the reservation, and the plan of the step
  // being run (the steps of a sequence are ordered on one stream; two plans
  // alternate only because a step's hot rows' policy may outlast it).
  gpu::DeviceArray<int64_t> lengths_;    // [num_layers]
  gpu::DeviceArray<int32_t> overflow_;   // [1]
  gpu::DeviceBuffer step_plan_;          // two attention::DeviceStepPlan (see hot_stream_)
  int64_t reserved_tokens_ = 0;          // 0 until reserve()
  attention::DecodePlan reserved_plan_;  // the plan at reserved_tokens_

  // The block cache in HBM, from reserve() on (none when the Store has no
  // cache budget left). Direct steps drive its policy one step behind;
  // replayed steps read its tables as the last direct step left them (only
  // complete blocks are listed, and their rows never change, so a frozen
  // table serves correct rows).
  std::unique_ptr<tiering::BlockCacheCuda> cache_;
  // The cache of single rows (StoreOptions::block_cache_tokens 1) in HBM,
  // from reserve() on, instead of cache_: its policy runs on the device
  // after each step's gather, direct or replayed.
  std::unique_ptr<tiering::HotRowsCuda> hot_rows_;
  // The hot rows' policy runs on its own stream (the device's greatest
  // priority, so its few blocks start at once beside the step's kernels),
  // forked at hot_gathered_ and joined at hot_admitted_. A captured step's
  // policy overlaps the next captured step (its search, gather and
  // attention), which therefore writes its positions and rows into the other
  // of two buffers (workspace_'s and these spares, swapped at each captured
  // step) and reads its device plan from the other of two (step_plan_slot_);
  // the policy of layer l is joined before the next step of layer l gathers
  // (its table) and at the last layer (a capture must join every stream it
  // forked, so a captured decode step with hot rows ends with the last
  // layer's attend).
  gpu::StreamHandle hot_stream_;
  gpu::EventHandle hot_gathered_;
  gpu::EventHandle hot_admitted_;
  unsigned long long hot_pending_capture_ = 0;  // the capture of the policy left running, or 0
  int hot_pending_layer_ = -1;
  gpu::DeviceBuffer hot_positions_, hot_rows_spare_;
  int step_plan_slot_ = 0;  // which of step_plan_'s two plans the next captured step writes

  // Staging for host tensors; only grows.
  gpu::DeviceBuffer keys_in_, values_in_, queries_in_, out_;
};

}  // namespace pqkv::engine
