// The implementation behind pqkv::Sequence: validates every request, keeps the
// sequence's state (prefill, then decode steps in layer order), plans each
// step, and hands the work to the backend's decode executor.
#pragma once

#include <tbb/task_arena.h>

#include <memory>
#include <string>

#include "attention/decode_executor.h"
#include "pqkv/sequence.h"

namespace pqkv {

class Sequence::Impl {
 public:
  // `arena` belongs to the Store and outlives the sequence.
  Impl(std::string name, const ModelSpec& spec, const SequenceOptions& options,
       std::unique_ptr<attention::DecodeExecutor> executor, tbb::task_arena* arena);

  // Runs `fn` on the Store's worker threads.
  template <class Fn>
  auto in_arena(Fn&& fn) {
    return arena_->execute(std::forward<Fn>(fn));
  }

  const std::string& name() const { return name_; }
  const ModelSpec& spec() const { return spec_; }
  const SequenceOptions& options() const { return options_; }
  int64_t length(int layer) const { return executor_->length(layer); }
  bool prefilled() const { return prefilled_; }
  int64_t host_bytes() const { return executor_->host_bytes(); }
  // The index of `layer`, or null before it is trained: for tools that inspect it.
  const index::LayerIndex* layer_index(int layer) const { return executor_->layer_index(layer); }

  Status append(int layer, const TensorView& keys, const TensorView& values, Stream stream);
  Status finish_prefill();
  Status attend(int layer, const TensorView& queries, const TensorView& out, Stream stream,
                AttendTrace* trace);
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out, Stream stream);
  Status check_health() { return executor_->check_health(); }

 private:
  Status check_layer(int layer) const;
  Status check_tensor_device(const char* what, const TensorView& t) const;
  Status check_append_order(int layer, int64_t n) const;
  Status check_queries(const TensorView& queries, const TensorView& out) const;
  // The first token the index trains on: the end of the sink.
  int64_t train_begin(int64_t length) const;

  std::string name_;
  ModelSpec spec_;
  SequenceOptions options_;
  std::unique_ptr<attention::DecodeExecutor> executor_;
  tbb::task_arena* arena_;
  bool prefilled_ = false;
  int64_t prefill_length_ = 0;
};

}  // namespace pqkv
