// The device memory of one layer's resident rows (tiering/resident_rows.h):
// the sink and a ring of window slots per KV head, filled from the row store
// as tokens are appended, so the decode step reads them from HBM instead of
// over PCIe.
//
// The bytes are charged to a budget (StoreOptions::hbm_budget_bytes) for as
// long as the object lives. Not thread-safe: one sequence is driven by one
// thread at a time. Every call enqueues on the stream it is given and never
// synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda_handles.h"
#include "pqkv/status.h"
#include "storage/memory_budget.h"
#include "storage/row_table.h"
#include "tiering/resident_rows.h"

namespace pqkv::tiering {

class ResidentRowsCuda {
 public:
  // Room for `shape` rows of each of `kv_heads` heads, rows of `row_bytes`
  // (a multiple of 16), on the current device, charged to `budget` (not
  // null; outlives the object). ResourceExhausted (nothing taken) when the
  // budget or the device is out of room; InvalidArgument for a bad shape.
  static Result<ResidentRowsCuda> create(int kv_heads, int64_t row_bytes,
                                         const ResidentShape& shape, storage::MemoryBudget* budget);

  ResidentRowsCuda(ResidentRowsCuda&& other) noexcept;
  ResidentRowsCuda& operator=(ResidentRowsCuda&& other) noexcept;
  ResidentRowsCuda(const ResidentRowsCuda&) = delete;
  ResidentRowsCuda& operator=(const ResidentRowsCuda&) = delete;
  ~ResidentRowsCuda();

  // Enqueues on `stream` the copy of the rows of tokens [first, first + n)
  // that are resident once the layer holds first + n tokens, read from
  // `table` (a device view; the rows must be written before, in stream
  // order). Tokens must be appended in order: each call continues the last.
  Status write(const storage::RowTableView& table, int64_t first, int64_t n, cudaStream_t stream);
  // The same copy with the first token read from device memory
  // (*first_position, when the kernel runs): appends captured in a CUDA graph,
  // whose position is the device-side length at each replay. Tokens at or
  // past max_tokens are not copied (the append drops them too).
  Status write_at_device_position(const storage::RowTableView& table, const int64_t* first_position,
                                  int64_t n, int64_t max_tokens, cudaStream_t stream);

  ResidentRowsView view() const;
  int64_t bytes() const { return bytes_; }

 private:
  ResidentRowsCuda() = default;
  void release();

  gpu::DeviceBuffer rows_;
  ResidentShape shape_;
  int kv_heads_ = 0;
  int64_t row_bytes_ = 0;
  int64_t bytes_ = 0;  // charged to budget_
  storage::MemoryBudget* budget_ = nullptr;
};

}  // namespace pqkv::tiering
