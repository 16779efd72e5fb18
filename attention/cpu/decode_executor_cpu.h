// The CPU backend of a sequence: rows in heap slabs, Faiss-trained indexes,
// search and attention on TBB threads. The reference for the GPU backend.
#pragma once

#include <memory>
#include <vector>

#include "attention/decode_executor.h"
#include "storage/kv_row_store.h"

namespace pqkv::attention {

class DecodeExecutorCpu final : public DecodeExecutor {
 public:
  explicit DecodeExecutorCpu(const ExecutorConfig& config);

  Device device() const override { return Device::cpu(); }
  int64_t length(int layer) const override { return kv_.length(layer); }
  int64_t host_bytes() const override { return kv_.bytes_held(); }
  Status reserve(int64_t max_tokens, const DecodePlan& plan) override;
  Status append(int layer, const TensorView& keys, const TensorView& values,
                Stream stream) override;
  Status build_index(int layer, int64_t train_begin, Stream stream) override;
  const index::LayerIndex* layer_index(int layer) const override { return indexes_[layer].get(); }
  void drop_indexes() override;
  Status attend(int layer, const DecodePlan& plan, const TensorView& queries, const TensorView& out,
                Stream stream, AttendTrace* trace) override;
  Status select(int layer, const DecodePlan& plan, const TensorView& queries, int32_t* positions,
                int64_t max_selected, bool positions_on_device, Stream stream) override;
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                      Stream stream) override;

 private:
  // Encodes stored keys that the index has no code for yet.
  Status encode_new_keys(int layer);
  // Runs the index's search (when the plan has one) and lists the attended
  // positions in attended_ ([kv_heads, plan.tokens_per_head()]).
  Status plan_positions(int layer, const DecodePlan& plan, const TensorView& queries,
                        index::SearchTimings* timings);

  ExecutorConfig config_;
  storage::KvRowStore kv_;
  std::vector<std::unique_ptr<index::LayerIndex>> indexes_;  // [layer]; null until trained

  // Scratch reused across steps so the decode path does not allocate.
  std::vector<float> queries_f32_;
  std::vector<float> out_f32_;
  std::vector<int32_t> selected_;
  std::vector<int32_t> attended_;
};

}  // namespace pqkv::attention
