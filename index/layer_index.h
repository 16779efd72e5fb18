// The index of one layer of one sequence: a key codec's parameters per KV head
// and a code per (KV head, token), scanned through the codec at each search
// (index/key_codec.h holds the codecs; SelectionConfig says which, in one or two
// stages). One interface, two backends side by side: cpu/layer_index_cpu.h (the
// reference, every code and both stages; Faiss k-means, TBB) and
// cuda/layer_index_cuda.h (every code, one or two stages, everything on the
// GPU, no host round trip).
//
// The PQ-specific calls (shape, set_codebook, codebook, copy_codes) refer to
// the index's PQ stage; an index without one answers FailedPrecondition.
//
// Token positions are absolute: the index holds codes of tokens
// [0, num_tokens()), and a search looks at a sub-range of them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "index/pq_codebook.h"
#include "pqkv/device.h"
#include "pqkv/options.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"

namespace pqkv::index {

// The searched range and k of a search whose counts are only known on the
// device when it runs: written there by a kernel earlier on the same stream
// (a decode step's plan derived from a device-side length), so that one
// captured CUDA graph serves every step of a generation.
struct DeviceSearchRange {
  int64_t begin = 0;  // first token searched
  int64_t end = 0;    // one past the last token searched; end <= begin searches nothing
  int64_t k = 0;      // tokens kept per KV head, 0 <= k; clamped to end - begin
};

struct SearchRequest {
  // [q_heads, head_dim] fp32 (CUDA: also bf16), on the index's device.
  TensorView queries;
  int64_t begin = 0;  // first token searched
  int64_t end = 0;    // one past the last token searched
  int64_t k = 0;      // tokens kept per KV head; clamped to end - begin
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
  // Device-side counts (device memory of the index's GPU), or null. When set,
  // the kernels read begin, end and k from it when they run, and `end` and
  // `k` above are the largest values it will hold: launches are sized for
  // them, `end` may pass num_tokens() (up to the capacity reserved for the
  // codes; the caller guarantees the codes of the searched tokens exist by
  // then), and out_indices must hold kv_heads * k positions. The positions
  // are written as [kv_heads, device k]. Every backend whose search runs on
  // a device honours it; the CPU index answers InvalidArgument.
  const DeviceSearchRange* device_range = nullptr;
  // How much of the device the search may hold while it runs, in [0, 1]
  // (default 1: all of it). Other streams run work beside a search that
  // holds less (the Store's batched steps, whose gathers need SMs while
  // other sequences search). The CUDA index's int4/int8 and PQ searches in
  // one persistent kernel hold their SMs until they end: below 1 they are
  // launched on about that share of the SMs (where the range's slice per
  // block still fits shared memory; else the multi-kernel search), and at 0
  // the multi-kernel searches run, whose short kernels interleave with other
  // streams' work (two-stage selections always run those). On every SM that
  // kernel (a cooperative grid) cannot start
  // while any other kernel is resident, and the other streams' new blocks
  // wait for it to end. Results are the same either way (up to the order of
  // fp32 additions in the softmax sums). While a build or refit the CUDA
  // index launched is still running, its direct (not captured) searches
  // hold at most LayerIndexCuda::kBuildOverlapSmShare, so that they do not
  // wait for the build's kernels (cuda/layer_index_cuda.h, "Searches beside
  // builds"). Other backends ignore it. Outside [0, 1] or NaN: search()
  // returns InvalidArgument.
  float sm_share = 1.0f;
};

// Per-stage timings of the last search, filled only by the CPU backend (the
// GPU backend would need a host sync to know them).
struct SearchTimings {
  double score_us = 0;
  double topk_us = 0;
};

// What a saved index holds, on the host: per stage (the first, then the
// rerank stage if any) its code, the codec's state (KeyCodec::write_state)
// and the codes of every KV head, [token][code_size] bytes.
struct IndexSnapshot {
  struct Stage {
    KeyCode code = KeyCode::kPq;
    int code_size = 0;
    std::string codec_state;
    std::vector<std::vector<uint8_t>> codes;  // [kv_head] -> num_tokens * code_size bytes
  };
  std::vector<Stage> stages;
  int64_t num_tokens = 0;
};

class LayerIndex {
 public:
  virtual ~LayerIndex() = default;

  virtual Device device() const = 0;
  // The PQ shape the index was made with (its PQ stage, when it has one).
  virtual const PqShape& shape() const = 0;
  // The codes it scores with.
  virtual const SelectionConfig& selection() const = 0;
  // Bytes of codes per token and KV head, all stages together.
  virtual int64_t code_bytes_per_token() const = 0;
  virtual int num_kv_heads() const = 0;
  virtual bool trained() const = 0;
  // Tokens with codes: positions [0, num_tokens()).
  virtual int64_t num_tokens() const = 0;

  // Trains one codebook per KV head with k-means on keys [n, kv_heads, head_dim]
  // (the rows to learn from; they need not start at token 0) with the config's
  // iterations, sampling and seed. Replaces any earlier codebook and drops the
  // codes made with it: the index keeps no copy of the keys, so their owner
  // adds them again from token 0.
  virtual Status train(const TensorView& keys, const PqConfig& config, Stream stream) = 0;

  // Installs a codebook trained elsewhere (same shape and KV heads); drops the
  // codes, as train does.
  virtual Status set_codebook(const LayerCodebook& codebook, Stream stream) = 0;
  // A host copy of the current codebook.
  virtual Result<LayerCodebook> codebook() const = 0;

  // Encodes keys [n, kv_heads, head_dim] as tokens num_tokens() .. num_tokens()+n-1.
  // Needs a trained codebook.
  virtual Status add(const TensorView& keys, Stream stream) = 0;

  // Encodes keys [n, kv_heads, head_dim] as tokens *device_position ..
  // *device_position + n - 1, the position read on the device when the
  // encode runs (a device-side sequence length, for steps captured once and
  // replayed), without changing num_tokens(): the owner of the keys calls
  // advance() once it knows how many such adds have run. Codes past the
  // reserved capacity are not written. Allocates nothing; FailedPrecondition
  // when untrained or when n passes the capacity; Unimplemented where the
  // backend has no device.
  virtual Status add_at_device_position(const TensorView& keys, const int64_t* device_position,
                                        Stream stream) {
    (void)keys, (void)device_position, (void)stream;
    return Status::unimplemented("this index has no device-side positions");
  }
  // Counts n more tokens as encoded (see add_at_device_position).
  // OutOfRange past the reserved capacity.
  virtual Status advance(int64_t n) {
    (void)n;
    return Status::unimplemented("this index has no device-side positions");
  }

  // Copies codes of tokens [begin, end) of one KV head to host memory:
  // out[(t - begin) * m + j] for PQ. The CUDA index copies any code the same
  // way (the first stage's code size a token: code_bytes_per_token() for one
  // stage); the CPU index answers FailedPrecondition for codes other than PQ.
  virtual Status copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const = 0;

  // Scores tokens [begin, end) for every query head, aggregates each GQA group,
  // and writes the positions of the k best tokens of each KV head to
  // out_indices [kv_heads, k] (on the index's device), in no particular order.
  // `timings` may be null.
  virtual Status search(const SearchRequest& request, int32_t* out_indices, Stream stream,
                        SearchTimings* timings) = 0;

  // Readiness. Train and large adds may still run after the call returns (the
  // CUDA index runs them on its own stream); wait_ready makes `stream` wait
  // (on the device, never the host) until every change so far is done, and
  // background_stream is where those builds run, for work that must be ordered
  // before them. The CPU index finishes everything in the call: wait_ready
  // returns OK at once and background_stream is Stream::host().
  virtual Status wait_ready(Stream stream) const = 0;
  virtual Stream background_stream() const = 0;

  // The verdict on the last fit's keys (train or a refit): InvalidArgument
  // naming the KV head (and channel) when they were outside what the codec
  // can fit in fp32 (PQ: a largest |key| past 2^60, or below 2^-50 and not
  // zero; int4/int8: a channel whose span passes fp32's range); searches
  // then select arbitrary tokens. The CPU index refuses such keys in train
  // itself, so the default is OK; the CUDA index fits on the device and
  // answers here, waiting on the host for its last build.
  virtual Status fit_status() const { return ok_status(); }

  // Makes room for `tokens` tokens of codes (and whatever a search needs for
  // them) now, after the work queued on `stream`, so that adds up to that
  // many tokens allocate nothing and captured searches stay valid. The
  // default (an index that grows as it adds, as the CPU index does) has
  // nothing to reserve and returns OK.
  virtual Status reserve(int64_t tokens, Stream stream) {
    (void)tokens, (void)stream;
    return ok_status();
  }

  // Drift (SequenceOptions::refit_threshold): the quantization error of the
  // keys added after the codec's fit against the error of the fit's own keys,
  // per KV head (pqkv::DriftStats). The first add after train encodes the
  // context the codec was fit on and is not counted; every later add is.
  // An index on a device measures on the device as it encodes and answers
  // from what its kernels last published to host memory, without a sync: the
  // figures may lag adds still queued on a stream. The default (an index
  // that tracks nothing) reports tracking false.
  virtual DriftStats drift_stats() const { return DriftStats{}; }

  // Runs `job` on another thread (the engine: one of the refit's own); empty: in the
  // caller's thread, before refit returns.
  using BackgroundRunner = std::function<void(std::function<void()> job)>;

  // Refits the codec of every stage on keys [fit_begin, n) of `keys` and
  // re-encodes all n tokens, off to the side. `keys` are the fp32 keys of
  // tokens [0, n), n == num_tokens(), in host memory as [n][kv_heads][head_dim]
  // floats; the index takes them (moved in: the caller's only cost is having
  // made them). The fit and encoding run through `run`, and the new state is
  // swapped in by the first add or search on the owner's thread after it is
  // built (keys added meanwhile are encoded with the new codec then). Until
  // then searches use the old codes, so a search sees either the old or the
  // new state, never a mix. Thread-safety: the owner keeps calling add and
  // search from its one thread while the job runs; the job touches only what
  // it owns. A failed refit (NaN or Inf among the keys, out of memory) leaves
  // the old state and is reported in DriftStats::last_refit_error. train,
  // set_codebook and restore drop a refit still running. FailedPrecondition
  // when untrained, when keys are not every token's or a refit is running;
  // InvalidArgument for fit_begin outside [0, n); Unimplemented where the
  // backend refits from device keys only (refit_on_device: the default).
  virtual Status refit(std::vector<float> keys, int64_t fit_begin, const PqConfig& config,
                       const BackgroundRunner& run) {
    (void)keys, (void)fit_begin, (void)config, (void)run;
    return Status::unimplemented("the index on " + device().to_string() +
                                 " refits from keys in its device memory: call refit_on_device");
  }

  // The refit of an index whose codes live on a device: the same as refit,
  // from keys [n, kv_heads, head_dim] (fp32, bf16 or fp16, n == num_tokens())
  // in the index's device memory, written in stream order before the work
  // queued so far on `stream` or on background_stream(). The fit and the
  // re-encoding into a second code buffer are enqueued on background_stream()
  // after the work queued on `stream`, and the call returns at once: `keys`
  // must stay unchanged until that work is done (free them in stream order on
  // background_stream()). Searches and adds meanwhile use the old codes, with
  // no wait on the refit; the first add or search on a stream that is not
  // capturing a graph, once the refit's work is done, swaps it in on its
  // stream (the keys added meanwhile are encoded with the new codec then),
  // writing into the index's own buffers so that captured graphs stay valid.
  // Keys are not checked for NaN or Inf (a store checks them as they are
  // appended). train, set_codebook and restore drop a refit still running,
  // and so do growing past the capacity reserved when it started and tokens
  // counted by advance() while it runs (their keys were not seen), with
  // DriftStats::last_refit_error saying why. FailedPrecondition when
  // untrained, for exact keys (nothing to refit), when a refit is running or
  // keys are not every token's; InvalidArgument for fit_begin outside
  // [0, n), keys not on the device or a host `stream`; Unimplemented (the
  // default) where the index has no device (the CPU index takes host keys
  // through refit). Thread-safety as add: the index's one driving thread.
  virtual Status refit_on_device(const TensorView& keys, int64_t fit_begin, const PqConfig& config,
                                 Stream stream) {
    (void)keys, (void)fit_begin, (void)config, (void)stream;
    return Status::unimplemented("the index on " + device().to_string() +
                                 " refits from host keys: call refit");
  }

  // A host copy of the trained index (codec states and codes), for saving.
  // FailedPrecondition before training; Unimplemented where the backend
  // cannot save yet (the default).
  virtual Result<IndexSnapshot> snapshot() const {
    return Status::unimplemented("saving an index on " + device().to_string() +
                                 " is not implemented; save from a cpu store");
  }
  // Replaces the index's state with `snapshot` (made by snapshot() of an
  // index of the same selection, shape and KV heads): no training, no
  // encoding. Corruption when it does not fit; the index is then as before.
  virtual Status restore(const IndexSnapshot& snapshot, Stream stream) {
    (void)snapshot;
    (void)stream;
    return Status::unimplemented("restoring an index on " + device().to_string() +
                                 " is not implemented; open the store on cpu");
  }
};

// The checks every backend makes of a search request before its own (device,
// dtype): a trained index, queries [q_heads, head_dim] with q_heads a positive
// multiple of the KV heads, a range within [0, num_tokens), k >= 0, and an
// output buffer when anything is kept.
Status check_search_request(const LayerIndex& index, const SearchRequest& request,
                            const int32_t* out_indices);

// The checks of copy_codes's arguments, shared by the backends.
Status check_copy_codes(const LayerIndex& index, int kv_head, int64_t begin, int64_t end,
                        const uint8_t* out);

// Makes an empty one-stage PQ index on `device` for keys of `kv_heads` heads.
Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, const PqShape& shape,
                                                     int kv_heads);

// Makes an empty index on `device` that scores with `selection`, its PQ codes
// (if any) shaped by `pq`, for keys of `kv_heads` heads of `head_dim`.
// Any code (PQ, int8, int4, exact), in one stage or two, on either backend.
Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, int head_dim,
                                                     int kv_heads, const PqConfig& pq,
                                                     const SelectionConfig& selection);

}  // namespace pqkv::index
