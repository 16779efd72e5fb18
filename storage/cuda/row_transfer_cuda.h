// Moving rows between device tensors and the row store's slabs on the GPU.
// Slabs are pinned, mapped host memory, so a kernel writes and reads them
// directly over PCIe; the caller's stream orders everything, no host sync.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::storage {

// Where the rows of one layer live, as a kernel sees them: a device array of
// slab base pointers [slab][kv_heads] (device-readable pointers: mapped host
// memory or device memory).
struct SlabTableView {
  std::byte* const* slabs = nullptr;  // device memory
  int kv_heads = 0;
  int64_t tokens_per_slab = 0;
  int head_dim = 0;
  DType row_dtype = DType::kBF16;  // rows are K[head_dim] then V[head_dim] of this type

  constexpr int64_t row_bytes() const { return 2LL * head_dim * dtype_size(row_dtype); }
};

// Writes keys and values [n, kv_heads, head_dim] (device-readable, `in_dtype`)
// into the rows of tokens [first_token, first_token + n), converting to the
// row dtype. The slabs for those tokens must exist.
Status write_rows_cuda(const SlabTableView& table, const void* keys, const void* values,
                       DType in_dtype, int64_t first_token, int64_t n, cudaStream_t stream);

// Reads the keys of tokens [begin, end) into out [end - begin, kv_heads,
// head_dim] (device memory, the row dtype).
Status read_keys_cuda(const SlabTableView& table, int64_t begin, int64_t end, void* out,
                      cudaStream_t stream);

}  // namespace pqkv::storage
