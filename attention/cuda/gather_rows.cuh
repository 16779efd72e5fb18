// The row gather of a decode step: copies the rows a step attends to from
// the row store's slabs (mapped pinned host memory read over PCIe, or device
// memory) into one compact device buffer [kv_heads, tokens, row] that the
// attention kernel reads. One launch per layer; no host work per row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/cuda/launch_config.h"
#include "core/cuda_handles.h"
#include "pqkv/status.h"
#include "storage/kv_row_store.h"

namespace pqkv::attention::cuda {

// Enqueues the gather described by `args` (see GatherRowsArgs) on `stream`.
// No allocation and no host synchronisation: it can be captured in a graph.
Status launch_gather_rows(const GatherRowsArgs& args, cudaStream_t stream);

// The device copy of one layer's slab-pointer table, kept in step with a
// KvRowStore as it grows. Room for a fixed number of tokens is reserved at
// creation, so the table never moves and a captured graph that reads it stays
// valid; update() only copies the entries of slabs added since the last call.
class DeviceSlabTable {
 public:
  // A table for `layer` of `kv` with room for `max_tokens` tokens (whole
  // slabs). `kv` must use a device-readable allocator and outlive the table.
  static Result<DeviceSlabTable> create(const storage::KvRowStore& kv, int layer,
                                        int64_t max_tokens);

  // Enqueues on `stream` the copy of the entries of slabs added to the layer
  // since the last call; kernels on `stream` after it see them. OutOfRange
  // when the layer has outgrown the room reserved at creation.
  Status update(cudaStream_t stream);

  // Device memory: [slab_capacity][kv_heads] slab base pointers.
  const std::byte* const* device_table() const { return device_.as<const std::byte* const>(); }
  int64_t slab_capacity() const { return capacity_; }
  // Slabs whose entries have been enqueued for copy.
  int64_t synced_slabs() const { return synced_; }

  // Gather arguments over this table: `positions` [kv_heads, tokens] and `out`
  // are device memory.
  GatherRowsArgs gather_args(const int32_t* positions, int64_t tokens, std::byte* out) const;

 private:
  DeviceSlabTable(const storage::KvRowStore* kv, int layer, int64_t capacity,
                  gpu::PinnedBuffer host, gpu::DeviceBuffer device)
      : kv_(kv),
        layer_(layer),
        capacity_(capacity),
        host_(std::move(host)),
        device_(std::move(device)) {}

  const storage::KvRowStore* kv_;
  int layer_;
  int64_t capacity_;  // slabs
  int64_t synced_ = 0;
  // Pinned source of the asynchronous copies: an entry is written once,
  // before its copy is enqueued, and never changes after.
  gpu::PinnedBuffer host_;
  gpu::DeviceBuffer device_;
};

}  // namespace pqkv::attention::cuda
