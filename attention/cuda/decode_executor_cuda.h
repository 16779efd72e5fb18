// The GPU backend of a sequence: rows in pinned, mapped host slabs (the GPU
// holds no full K/V), one CUDA PQ index per layer, and a decode step that is
// search -> attended positions -> row gather over PCIe -> split-K attention,
// all enqueued on the caller's stream with no host synchronisation.
//
// Every entry point makes the store's GPU current and restores the caller's
// device on return (gpu::ScopedDevice). Rows live in blocks of the Store's
// pinned arena; host callers' work runs on the Store's stream.
//
// Tensors may be device memory of the store's GPU or host memory; host
// tensors are staged through device buffers and the call then finishes
// before it returns (Stream::host()). Device keys are not scanned for NaN or
// Inf: that would need a host sync on the prefill path.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <optional>
#include <vector>

#include "attention/decode_executor.h"
#include "core/cuda_handles.h"
#include "storage/cuda/device_row_table.h"
#include "storage/kv_row_store.h"

namespace pqkv::attention::cuda {

class DecodeExecutorCuda final : public DecodeExecutor {
 public:
  // Fails (with the reason) where the GPU path cannot serve the geometry.
  static Result<std::unique_ptr<DecodeExecutorCuda>> create(const ExecutorConfig& config);

  Device device() const override { return config_.device; }
  int64_t length(int layer) const override { return kv_.length(layer); }
  int64_t host_bytes() const override { return kv_.bytes_held(); }
  Status reserve(int64_t max_tokens, const DecodePlan& plan) override;
  Status append(int layer, const TensorView& keys, const TensorView& values,
                Stream stream) override;
  Status build_index(int layer, int64_t train_begin, Stream stream) override;
  const index::LayerIndex* layer_index(int layer) const override {
    return layers_[layer].index.get();
  }
  void drop_indexes() override;
  Status attend(int layer, const DecodePlan& plan, const TensorView& queries, const TensorView& out,
                Stream stream, AttendTrace* trace) override;
  Status select(int layer, const DecodePlan& plan, const TensorView& queries, int32_t* positions,
                int64_t max_selected, bool positions_on_device, Stream stream) override;
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                      Stream stream) override;

 private:
  struct Layer {
    std::unique_ptr<index::LayerIndex> index;  // null until trained
    std::optional<storage::DeviceRowTable> table;  // device copy of the row table
    gpu::EventHandle appended;                 // recorded after the last row write
  };

  explicit DecodeExecutorCuda(const ExecutorConfig& config);
  Status init();
  // The caller's stream, or the Store's for host callers.
  cudaStream_t stream_of(Stream stream) const;
  // Makes `layer`'s device row table cover every stored token, with room
  // for at least `room` tokens.
  Status sync_table(int layer, cudaStream_t stream, int64_t room = 0);
  // Grows the step's device buffers for `plan` and query/output dtypes.
  Status size_step_buffers(const DecodePlan& plan, DType query_dtype, DType out_dtype);
  // Search and attended positions of `plan` into positions_ (device).
  Status plan_positions(Layer& l, const DecodePlan& plan, const void* queries, DType query_dtype,
                        cudaStream_t s);
  // Device memory holding `t`: `t` itself when it is on the GPU, else a copy in `staging`.
  Result<const void*> on_device(const TensorView& t, gpu::DeviceBuffer& staging,
                                cudaStream_t stream);

  ExecutorConfig config_;
  storage::KvRowStore kv_;
  std::vector<Layer> layers_;
  gpu::EventHandle stage_events_[4];  // timing of the stages when a trace is asked for

  // Device buffers that only grow, sized by the largest step so far.
  gpu::DeviceBuffer keys_in_, values_in_, queries_in_, out_;
  gpu::DeviceBuffer selected_, positions_, rows_, attention_workspace_;
};

}  // namespace pqkv::attention::cuda
