// The GPU backend of a sequence: rows in pinned, mapped host slabs (the GPU
// holds no full K/V), one CUDA PQ index per layer, and a decode step that is
// search -> attended positions -> row gather over PCIe -> split-K attention,
// all enqueued on the caller's stream with no host synchronisation.
//
// Tensors may be device memory of the store's GPU or host memory; host
// tensors are staged through device buffers and the call then finishes
// before it returns (Stream::host()). Every append is checked on the device
// for NaN, Inf and overflow of the row dtype, without a host sync; the result
// is read by check_health() (storage/cuda/storable_check_cuda.h).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <optional>
#include <vector>

#include "attention/cuda/gather_rows.cuh"
#include "attention/decode_executor.h"
#include "core/cuda_handles.h"
#include "storage/kv_row_store.h"

namespace pqkv::attention::cuda {

class DecodeExecutorCuda final : public DecodeExecutor {
 public:
  // Fails (with the reason) where the GPU path cannot serve the geometry.
  static Result<std::unique_ptr<DecodeExecutorCuda>> create(const ExecutorConfig& config);

  Device device() const override { return config_.device; }
  int64_t length(int layer) const override { return kv_.length(layer); }
  int64_t host_bytes() const override { return kv_.bytes_reserved(); }
  Status append(int layer, const TensorView& keys, const TensorView& values,
                Stream stream) override;
  Status build_index(int layer, int64_t train_begin, Stream stream) override;
  const index::LayerIndex* layer_index(int layer) const override {
    return layers_[layer].index.get();
  }
  void drop_indexes() override;
  Status attend(int layer, const DecodePlan& plan, const TensorView& queries, const TensorView& out,
                Stream stream, AttendTrace* trace) override;
  Status attend_exact(int layer, const TensorView& queries, const TensorView& out,
                      Stream stream) override;
  Status check_health() override;

 private:
  struct Layer {
    std::unique_ptr<index::LayerIndex> index;  // null until trained
    std::optional<DeviceSlabTable> table;      // device copy of the slab pointers
    gpu::EventHandle appended;                 // recorded after the last row write
  };

  DecodeExecutorCuda(const ExecutorConfig& config, std::shared_ptr<storage::SlabAllocator> pinned);
  Status init();
  // The caller's stream, or the executor's own for host callers.
  cudaStream_t stream_of(Stream stream) const;
  // Makes `layer`'s device slab table cover every stored token.
  Status sync_table(int layer, cudaStream_t stream);
  // Device memory holding `t`: `t` itself when it is on the GPU, else a copy in `staging`.
  Result<const void*> on_device(const TensorView& t, gpu::DeviceBuffer& staging,
                                cudaStream_t stream);

  ExecutorConfig config_;
  storage::KvRowStore kv_;
  std::vector<Layer> layers_;
  gpu::StreamHandle own_stream_;       // for callers that pass Stream::host()
  gpu::EventHandle stage_events_[4];   // timing of the stages when a trace is asked for
  gpu::PinnedBuffer storable_report_;  // a storage::StorableReport the append check writes

  // Device buffers that only grow, sized by the largest step so far.
  gpu::DeviceBuffer keys_in_, values_in_, queries_in_, out_;
  gpu::DeviceBuffer selected_, positions_, rows_, attention_workspace_;
};

}  // namespace pqkv::attention::cuda
