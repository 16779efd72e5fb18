#include "tiering/cuda/resident_rows_cuda.h"

#include <algorithm>
#include <string>
#include <utility>

#include "core/cuda_check.h"

namespace pqkv::tiering {
namespace {

constexpr int kCopyThreads = 256;

// Copies the rows of tokens [first, first + n) of every head from the row
// store into their resident slots, 16 bytes per thread; blockIdx.y is the
// KV head.
__global__ void __launch_bounds__(kCopyThreads)
    copy_resident_kernel(storage::RowTableView table, ResidentRowsView resident, int64_t first,
                         int64_t n) {
  const int head = blockIdx.y;
  const int64_t chunks_per_row = table.row_bytes / 16;
  const int64_t c = int64_t{blockIdx.x} * kCopyThreads + threadIdx.x;
  if (c >= n * chunks_per_row) return;
  const int64_t token = first + c / chunks_per_row;
  const int64_t chunk = c % chunks_per_row;
  const auto* src = reinterpret_cast<const uint4*>(table.row(head, token));
  auto* dst = reinterpret_cast<uint4*>(resident.row(head, token));
  dst[chunk] = __ldcg(src + chunk);
}

Status copy_resident(const storage::RowTableView& table, const ResidentRowsView& resident,
                     int64_t first, int64_t end, cudaStream_t stream) {
  if (end <= first) return ok_status();
  const int64_t chunks = (end - first) * (table.row_bytes / 16);
  const dim3 grid(static_cast<unsigned>((chunks + kCopyThreads - 1) / kCopyThreads),
                  static_cast<unsigned>(table.kv_heads));
  copy_resident_kernel<<<grid, kCopyThreads, 0, stream>>>(table, resident, first, end - first);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

// copy_resident_kernel at a device-side first token: of tokens [first,
// first + n), those the layer holds resident once it has first + n tokens.
__global__ void __launch_bounds__(kCopyThreads)
    copy_resident_at_kernel(storage::RowTableView table, ResidentRowsView resident,
                            const int64_t* first_position, int64_t n, int64_t max_tokens) {
  const int head = blockIdx.y;
  const int64_t first = *first_position;
  const int64_t end = min(first + n, max_tokens);
  const int64_t chunks_per_row = table.row_bytes / 16;
  const int64_t c = int64_t{blockIdx.x} * kCopyThreads + threadIdx.x;
  const int64_t token = first + c / chunks_per_row;
  if (token >= end || !resident.shape.holds(token, end)) return;
  const int64_t chunk = c % chunks_per_row;
  const auto* src = reinterpret_cast<const uint4*>(table.row(head, token));
  auto* dst = reinterpret_cast<uint4*>(resident.row(head, token));
  dst[chunk] = __ldcg(src + chunk);
}

}  // namespace

Result<ResidentRowsCuda> ResidentRowsCuda::create(int kv_heads, int64_t row_bytes,
                                                  const ResidentShape& shape,
                                                  storage::MemoryBudget* budget) {
  if (kv_heads < 1 || row_bytes < 16 || row_bytes % 16 != 0 || shape.sink_slots < 0 ||
      shape.window_slots < 0) {
    return Status::invalid_argument(
        "resident rows: need kv_heads >= 1, rows of a multiple of 16 bytes and non-negative "
        "slot counts, got kv_heads " +
        std::to_string(kv_heads) + ", row_bytes " + std::to_string(row_bytes) + ", sink " +
        std::to_string(shape.sink_slots) + ", window " + std::to_string(shape.window_slots));
  }
  ResidentRowsCuda r;
  r.shape_ = shape;
  r.kv_heads_ = kv_heads;
  r.row_bytes_ = row_bytes;
  const int64_t bytes = ResidentRowsView::bytes(kv_heads, row_bytes, shape);
  if (bytes == 0) return Result<ResidentRowsCuda>(std::move(r));
  PQKV_RETURN_IF_ERROR(budget->reserve(bytes, "the resident sink and window rows"));
  if (Status s = r.rows_.reserve(static_cast<size_t>(bytes)); !s.ok()) {
    budget->release(bytes);
    return s;
  }
  r.bytes_ = bytes;
  r.budget_ = budget;
  return Result<ResidentRowsCuda>(std::move(r));
}

ResidentRowsCuda::ResidentRowsCuda(ResidentRowsCuda&& other) noexcept
    : rows_(std::move(other.rows_)),
      shape_(other.shape_),
      kv_heads_(other.kv_heads_),
      row_bytes_(other.row_bytes_),
      bytes_(std::exchange(other.bytes_, 0)),
      budget_(std::exchange(other.budget_, nullptr)) {}

ResidentRowsCuda& ResidentRowsCuda::operator=(ResidentRowsCuda&& other) noexcept {
  if (this != &other) {
    release();
    rows_ = std::move(other.rows_);
    shape_ = other.shape_;
    kv_heads_ = other.kv_heads_;
    row_bytes_ = other.row_bytes_;
    bytes_ = std::exchange(other.bytes_, 0);
    budget_ = std::exchange(other.budget_, nullptr);
  }
  return *this;
}

ResidentRowsCuda::~ResidentRowsCuda() {
  release();
}

void ResidentRowsCuda::release() {
  if (budget_ != nullptr) budget_->release(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

Status ResidentRowsCuda::write(const storage::RowTableView& table, int64_t first, int64_t n,
                               cudaStream_t stream) {
  if (bytes_ == 0 || n <= 0) return ok_status();
  const int64_t end = first + n;
  const ResidentRowsView v = view();
  // The sink slots, then the tokens that stay in the ring once `end` are held
  // (an earlier token of this call would be overwritten within the call).
  PQKV_RETURN_IF_ERROR(copy_resident(table, v, first, std::min(end, shape_.sink_slots), stream));
  if (shape_.window_slots == 0) return ok_status();
  const int64_t ring_first = std::max({first, shape_.sink_slots, end - shape_.window_slots});
  return copy_resident(table, v, ring_first, end, stream);
}

Status ResidentRowsCuda::write_at_device_position(const storage::RowTableView& table,
                                                  const int64_t* first_position, int64_t n,
                                                  int64_t max_tokens, cudaStream_t stream) {
  if (bytes_ == 0 || n <= 0) return ok_status();
  if (first_position == nullptr) {
    return Status::invalid_argument("write_at_device_position needs a device position, got null");
  }
  const int64_t chunks = n * (table.row_bytes / 16);
  const dim3 grid(static_cast<unsigned>((chunks + kCopyThreads - 1) / kCopyThreads),
                  static_cast<unsigned>(table.kv_heads));
  copy_resident_at_kernel<<<grid, kCopyThreads, 0, stream>>>(table, view(), first_position, n,
                                                             max_tokens);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

ResidentRowsView ResidentRowsCuda::view() const {
  ResidentRowsView v;
  v.rows = rows_.as<std::byte>();
  v.shape = shape_;
  v.kv_heads = kv_heads_;
  v.row_bytes = row_bytes_;
  return v;
}

}  // namespace pqkv::tiering
