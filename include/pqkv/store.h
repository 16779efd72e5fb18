// The Store: owns every sequence of one model geometry, their memory and the
// worker threads. In memory for now; tiers and persistence live behind it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "pqkv/export.h"
#include "pqkv/options.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"

namespace pqkv {

// One sequence's part of a batched decode step (Store::attend, Store::select).
struct PQKV_API SequenceStep {
  Sequence* sequence = nullptr;  // a sequence of this Store
  TensorView queries;            // [q_heads, head_dim]
  TensorView out;                // [q_heads, head_dim]; not read by Store::select
};

// Where Store::select writes: positions [n, kv_heads, max_selected] int32,
// padded with -1, and lengths [n, kv_heads] int32 (valid positions of each
// row), both in `memory` (host, or device memory of the Store's GPU).
struct PQKV_API SelectOutput {
  int32_t* positions = nullptr;
  int64_t max_selected = 0;
  int32_t* lengths = nullptr;
  Device memory = Device::cpu();
};

// Thread-safety: every method may be called from any thread; sequences of
// one Store may be driven from different threads at once (one thread per
// sequence at a time).
class PQKV_API Store {
 public:
  class PQKV_HIDDEN Impl;
  static Result<std::unique_ptr<Store>> open(const StoreOptions& options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const StoreOptions& options() const;

  // Creates an empty sequence; the name must be new (AlreadyExists
  // otherwise). The handle stays valid while anyone holds it, after drop()
  // too; the Store must outlive it.
  Result<std::shared_ptr<Sequence>> create_sequence(const std::string& name,
                                                    const SequenceOptions& options);
  // A handle to the sequence named `name`; NotFound when there is none.
  Result<std::shared_ptr<Sequence>> get_sequence(const std::string& name);
  // Removes the name: later get_sequence calls fail and the name may be
  // reused. Handles held elsewhere stay valid; the sequence's memory returns
  // to the Store when the last one goes. NotFound for an unknown name.
  Status drop(const std::string& name);
  std::vector<std::string> sequence_names() const;

  // Host bytes the Store holds for keys and values: the chunks of its block
  // arena (pinned memory on a CUDA store), exactly what is charged to
  // StoreOptions::dram_budget_bytes. Blocks freed by dropped sequences stay
  // held and are reused by later ones.
  int64_t dram_bytes_used() const;

  // Device bytes the Store's sequences hold on the GPU outside their
  // workspaces (resident sink and window rows), exactly what is charged to
  // StoreOptions::hbm_budget_bytes; 0 on a cpu store.
  int64_t hbm_bytes_used() const;

  // One decode step of `layer` for a batch of sequences (of different
  // lengths and budgets): each steps[i].out gets what
  // steps[i].sequence->attend(layer, steps[i].queries, steps[i].out, stream)
  // would write. CPU stores run the sequences in parallel on the Store's
  // threads; CUDA stores enqueue each sequence's step in turn on `stream`
  // from the calling thread (one launch sequence per sequence, no host sync
  // for device tensors). Every step is checked before any runs: a bad one
  // (InvalidArgument or FailedPrecondition, naming its index) runs none. A
  // failure while running (ResourceExhausted, say) names the sequence; the
  // outputs of the other sequences may then have been written. No two steps
  // may name the same sequence.
  Status attend(int layer, std::span<const SequenceStep> steps, Stream stream);

  // The selector alone: for each step, the positions attend() would attend
  // to (sink, top-K picks, window, newest token), per KV head, without
  // attending; steps[i].out is not read. OutOfRange naming the size needed
  // when out.max_selected is smaller than some sequence's max_selected(layer).
  // Positions or lengths in device memory are written in order on `stream`.
  Status select(int layer, std::span<const SequenceStep> steps, const SelectOutput& out,
                Stream stream);

 private:
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pqkv
