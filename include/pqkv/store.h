// The Store: owns every sequence of one model geometry, their memory and the
// worker threads, and, when opened on a directory, the sequences saved there.
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
  // Removes the name, from memory and, when it was saved, from the
  // directory (its catalog entries, then its segment file): later
  // get_sequence and open_sequence calls fail and the name may be reused.
  // Handles held elsewhere stay valid; the sequence's memory returns to the
  // Store when the last one goes. NotFound when the name is neither in
  // memory nor saved.
  Status drop(const std::string& name);
  std::vector<std::string> sequence_names() const;

  // Persistence (StoreOptions::directory; FailedPrecondition without one).
  //
  // Writes `sequence` (of this Store) to the directory under its name: its
  // rows to a new segment file, then, in one atomic catalog write, its
  // ModelSpec, options, StoreOptions::model_fingerprint, prefill state, each
  // (layer, KV head)'s codec state and codes, and the segment's checksums.
  // Replaces an earlier save of the name. A failure or a crash at any point
  // leaves the earlier save (or none) intact. The sequence must not be driven
  // by another thread meanwhile. May synchronise the device (CUDA stores
  // wait for pending appends and index builds). cpu and CUDA stores write
  // the same format: a save of either opens on the other. Unimplemented
  // when the sequence's index cannot be saved on this device.
  Status save(Sequence& sequence);
  // Loads the saved sequence `name` into memory and returns a handle: it
  // answers attend and select exactly as the saved one did (same rows, same
  // codebooks and codes: no index rebuild). AlreadyExists when a sequence of
  // that name is in memory (close_sequence it first); NotFound when none is
  // saved; FailedPrecondition, naming both, when it was saved with another
  // model fingerprint or geometry; Corruption or NotFound naming the file
  // when its segment file is damaged, truncated or missing (the rest of the
  // store stays usable).
  Result<std::shared_ptr<Sequence>> open_sequence(const std::string& name);
  // Forgets the in-memory sequence `name` (as drop does) but keeps its save.
  // NotFound when none is in memory.
  Status close_sequence(const std::string& name);
  // Names of the sequences saved in the directory (empty without one).
  // Corruption or IoError, naming the catalog, when it cannot be read (a
  // damaged table file): a damaged catalog is not an empty one.
  Result<std::vector<std::string>> saved_sequence_names() const;
  // Deletes segment files no saved sequence names (left by a crash) and
  // compacts the catalog so dropped sequences stop taking disk space.
  Status compact();

  // Host bytes the Store holds for keys and values: the chunks of its block
  // arena (pinned memory on a CUDA store), exactly what is charged to
  // StoreOptions::dram_budget_bytes. Blocks freed by dropped sequences stay
  // held and are reused by later ones.
  int64_t dram_bytes_used() const;
  // Of dram_bytes_used(): bytes held but holding no rows (preallocated, the
  // rest of a chunk, blocks of dropped sequences), which appends take before
  // allocating.
  int64_t dram_bytes_free() const;

  // Takes host memory for rows now, so that later appends (of any sequence)
  // do not allocate: after it, at least `bytes` (rounded up to whole row
  // blocks) of the Store's held memory is free for appends. Only the part
  // not already free is taken (in 256 MiB chunks of pinned memory on a cuda
  // store, heap memory on a cpu store), so calling it again with the same
  // bytes takes nothing until appends use the rows; it does not add up.
  // Memory taken stays held (and charged to dram_budget_bytes) until the
  // Store closes, as blocks of dropped sequences do. All or nothing:
  // ResourceExhausted, naming the bytes asked for, held and allowed, when
  // dram_budget_bytes cannot take them (nothing is taken, nothing held is
  // lost); ResourceExhausted when the system has no more (pinned) memory;
  // InvalidArgument when `bytes` < 0. 0 takes nothing. Host time: about what
  // the appends would have spent allocating (cudaHostAlloc pins every page).
  // Thread-safe; appends running meanwhile may take some of the rows.
  Status preallocate_dram(int64_t bytes);

  // Host bytes of row blocks one sequence of `tokens` tokens in every layer
  // holds (whole blocks of KvRowStore's 128 tokens per (layer, KV head)):
  // what to preallocate_dram before appending them. 0 for tokens <= 0;
  // INT64_MAX when the bytes would pass it.
  int64_t dram_bytes_for_tokens(int64_t tokens) const;

  // Device bytes the Store's sequences hold on the GPU outside their
  // workspaces (resident sink and window rows), exactly what is charged to
  // StoreOptions::hbm_budget_bytes; 0 on a cpu store.
  int64_t hbm_bytes_used() const;

  // One decode step of `layer` for a batch of sequences (of different
  // lengths and budgets): each steps[i].out gets what
  // steps[i].sequence->attend(layer, steps[i].queries, steps[i].out, stream)
  // would write. CPU stores run the sequences in parallel on the Store's
  // threads. CUDA stores fork from `stream` onto the Store's eight batch
  // streams (step i on stream i % 8), enqueue every step from the calling
  // thread and join back into `stream`, so the steps run side by side on
  // the device; host queries and outputs are staged through one device
  // buffer and the call waits once for the whole batch (never, with device
  // tensors on a caller's stream). The batch streams' priorities fall with
  // their index over the device's priority levels, so the first steps finish
  // first and their gathers over PCIe overlap the later steps' searches
  // instead of all searches running before any gather (measured in
  // docs/benchmarks.md). A batch with device tensors may be captured in a
  // CUDA graph: the fork and join become edges of the graph; instantiate it
  // with cudaGraphInstantiateFlagUseNodePriority to keep the priorities.
  // Thread-safe; concurrent batched calls on one CUDA store take turns
  // enqueueing. Every step is checked before any runs: a bad one
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
  // A CUDA store runs the steps side by side on its batch streams, as
  // attend() does, and copies host positions out in one piece at the end.
  Status select(int layer, std::span<const SequenceStep> steps, const SelectOutput& out,
                Stream stream);

 private:
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pqkv
