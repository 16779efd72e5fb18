#include "storage/cuda/device_row_table.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/cuda_check.h"

namespace pqkv::storage {

Result<DeviceRowTable> DeviceRowTable::create(const KvRowStore& kv, int layer, int64_t max_tokens) {
  if (!kv.arena().device_readable()) {
    return Status::failed_precondition(
        "row table: the row store's blocks are not device readable; give the store a pinned "
        "BlockArena");
  }
  if (layer < 0 || layer >= kv.spec().num_layers) {
    return Status::invalid_argument("row table: no layer " + std::to_string(layer));
  }
  int device = 0;
  int unified = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&unified, cudaDevAttrUnifiedAddressing, device));
  if (unified == 0) {
    // Without unified addressing a mapped block has a different device address.
    return Status::unavailable("row table: the GPU lacks unified addressing");
  }
  constexpr int64_t tpb = KvRowStore::kTokensPerBlock;
  const int64_t capacity = std::max((max_tokens + tpb - 1) / tpb, kv.num_blocks(layer));
  const size_t bytes = static_cast<size_t>(capacity) * kv.spec().num_kv_heads * sizeof(void*);
  PQKV_ASSIGN_OR_RETURN(gpu::PinnedBuffer host, gpu::PinnedBuffer::allocate(bytes));
  PQKV_ASSIGN_OR_RETURN(gpu::DeviceBuffer dev, gpu::DeviceBuffer::allocate(bytes));
  return DeviceRowTable(&kv, layer, capacity, std::move(host), std::move(dev));
}

Status DeviceRowTable::update(cudaStream_t stream) {
  const int64_t blocks = kv_->num_blocks(layer_);
  if (blocks > capacity_) {
    return Status::out_of_range("row table: layer " + std::to_string(layer_) + " holds " +
                                std::to_string(blocks) + " blocks, the table was created for " +
                                std::to_string(capacity_) + "; reserve more tokens first");
  }
  // Blocks given back after a failed reserve: their entries are stale and
  // are copied again when the layer regrows.
  if (kv_->table_version(layer_) != version_) {
    // Entries in place changed (spilled or read back): copy every one again.
    version_ = kv_->table_version(layer_);
    synced_ = 0;
  }
  if (blocks <= synced_) {
    synced_ = blocks;
    return ok_status();
  }
  const int kv_heads = kv_->spec().num_kv_heads;
  const size_t offset = static_cast<size_t>(synced_) * kv_heads * sizeof(void*);
  const size_t bytes = static_cast<size_t>(blocks - synced_) * kv_heads * sizeof(void*);
  // The host table has the device table's layout: copy its new entries.
  std::memcpy(host_.as<std::byte>() + offset, kv_->host_table(layer_).blocks + synced_ * kv_heads,
              bytes);
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_.as<std::byte>() + offset,
                                            host_.as<std::byte>() + offset, bytes,
                                            cudaMemcpyHostToDevice, stream));
  synced_ = blocks;
  return ok_status();
}

RowTableView DeviceRowTable::view() const {
  RowTableView v = kv_->host_table(layer_);
  v.blocks = device_.as<std::byte* const>();
  return v;
}

}  // namespace pqkv::storage
