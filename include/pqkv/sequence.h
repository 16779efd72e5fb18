// One context's keys and values for every (layer, KV head, token), with a PQ
// index over the keys of each (layer, KV head).
//
// The life of a sequence:
//   for each layer: append(layer, prompt keys, prompt values)   (any chunking)
//                   [finish_prefill_layer(layer, stream)]        (starts its index build)
//   finish_prefill()                                             (trains the other indexes)
//   each decode step, for layer 0, 1, ...:
//     append(layer, one token's key and value); attend(layer, queries, out)
//
// One thread drives a sequence at a time; different sequences of one Store may
// be driven from different threads. A Sequence is reached through the
// std::shared_ptr handles Store::create_sequence and Store::get_sequence
// return: Store::drop removes the name, and the sequence (its memory) goes
// when the last handle does. The Store must outlive every handle.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "pqkv/device.h"
#include "pqkv/export.h"
#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"

namespace pqkv {

namespace engine {
class Inspector;
}  // namespace engine

// What one attend() call did, for tools and measurements. Filling it costs a
// host copy of the plan, so the decode path leaves it null.
// Where one step's attended rows came from, counted over every KV head of
// the layer (the fetch plan). On a CUDA store that keeps the sink and window
// in device memory those are "resident" (read in place from HBM); the rest
// are gathered from DRAM (over PCIe on a CUDA store), except the hits of the
// block cache (StoreOptions::block_cache_bytes), read from its slots. On a
// store that spills (StoreOptions::spill_to_disk), rows whose blocks left DRAM
// are read from disk: "ssd", counted apart from "dram".
struct PQKV_API FetchTrace {
  int64_t resident_rows = 0;
  int64_t resident_bytes = 0;
  int64_t dram_rows = 0;
  int64_t dram_bytes = 0;
  int64_t cache_hits = 0;  // rows read from block cache slots
  int64_t cache_bytes = 0;
  int64_t ssd_rows = 0;
  int64_t ssd_bytes = 0;  // bytes read from disk: ssd_pages whole 4 KiB pages
  int64_t ssd_pages = 0;  // with a cpu block cache, also the pages of spilled blocks it admitted
  int64_t ssd_hits = 0;   // rows served by a page read for another row of the step
  double ssd_us = 0;      // wall time of the page reads and their checksums
  // Host wall time, in microseconds, that the block cache spent for this
  // layer since its last traced step: its policy, on a thread of its own
  // (off the step's path), and its work on the thread that enqueues the step
  // (table updates, admissions' copies, the selection's copy back). 0 on a
  // CPU store or without a cache.
  double cache_policy_us = 0;
  double cache_enqueue_us = 0;
};

struct PQKV_API AttendTrace {
  int64_t context_length = 0;
  BudgetPolicy::Counts budget;  // the resolved counts for this step
  bool exact = false;           // true when every token was attended
  // Token positions chosen by the index, per KV head: [kv_head][i], unordered.
  std::vector<std::vector<int64_t>> selected;
  // Every attended position per KV head: sink, selected (or the whole middle
  // when the budget covers it), then the window.
  std::vector<std::vector<int64_t>> attended;
  // Wall time of each stage in microseconds.
  double score_us = 0;  // LUT build, code scan and GQA aggregation
  double topk_us = 0;
  double gather_us = 0;  // fetching the attended rows
  double attention_us = 0;
  FetchTrace fetch;  // rows and bytes per tier
};

// Where finish_prefill's index build stands, reported after each layer.
struct PQKV_API BuildProgress {
  int layers_done = 0;   // layers whose index is built (cpu) or enqueued (cuda)
  int num_layers = 0;    // layers to build
  int64_t tokens = 0;    // prompt tokens per layer
  double elapsed_s = 0;  // wall seconds since finish_prefill started
};

// Called by finish_prefill once before the first layer (layers_done 0) and
// after each layer, synchronously, from the thread that runs the build (one
// call at a time). It must not throw: an exception from it stops the build,
// drops the indexes built so far and is returned as Internal.
using BuildProgressCallback = std::function<void(const BuildProgress&)>;

class PQKV_API Sequence {
 public:
  class PQKV_HIDDEN Impl;  // engine-internal
  explicit Sequence(std::unique_ptr<Impl> impl);
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  const std::string& name() const;
  const ModelSpec& spec() const;
  const SequenceOptions& options() const;
  // Tokens stored for `layer`; 0 for a layer out of range.
  int64_t length(int layer) const;
  bool prefilled() const;

  // Appends keys (after RoPE) and values, each [tokens, kv_heads, head_dim] in
  // bf16, fp16 or fp32, to `layer`. Before finish_prefill any chunking is
  // allowed; after it, a layer may not run ahead of the layer below it, and
  // layer 0 starts a new step only when every layer has finished the last.
  // Host keys or values with NaN or Inf, or that overflow the store's dtype
  // (fp32 above 65504 into fp16), are refused with InvalidArgument naming the
  // value and its position, and nothing is appended. Device keys and values
  // are checked on the device without a host sync; a bad one is reported by
  // check_health(), finish_prefill() and attend() with a trace.
  Status append(int layer, const TensorView& keys, const TensorView& values, Stream stream);

  // Ends the prompt: every layer must hold the same number of tokens. Trains
  // one index per layer (the selection code's codebook or quantizer for each
  // KV head) and encodes the keys. On a cpu store this is the long call of a
  // prefill (seconds per layer for PQ at thousands of tokens); on a cuda store
  // the builds are enqueued and the call returns at once. FailedPrecondition
  // when called twice, on an empty sequence or with layers of different
  // lengths; InvalidArgument for a NaN/Inf device key found by check_health,
  // and on a cpu store for keys the selection code cannot fit in fp32 (PQ:
  // a KV head's largest |key| past 2^60, or below 2^-50 and not zero;
  // int4/int8: a channel spanning past fp32's range; a cuda store reports
  // these through check_health()); the first layer's error otherwise (no
  // index is kept then).
  Status finish_prefill();
  // The same, calling `on_progress` (may be empty) before the first layer and
  // after each one, e.g. to show progress on a terminal.
  Status finish_prefill(const BuildProgressCallback& on_progress);

  // Ends the prompt of `layer` and starts its index build at once, so that
  // it overlaps the prefill of the layers above (call it right after the
  // layer's last prompt append). On a CUDA store the build is enqueued on a
  // low-priority build stream the Store lends this sequence, after the
  // layer's appends and the work queued so far on `stream` (Stream::host():
  // the appends only); the call does not wait for the device. On a cpu store
  // the build runs as a task on the Store's worker threads while the caller
  // goes on. finish_prefill() then builds only the layers not ended this
  // way, waits for the cpu tasks and reports their errors; the first
  // decode step of a layer waits on the device for its build, never the
  // host. Indexes come out as finish_prefill alone would make them.
  // Thread-safety: as every call of a sequence (one thread at a time); the
  // build task reads only `layer`'s rows, so appends to other layers may go
  // on meanwhile. After it, appends to `layer` before finish_prefill answer
  // FailedPrecondition. FailedPrecondition also after finish_prefill, when
  // the layer was ended already or holds no tokens; InvalidArgument for a
  // layer out of range. A build error is reported by finish_prefill.
  Status finish_prefill_layer(int layer, Stream stream);

  // Decode attention for `layer`: queries [q_heads, head_dim] -> out
  // [q_heads, head_dim], over sink + window + top-K + the newest token.
  // `trace` may be null. On a store that spills (StoreOptions::spill_to_disk)
  // the selected rows that are only on disk are read back first: on a CUDA
  // store a step of a layer with spilled rows synchronises `stream` to copy
  // its positions to the host and cannot be captured in a CUDA graph
  // (FailedPrecondition); Corruption naming the file and page when a spill
  // page fails its checksum, IoError when a read fails.
  // Finite queries and keys can still score past fp32's range (|q . k| /
  // sqrt(head_dim) above 3.4e38), and an output can pass its dtype's range
  // (fp16 output of larger bf16 values; on a CUDA store, values near fp32's
  // limit summed over thousands of tokens): InvalidArgument naming the
  // query head (and the token, on a cpu store), with nothing stored
  // changed. A cpu store and a
  // CUDA step with a host output (or Stream::host()) answer at the call; a
  // CUDA step on a stream into device memory is answered by check_health()
  // after the stream has finished it, as the kernels cannot return a Status.
  Status attend(int layer, const TensorView& queries, const TensorView& out, Stream stream,
                AttendTrace* trace = nullptr);

  // Exact attention over every stored token of `layer`: the reference. The
  // same errors for scores and outputs past their range as attend().
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out, Stream stream);

  // Sizes this sequence for contexts of up to `max_tokens` tokens in every
  // layer: takes the row blocks from the Store's arena (charged to its DRAM
  // budget) and, on a CUDA store, the device row tables, index capacity and
  // the decode step's workspaces, sized for the budget at max_tokens. Later
  // appends and attends up to that length take no more row blocks and
  // allocate no device memory. May synchronise the device (it is a setup
  // call). ResourceExhausted naming the budget when it does not fit (and for
  // more than 2^40 tokens): nothing is then taken; InvalidArgument for a
  // negative count.
  Status reserve(int64_t max_tokens);

  // Graph replay (CUDA stores). After reserve(max_tokens), the decode step of every layer --
  // append(layer, key, value) then attend(layer, queries, out), all tensors device memory of the
  // store's GPU -- enqueued on a stream that is capturing a CUDA graph records a step that reads
  // the layer's length, the position of the new token and every count of the budget (sink, searched
  // range, top-K, window) from device memory at each replay. Capture one step, then write each new
  // token's keys, values and queries into the captured buffers and replay the graph for the rest of
  // the generation: no call, allocation or synchronisation per token. The capture itself runs
  // nothing and changes no length.
  //
  // Replays advance the lengths on the device only. sync_length waits for `stream` (a host sync)
  // and takes the device's lengths as the sequence's; call it at a host-visible point after the
  // replays and before any direct call: until then append, attend, attend_exact, select,
  // max_selected, reserve and finish_prefill answer FailedPrecondition, and length() is the length
  // at capture. pqkv does not see a replay: once a sequence has had appends captured, each of those
  // direct calls first waits for its stream (the whole device for reserve, max_selected and
  // finish_prefill) and compares the device's lengths with the host's, so direct calls on such a
  // sequence synchronise; they are for checks between replays. OutOfRange when replays reached the
  // reserved length (those appends were dropped; the lengths are still taken). OK at once on a cpu
  // store. Capturing needs finish_prefill done (FailedPrecondition), a reservation
  // (FailedPrecondition from a captured append; a captured attend without one replays its one step
  // only), device tensors (InvalidArgument) and no trace. On a store that spills, a captured append
  // needs the reservation held in DRAM and a captured attend a layer with nothing spilled
  // (FailedPrecondition otherwise); a graph captured before a layer spilled must not be replayed
  // after. With hot rows (StoreOptions::block_cache_tokens 1) a captured attend leaves the cache's
  // policy running on a stream of its own beside the next captured steps until the last layer's
  // attend joins it: a capture with attends of the sequence must end with its last layer's attend
  // (else cudaStreamEndCapture reports unjoined work). cudaGraphInstantiateFlagUseNodePriority
  // keeps that stream's (greatest) priority.
  Status sync_length(Stream stream);

  // Positions per KV head that the next attend() (or Store::select) of
  // `layer` attends to at the layer's current length: sink + top-K (or the
  // whole middle) + window, the newest token included. FailedPrecondition
  // before finish_prefill; InvalidArgument for a layer out of range.
  Result<int64_t> max_selected(int layer) const;

  // How far the keys appended to `layer` since its codec was fit have
  // drifted: their quantization error against the fit's, per KV head, and
  // the refits so far (SequenceOptions::refit_threshold). A host read of
  // counters, no sync (on a cuda store, what the GPU last published: appends
  // still queued on a stream are not counted yet). FailedPrecondition before
  // `layer` has an index (finish_prefill); InvalidArgument for a layer out
  // of range. A refit runs off the decode path (a thread of its own on a cpu
  // store, the index's build stream on a cuda store) and is swapped in by
  // the layer's next append or attend after it is built.
  Result<DriftStats> drift_stats(int layer) const;

  // Where this sequence's work runs: the Store's device.
  Device device() const;

  // Waits for the appends issued so far (a host sync on a CUDA store; call it
  // at a host-visible point, not every decode step) and returns
  // InvalidArgument, naming layer, token, head and dim, when a key or value
  // appended from device memory was NaN, Inf or overflowed the store's dtype.
  // Such a value is stored already: the error stays, and the sequence should
  // be dropped. Then, on a CUDA store, which fits each layer's index on the
  // device: it waits for the builds and returns InvalidArgument naming the
  // layer and KV head when a layer's keys were outside what its selection
  // code can fit in fp32 (as a cpu store's finish_prefill does; the error
  // stays until a refit); then InvalidArgument naming layer, query head and
  // dim when a decode step whose stream has finished gave a NaN or Inf
  // output (see attend()), given once, as the sequence's state is unharmed.
  // OK otherwise, and always on a cpu store (host input is refused at
  // append, a bad fit at finish_prefill, a bad output at attend).
  Status check_health();

 private:
  friend class engine::Inspector;  // the tools' and the engine's view (engine/inspector.h)
  std::unique_ptr<Impl> impl_;
};

}  // namespace pqkv
