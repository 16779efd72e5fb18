// The CUDA backend of LayerIndex: PQ, int8, int4 or exact keys
// (SelectionConfig::code), in one stage or two; codebooks or scales, codes,
// fitting, encoding and search all on one GPU, with no host round trip on the
// decode path.
//
// Two stages (SelectionConfig::candidates = C): the index of the first code
// owns a one-stage index of the rerank code (same device, same build
// stream), and forwards every change to it (train, adds, reserve, refits,
// restore), so both codes always hold the same tokens. A search runs the
// first code's one-stage search (the persistent kernel where it covers the
// shape, on the share of the SMs a one-stage search takes; else the
// multi-kernel one) for min(C * k, count) candidates per KV head, then
// launch_rerank (pq_search.cuh) rescores them with the rerank
// code, with the first stage's per-head softmax normaliser, and keeps the
// top-k: the picks of LayerIndexCpu's two stages, all on the caller's
// stream (capturable, device-side counts included). A refit refits both
// codes and swaps them in together. snapshot() saves both stages, as the
// CPU index does. GPU memory: both codes per (token, KV head), plus 4 bytes
// for the first stage's candidate list.
//
// Codes: uint8, one table per KV head laid out [token][code_size] (PQ: a
// token's m codes adjacent; int8/int4/exact: sq_scan.cuh's layout), the
// tables [kv_head][capacity][code_size] in one allocation. A scan
// assigns consecutive tokens to consecutive threads, so a warp reads one
// contiguous run of 32 * m bytes per KV head; this is also the layout
// copy_codes returns. Capacity grows in chunks of kCapacityChunk tokens (at
// least by half), never per token.
//
// Centroids: fp32 [kv_head][m][ksub][dsub], the LayerCodebook layout. The
// search reads them once per step to build the LUTs (at most 1 MB a layer), so
// bf16 would save nothing worth its rounding. Scalar codes: per-channel scale
// and offset, fp32 [kv_head][head_dim] each, fit by train (the keys' minimum
// and maximum per channel, exactly as ScalarCodecCpu); exact keys need no
// training.
//
// Streams: train, set_codebook, growth and adds of more than
// kCallerStreamAddMax tokens run on the index's build stream, after the work
// already queued on the caller's stream; small adds (decode tokens) run on the
// caller's stream. The build stream is borrowed from its owner (a Store lends
// every index of a sequence one of its low-priority build streams, so nothing
// per (sequence, layer) creates a stream) or, for an index made on its own,
// one low-priority stream it creates. Builds of indexes that share a stream
// run one after another in the order they were enqueued. Every change ends by recording
// ready_event(), and search makes the caller's stream wait on it (on the device, never the host).
// Buffers passed to train and add must stay unchanged until ready_event() has
// completed (wait_ready makes a stream wait for it).
//
// CUDA graphs: a search can be captured and replayed while capacity() does
// not change; reserve() the largest context first. A search with device-side
// counts (SearchRequest::device_range) and add_at_device_position replay
// across a whole generation: the range, k and the new key's position are read
// on the device at each replay.
//
// Saving: snapshot() and restore() use the CPU index's format (the host
// codecs write and read the codec state; codes are the same bytes), so a
// saved index reopens on either backend.
//
// A new codebook (train or set_codebook) drops the codes: the index keeps no
// keys, and their owner adds them again.
//
// Drift and refits (layer_index_cuda_refit.cu): every add after the one
// that follows train measures its keys' quantization error on the device,
// beside the encode on the same stream, and publishes the sums to pinned host
// memory that drift_stats() reads without a sync (drift_cuda.cuh).
// refit_on_device fits a new codec and re-encodes every token into a second
// code buffer on the build stream, ending with an event; the adds and
// searches that follow keep the old codes and never wait for it. The first
// add or search (not being captured) after the event has completed swaps the
// refit in on its own stream: the new codes and codec are copied over the
// live ones (addresses stay, so captured graphs stay valid; a D2D copy of
// the codes, microseconds) and the keys added meanwhile, kept as fp32 beside
// the refit, are encoded with the new codec.
//
// Searches beside builds: a search that holds every SM (the persistent
// search, SearchRequest::sm_share 1, a cooperative grid) cannot start until
// the blocks resident on the SMs it needs end, so a decode step would wait
// for a build or refit running on the build stream even though it does not
// depend on it (for a refit's short blocks, microseconds; for blocks that
// stay resident, as long as they do: docs/benchmarks.md). While a build or
// refit this index launched is in flight (its completion event not yet seen
// complete, asked with cudaEventQuery, which does not block; asked again
// only while the answer was "not yet"), direct searches run with at most
// kBuildOverlapSmShare of the SMs; once it is seen complete, with the
// caller's share again. A search being captured into a CUDA graph keeps the
// caller's share (the graph bakes it): a graph outlives the build it was
// captured beside (a graph per generation is captured right after the
// prompt, while the prompt's index builds finish, and replayed for every
// token after), its replays wait for the index's own builds anyway
// (ready_event), and a refit is dropped by the replayed steps' advance().
// A caller that replays beside builds captures with a share below 1.
//
// One index is driven by one thread at a time; its searches share one
// workspace, so they must be ordered (one stream, or streams that wait on
// each other).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cuda/drift_cuda.cuh"
#include "index/cuda/pq_search.cuh"
#include "index/key_codec.h"
#include "index/layer_index.h"

namespace pqkv::index {

class LayerIndexCuda final : public LayerIndex {
 public:
  static constexpr int64_t kCapacityChunk = 16384;
  static constexpr int64_t kCallerStreamAddMax = 64;
  // The most of the SMs a direct search holds while a build or refit of the
  // index is in flight (see "Searches beside builds" above), chosen by
  // measurement (docs/benchmarks.md, "Decode searches beside refits").
  static constexpr float kBuildOverlapSmShare = 0.5f;

  // An empty one-stage PQ index on CUDA device `device`.
  static Result<std::unique_ptr<LayerIndexCuda>> create(const Device& device, const PqShape& shape,
                                                        int kv_heads);
  // An empty index that scores with `selection` (PQ shaped by `pq`), in one
  // stage or two. Unimplemented for a head_dim the kernels lack.
  static Result<std::unique_ptr<LayerIndexCuda>> create(const Device& device, int head_dim,
                                                        int kv_heads, const PqConfig& pq,
                                                        const SelectionConfig& selection);
  // The same, building on `build_stream` (a stream of `device`, not the
  // legacy default stream), which the index borrows: its owner keeps it
  // alive until the index is destroyed. Null makes the index create its own.
  static Result<std::unique_ptr<LayerIndexCuda>> create(const Device& device, int head_dim,
                                                        int kv_heads, const PqConfig& pq,
                                                        const SelectionConfig& selection,
                                                        cudaStream_t build_stream);
  ~LayerIndexCuda() override;

  Device device() const override { return device_; }
  // The PQ stage's shape (the rerank's when only it is PQ).
  const PqShape& shape() const override;
  const SelectionConfig& selection() const override { return selection_; }
  int64_t code_bytes_per_token() const override;
  int num_kv_heads() const override { return kv_heads_; }
  bool trained() const override;
  int64_t num_tokens() const override { return num_tokens_; }

  Status train(const TensorView& keys, const PqConfig& config, Stream stream) override;
  Status set_codebook(const LayerCodebook& codebook, Stream stream) override;
  Result<LayerCodebook> codebook() const override;
  Status add(const TensorView& keys, Stream stream) override;
  // Encodes on `stream` (no growth: reserve first), at *device_position.
  Status add_at_device_position(const TensorView& keys, const int64_t* device_position,
                                Stream stream) override;
  Status advance(int64_t n) override;
  // Two stages: the first stage's codes (its code size a token).
  Status copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const override;
  Status search(const SearchRequest& request, int32_t* out_indices, Stream stream,
                SearchTimings* timings) override;
  // Waits (on the host) for a pending build, then copies the codec state
  // and codes to the host in the CPU index's format
  // (layer_index_cuda_snapshot.cpp).
  Result<IndexSnapshot> snapshot() const override;
  // Uploads a snapshot (of either backend) on the build stream after the
  // work queued on `stream`; no training, no encoding. A host stream: the
  // call returns once the upload is done. Capacity becomes the snapshot's
  // tokens rounded up to kCapacityChunk.
  Status restore(const IndexSnapshot& snapshot, Stream stream) override;

  // Recorded after the last change of codebook or codes (of the first stage:
  // wait_ready also covers the rerank's).
  cudaEvent_t ready_event() const { return ready_.get(); }
  // Makes `stream` wait (on the device) until the index is ready.
  Status wait_ready(cudaStream_t stream) const;
  // The same for a Stream of this device (InvalidArgument for a host stream).
  Status wait_ready(Stream stream) const override;
  Status fit_status() const override;
  // The stream that builds run on (borrowed or owned; see the top of this file).
  cudaStream_t build_stream() const { return build_stream_; }
  Stream background_stream() const override { return Stream::cuda(build_stream_); }
  // Makes room for `tokens` tokens (codes and search workspace) now, so that
  // later adds up to that size allocate nothing.
  Status reserve(int64_t tokens, Stream stream) override;
  int64_t capacity() const { return capacity_; }

  // Whether a build or refit this index launched on its build stream may
  // still run: false once its completion has been seen (cudaEventQuery, no
  // wait). Errors of the build's work are CUDA errors here.
  Result<bool> build_in_flight();

  // Reads the figures the drift kernels last published (no sync).
  DriftStats drift_stats() const override;
  Status refit_on_device(const TensorView& keys, int64_t fit_begin, const PqConfig& config,
                         Stream stream) override;

 private:
  LayerIndexCuda(const Device& device, const PqShape& shape, int kv_heads,
                 const SelectionConfig& selection);
  // A PQ index building on `build_stream` (borrowed), or on its own when null.
  static Result<std::unique_ptr<LayerIndexCuda>> create_pq(const Device& device,
                                                           const PqShape& shape, int kv_heads,
                                                           cudaStream_t build_stream);

  bool is_pq() const { return selection_.code == KeyCode::kPq; }
  // The shape of the LUTs a search builds: the PQ stage's, or none.
  PqShape lut_shape() const;
  // The search workspace for `capacity` tokens (none kept for a rerank stage,
  // whose searches run in its owner's workspace).
  Result<cuda::SearchWorkspace> make_workspace(int64_t capacity, cudaStream_t stream) const;
  // Makes the rerank stage's index and its search buffers (two stages).
  Status init_rerank(const PqConfig& pq);
  // This index's own code's scan and top-k (`select`) on `caller`: the
  // persistent kernel on `share` of the SMs, the multi-kernel path at 0.
  Status search_codes(const SearchRequest& request, const cuda::SelectRequest& select, float share,
                      cudaStream_t caller);
  // The two-stage search (first stage, rerank, top-k) on `caller`.
  Status search_two_stage(const SearchRequest& request, int64_t k, int32_t* out,
                          cudaStream_t caller);
  // This index's own code's figures (drift_stats joins both stages').
  DriftStats stage_drift_stats() const;
  // This index's own refit (refit_on_device starts both stages').
  Status refit_stage(const TensorView& keys, int64_t fit_begin, const PqConfig& config,
                     cudaStream_t caller);
  // Swaps in this index's own refit (install_refit does both stages').
  Status install_stage_refit(cudaStream_t caller);
  // Checks one stage of a snapshot against this index's code and decodes its
  // codec state; Corruption when it does not fit.
  Result<std::unique_ptr<KeyCodec>> check_snapshot_stage(const IndexSnapshot& snapshot,
                                                         int stage) const;
  // Uploads a checked stage (restore's second half).
  Status restore_stage(const KeyCodec& codec, const IndexSnapshot::Stage& in, int64_t num_tokens,
                       cudaStream_t caller);
  // This index's one code as a snapshot stage.
  Result<IndexSnapshot::Stage> snapshot_stage() const;
  // Scalar codes: 8 or 4; exact keys: cuda::kExactBits.
  int sq_bits() const;

  // Takes `build_stream`, or creates one when it is null.
  Status init(cudaStream_t build_stream);
  Result<cudaStream_t> caller_stream(Stream stream) const;
  // Orders the build stream after the work queued so far on `caller`.
  Status build_after(cudaStream_t caller);
  Status check_keys(const TensorView& keys, const char* what) const;
  Status grow(int64_t tokens, cudaStream_t caller);
  // Installs `centroids` (device, on the build stream) and drops the codes.
  Status install(gpu::DeviceArray<float>&& centroids);
  // Records ready_ on `stream`, as an external event node while it captures.
  Status record_ready(cudaStream_t stream);
  // After work enqueued on the build stream: records build_done_ there, so
  // that searches hold less of the device until it is seen complete.
  Status note_build();
  // The share of the SMs a search asked for `requested` runs with on
  // `caller` (see "Searches beside builds").
  Result<float> search_share(float requested, cudaStream_t caller);
  Status fit_scales(const TensorView& keys, cudaStream_t stream);
  // Draws the training rows from config.seed, then runs k-means into
  // `centroids` and k-means's objective over every key into `objective`
  // ([kv_head * m]), all on `stream`.
  Status fit_pq(const TensorView& keys, const PqConfig& config, float* centroids, double* objective,
                cudaStream_t stream);
  // A codec's device parameters: the live ones or a refit's.
  struct CodecView {
    const float* centroids = nullptr;
    const float* scale = nullptr;
    const float* offset = nullptr;
  };
  CodecView live_codec() const { return {centroids_.get(), scale_.get(), offset_.get()}; }
  Status encode(const TensorView& keys, int64_t first_token, cudaStream_t stream,
                const int64_t* first_position = nullptr);
  // Encodes with `codec` into `codes` ([kv_head][capacity][code_size]).
  Status encode_with(const CodecView& codec, uint8_t* codes, int64_t capacity,
                     const TensorView& keys, int64_t first_token, cudaStream_t stream,
                     const int64_t* first_position = nullptr) const;
  Status validate_request(const SearchRequest& request, const int32_t* out) const;

  // Drift and refits (layer_index_cuda_refit.cu).
  struct Refit;
  Status init_drift(cudaStream_t stream);
  // Measures the fit keys and restarts the drift counts on `stream` after a
  // train (fit_context_pending_: the next add encodes the fit's context).
  Status start_drift(const TensorView& fit_keys, cudaStream_t stream);
  // Stops tracking and drops a refit (a codec from elsewhere has no fit keys).
  void stop_drift();
  // The drift kernels' view of `codec`.
  cuda::DriftCodec drift_codec(const CodecView& codec) const;
  // Adds the error of `keys`, encoded at first_token (+ *first_position), to
  // the drift sums.
  Status measure_drift(const TensorView& keys, int64_t first_token, const int64_t* first_position,
                       cudaStream_t stream);
  // After an add of `keys` encoded at first_token (+ *first_position):
  // measures them when tracking, keeps them for a running refit.
  Status after_add(const TensorView& keys, int64_t first_token, const int64_t* first_position,
                   cudaStream_t stream);
  // Swaps in a refit whose work is done, on `caller`; a no-op while it runs
  // or while `caller` captures a graph. Two stages: both refits together,
  // once the rerank's (built after the first stage's) is done.
  Status install_refit(cudaStream_t caller);
  // Drops a running refit; `why` goes to last_refit_error_.
  void drop_refit(const std::string& why);

  Device device_;
  PqShape shape_;
  SelectionConfig selection_;  // a rerank stage's: its one code
  int kv_heads_;
  int code_size_;  // bytes per (token, KV head)
  // Declared before every device array: their stream-ordered frees run on the
  // build stream, which an owned stream must outlive.
  gpu::StreamHandle owned_stream_;  // null when the build stream is borrowed
  cudaStream_t build_stream_ = nullptr;
  gpu::EventHandle ready_;
  gpu::EventHandle caller_done_;
  // Recorded after the last work enqueued on the build stream (builds,
  // growth, refits); build_pending_ until it is seen complete.
  gpu::EventHandle build_done_;
  bool build_pending_ = false;

  bool trained_ = false;
  int64_t num_tokens_ = 0;
  int64_t capacity_ = 0;
  gpu::DeviceArray<float> centroids_;   // [kv_head][m][ksub][dsub]
  gpu::DeviceArray<double> objective_;  // [kv_head * m], from the last train()
  std::vector<double> set_objective_;   // the objective given with set_codebook
  bool objective_from_training_ = false;
  gpu::DeviceArray<float> scale_;    // scalar codes: [kv_head][head_dim]
  gpu::DeviceArray<float> offset_;   // scalar codes: [kv_head][head_dim]
  gpu::DeviceArray<float> tables_;   // scalar and exact codes: [kv * kMaxGroup][head_dim + 1]
  gpu::DeviceArray<uint8_t> codes_;  // [kv_head][capacity][code_size]
  cuda::SearchWorkspace workspace_;

  // Drift (see drift_stats).
  gpu::DeviceArray<double> drift_state_;    // cuda::drift_state_doubles(kv_heads)
  gpu::DeviceArray<double> drift_sums_;     // [2 * kv_heads], the fit pass's sums
  gpu::PinnedBuffer drift_mirror_;          // a cuda::DriftMirror
  gpu::PinnedBuffer fit_report_;            // a cuda::KeyFitReport the fits write
  gpu::DeviceArray<uint32_t> fit_scratch_;  // [kv_heads] largest |key| bits of a PQ fit
  bool tracking_ = false;
  bool fit_context_pending_ = false;
  uint64_t fit_generation_ = 0;  // fits so far; the mirror says which one it shows
  int64_t fit_tokens_ = 0;
  int refits_ = 0;
  double last_refit_ms_ = 0;
  double total_refit_ms_ = 0;
  std::string last_refit_error_;
  // The last whole read of the mirror, answered while a kernel writes it.
  mutable std::vector<double> drift_read_;
  mutable uint64_t drift_read_tokens_ = 0;
  mutable uint64_t drift_read_generation_ = 0;
  // A refit being built; declared late: it is dropped before the streams
  // and buffers above.
  std::unique_ptr<Refit> refit_;

  // Two stages: the rerank code's index (building on build_stream_, so
  // declared after it and dropped first), the first stage's candidates
  // [kv][capacity] and the device-side counts of both stages
  // (launch_pool_ranges).
  bool rerank_stage_ = false;  // this index is another's rerank stage
  gpu::DeviceArray<int32_t> candidates_;
  gpu::DeviceArray<DeviceSearchRange> pool_ranges_;
  std::unique_ptr<LayerIndexCuda> rerank_;
};

}  // namespace pqkv::index
