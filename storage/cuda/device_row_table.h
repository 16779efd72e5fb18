// The device copy of one layer's row table, kept in step with a KvRowStore as
// it grows. Room for a fixed number of tokens is reserved at creation, so the
// table never moves and a captured graph that reads it stays valid; update()
// copies the entries of blocks added since the last call and, when blocks
// in place were spilled to disk or read back (KvRowStore::table_version),
// every entry again: a spilled block's entry becomes null, so no kernel
// reads a block that left DRAM once the update is ordered before it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda_handles.h"
#include "pqkv/status.h"
#include "storage/kv_row_store.h"
#include "storage/row_table.h"

namespace pqkv::storage {

class DeviceRowTable {
 public:
  // A table for `layer` of `kv` with room for `max_tokens` tokens (whole
  // blocks). `kv` must use a device-readable arena and outlive the table.
  // FailedPrecondition for a heap arena; Unavailable without unified addressing.
  static Result<DeviceRowTable> create(const KvRowStore& kv, int layer, int64_t max_tokens);

  // Enqueues on `stream` the copy of the entries of blocks added to the layer
  // since the last call (of every entry when the layer's table version
  // changed); kernels on `stream` after it see them. Rewriting entries in
  // place assumes no earlier copy of this table is still pending (the
  // store's spill hook waits for the sequence's streams first). OutOfRange
  // when the layer has outgrown the room reserved at creation.
  Status update(cudaStream_t stream);

  // The device view: its table is device memory [block_capacity][kv_heads].
  RowTableView view() const;
  int64_t block_capacity() const { return capacity_; }
  // Blocks whose entries have been enqueued for copy.
  int64_t synced_blocks() const { return synced_; }

 private:
  DeviceRowTable(const KvRowStore* kv, int layer, int64_t capacity, gpu::PinnedBuffer host,
                 gpu::DeviceBuffer device)
      : kv_(kv),
        layer_(layer),
        capacity_(capacity),
        host_(std::move(host)),
        device_(std::move(device)) {}

  const KvRowStore* kv_;
  int layer_;
  int64_t capacity_;  // blocks per head
  int64_t synced_ = 0;
  int64_t version_ = 0;  // kv_->table_version(layer_) at the last copy
  // Pinned source of the asynchronous copies: an entry is written before
  // its copy is enqueued, and again only after a spill or refill.
  gpu::PinnedBuffer host_;
  gpu::DeviceBuffer device_;
};

}  // namespace pqkv::storage
