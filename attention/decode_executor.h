// The work of a sequence on one backend: storing rows, training and growing
// the per-layer indexes, and running decode steps. The engine validates every
// request and keeps the sequence's state machine; an executor assumes valid
// input. Two implementations side by side: cpu/decode_executor_cpu.h and
// cuda/decode_executor_cuda.h.
#pragma once

#include <cstdint>
#include <memory>

#include "attention/decode_plan.h"
#include "index/layer_index.h"
#include "pqkv/options.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"
#include "storage/memory_budget.h"

namespace pqkv::attention {

class DecodeExecutor {
 public:
  virtual ~DecodeExecutor() = default;

  // Where the work runs; tensors may live there or on the host.
  virtual Device device() const = 0;
  virtual int64_t length(int layer) const = 0;
  // Host bytes held for this sequence's rows.
  virtual int64_t host_bytes() const = 0;

  // Appends keys and values [n, kv_heads, head_dim] to `layer`; once the
  // layer's index is trained, the new keys are encoded too. All or nothing.
  virtual Status append(int layer, const TensorView& keys, const TensorView& values,
                        Stream stream) = 0;

  // Trains `layer`'s index on the stored keys of tokens [train_begin, length)
  // and encodes every stored key. A no-op when that range is empty.
  virtual Status build_index(int layer, int64_t train_begin, Stream stream) = 0;
  virtual const index::LayerIndex* layer_index(int layer) const = 0;
  virtual void drop_indexes() = 0;

  // One decode step of `layer` under `plan`. `trace` may be null; filling it
  // may synchronise the stream.
  virtual Status attend(int layer, const DecodePlan& plan, const TensorView& queries,
                        const TensorView& out, Stream stream, AttendTrace* trace) = 0;
  // Exact attention over every stored token of `layer`.
  virtual Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                              Stream stream) = 0;

  // Waits for the appends issued so far and reports a key or value that a
  // device-side check found NaN, Inf or overflowing the row dtype
  // (InvalidArgument, naming layer, token, head and dim); OK when none.
  // Host input is checked before it reaches an executor, so the default
  // has nothing to report.
  virtual Status check_health() { return ok_status(); }
};

struct ExecutorConfig {
  ModelSpec spec;
  SequenceOptions options;
  Device device;
  storage::MemoryBudget* budget = nullptr;  // the Store's; outlives the executor
};

// The executor for config.device.
Result<std::unique_ptr<DecodeExecutor>> make_decode_executor(const ExecutorConfig& config);

}  // namespace pqkv::attention
