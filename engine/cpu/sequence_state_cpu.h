// A sequence's state on the CPU: rows in heap blocks of the Store's arena,
// Faiss-trained indexes, and the CPU decode step's scratch. The reference for
// the CUDA state.
#pragma once

#include <memory>
#include <vector>

#include "attention/cpu/decode_step_cpu.h"
#include "engine/sequence_state.h"
#include "storage/kv_row_store.h"
#include "tiering/block_cache.h"

namespace pqkv::engine {

class SequenceStateCpu final : public SequenceState {
 public:
  explicit SequenceStateCpu(const SequenceStateConfig& config);

  Device device() const override { return Device::cpu(); }
  int64_t length(int layer) const override { return kv_.length(layer); }
  int64_t host_bytes() const override { return kv_.bytes_held(); }
  Status reserve(int64_t max_tokens, const attention::DecodePlan& plan) override;
  Status append(int layer, const TensorView& keys, const TensorView& values,
                Stream stream) override;
  Status build_index(int layer, int64_t train_begin, Stream stream) override;
  const index::LayerIndex* layer_index(int layer) const override { return indexes_[layer].get(); }
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

 private:
  // Encodes stored keys that the index has no code for yet.
  Status encode_new_keys(int layer);
  // The step's view of `layer` under `plan`.
  attention::DecodeStepInputs step_inputs(int layer, const attention::DecodePlan& plan) const;

  SequenceStateConfig config_;
  storage::KvRowStore kv_;
  std::vector<std::unique_ptr<index::LayerIndex>> indexes_;  // [layer]; null until trained
  attention::DecodeStepCpuWorkspace workspace_;              // reused across steps
  // The block cache in host memory, from reserve() on (none when the Store
  // has no cache budget left).
  std::unique_ptr<tiering::BlockCacheCpu> cache_;
};

}  // namespace pqkv::engine
