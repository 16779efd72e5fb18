// The implementation behind pqkv::Sequence: ties the row store, the per-layer
// indexes and the decode-step executor together.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <tbb/task_arena.h>

#include "attention/decode_plan.h"
#include "index/layer_index.h"
#include "pqkv/sequence.h"
#include "storage/kv_row_store.h"
#include "storage/memory_budget.h"

namespace pqkv {

class Sequence::Impl {
 public:
  // `budget` and `arena` belong to the Store and outlive the sequence.
  Impl(std::string name, const ModelSpec& spec, const SequenceOptions& options, Device device,
       storage::MemoryBudget* budget, tbb::task_arena* arena);

  // Runs `fn` on the Store's worker threads.
  template <class Fn>
  auto in_arena(Fn&& fn) {
    return arena_->execute(std::forward<Fn>(fn));
  }

  const std::string& name() const { return name_; }
  const ModelSpec& spec() const { return spec_; }
  const SequenceOptions& options() const { return options_; }
  int64_t length(int layer) const { return kv_.length(layer); }
  bool prefilled() const { return prefilled_; }
  int64_t host_bytes() const { return kv_.bytes_reserved(); }

  Status append(int layer, const TensorView& keys, const TensorView& values, Stream stream);
  Status finish_prefill();
  Status attend(int layer, const TensorView& queries, const TensorView& out, Stream stream,
                AttendTrace* trace);
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out, Stream stream);

 private:
  Status check_layer(int layer) const;
  Status check_append_order(int layer, int64_t n) const;
  Status check_queries(const TensorView& queries, const TensorView& out) const;
  // Trains layer `layer`'s index on the keys past the sink and encodes every
  // stored key. Called at finish_prefill, or at the first step that needs a
  // search when the prompt was too short to train on.
  Status build_index(int layer);
  // Encodes stored keys that the index has no code for yet.
  Status encode_new_keys(int layer);

  std::string name_;
  ModelSpec spec_;
  SequenceOptions options_;
  Device device_;
  tbb::task_arena* arena_;
  storage::KvRowStore kv_;
  std::vector<std::unique_ptr<index::LayerIndex>> indexes_;  // [layer]
  bool prefilled_ = false;
  int64_t prefill_length_ = 0;

  // Scratch reused across steps so the decode path does not allocate.
  std::vector<float> queries_f32_;
  std::vector<float> out_f32_;
  std::vector<int32_t> selected_;
  std::vector<int32_t> attended_;
};

}  // namespace pqkv
