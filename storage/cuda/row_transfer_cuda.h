// Moving rows between device tensors and the row store's blocks on the GPU.
// Blocks are pinned, mapped host memory, so a kernel writes and reads them
// directly over PCIe; the caller's stream orders everything, no host sync.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"
#include "storage/row_table.h"

namespace pqkv::storage {

// Writes keys and values [n, kv_heads, head_dim] (device-readable, `in_dtype`)
// into the rows of tokens [first_token, first_token + n), converting to the
// row dtype. `table` is a device view (DeviceRowTable::view); the blocks
// for those tokens must exist.
Status write_rows_cuda(const RowTableView& table, const void* keys, const void* values,
                       DType in_dtype, int64_t first_token, int64_t n, cudaStream_t stream);

// Reads the keys of tokens [begin, end) into out [end - begin, kv_heads,
// head_dim] (device memory, the row dtype).
Status read_keys_cuda(const RowTableView& table, int64_t begin, int64_t end, void* out,
                      cudaStream_t stream);

}  // namespace pqkv::storage
