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

// The row write of an append replayed from a CUDA graph: writes the n rows
// at tokens [*length, *length + n) (length: device int64, read when the
// kernel runs), or nothing when that passes `max_tokens` (the rows the
// table's blocks were reserved for). advance_length_cuda then moves the
// length on.
Status write_rows_at_length_cuda(const RowTableView& table, const void* keys, const void* values,
                                 DType in_dtype, int64_t n, const int64_t* length,
                                 int64_t max_tokens, cudaStream_t stream);

// Advances the device-side *length by n. With `overflow` (device int32) set,
// a length that would pass max_tokens stays and *overflow becomes 1, for the
// host to report; without it the length always advances (direct appends,
// whose rows the host has placed, keep the device length in step).
Status advance_length_cuda(int64_t* length, int64_t n, int64_t max_tokens, int32_t* overflow,
                           cudaStream_t stream);

// Reads the keys of tokens [begin, end) into out [end - begin, kv_heads,
// head_dim] (device memory, the row dtype).
Status read_keys_cuda(const RowTableView& table, int64_t begin, int64_t end, void* out,
                      cudaStream_t stream);

}  // namespace pqkv::storage
