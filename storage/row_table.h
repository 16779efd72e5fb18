// The one description of where a layer's rows live, used by every reader and
// writer of rows: host appends and reads (KvRowStore), the GPU row writes and
// key reads (storage/cuda/row_transfer_cuda.h), the decode step's gather
// (attention/cuda/gather_rows.cuh) and, later, cache admissions.
//
// Rows of (layer, KV head) sit in blocks of tokens_per_block rows; a table
// lists the blocks' base pointers [block][kv_heads]. A host view's table is
// host memory (KvRowStore::host_table); a device view's table is device
// memory (DeviceRowTable). The block pointers themselves are the same in both:
// host pointers that a kernel may dereference when the blocks are mapped
// pinned memory (unified addressing).
#pragma once

#include <cstddef>
#include <cstdint>

#include "pqkv/dtype.h"

#if defined(__CUDACC__)
#define PQKV_HOST_DEVICE __host__ __device__
#else
#define PQKV_HOST_DEVICE
#endif

namespace pqkv::storage {

struct RowTableView {
  std::byte* const* blocks = nullptr;  // [num_blocks][kv_heads] block base pointers
  int kv_heads = 0;
  int head_dim = 0;
  DType row_dtype = DType::kBF16;  // a row is K[head_dim] then V[head_dim] of this type
  int64_t row_bytes = 0;           // 2 * head_dim * dtype_size(row_dtype)
  int64_t tokens_per_block = 0;    // 1 << block_shift
  int block_shift = 0;

  // Index of the block holding `token` of `head` in `blocks`.
  PQKV_HOST_DEVICE int64_t block_index(int head, int64_t token) const {
    return (token >> block_shift) * kv_heads + head;
  }
  // Row of `token` inside its block.
  PQKV_HOST_DEVICE int64_t row_in_block(int64_t token) const {
    return token & (tokens_per_block - 1);
  }
  // Byte offset of `token`'s row inside its block.
  PQKV_HOST_DEVICE int64_t offset_in_block(int64_t token) const {
    return row_in_block(token) * row_bytes;
  }
  // The row of (head, token): head_dim keys then head_dim values.
  PQKV_HOST_DEVICE std::byte* row(int head, int64_t token) const {
    return blocks[block_index(head, token)] + offset_in_block(token);
  }
};

}  // namespace pqkv::storage
