#include "storage/cuda/row_transfer_cuda.h"

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"

namespace pqkv::storage {
namespace {

// One block per (token, head); threads stride over the head's dims.
// Whether tokens [*length, *length + n) fit in max_tokens; read by every
// block of the write before the advance kernel runs.
__device__ __forceinline__ bool fits(const int64_t* length, int64_t n, int64_t max_tokens) {
  return *length + n <= max_tokens;
}

// `length`, when set, is added to first_token and bounds the write by max_tokens.
template <class In, class Row>
__global__ void write_rows_kernel(RowTableView t, const In* keys, const In* values,
                                  int64_t first_token, const int64_t* length, int64_t n,
                                  int64_t max_tokens) {
  if (length != nullptr) {
    if (!fits(length, n, max_tokens)) return;
    first_token += *length;
  }
  const int64_t i = blockIdx.x;
  const int head = blockIdx.y;
  Row* row = reinterpret_cast<Row*>(t.row(head, first_token + i));
  const int64_t src = (i * t.kv_heads + head) * t.head_dim;
  for (int c = threadIdx.x; c < t.head_dim; c += blockDim.x) {
    row[c] = gpu::from_float<Row>(gpu::to_float(keys[src + c]));
    row[t.head_dim + c] = gpu::from_float<Row>(gpu::to_float(values[src + c]));
  }
}

// One thread: the append's length advance (or its overflow flag).
__global__ void advance_length_kernel(int64_t* length, int64_t n, int64_t max_tokens,
                                      int32_t* overflow) {
  if (overflow != nullptr && !fits(length, n, max_tokens)) {
    *overflow = 1;
    return;
  }
  *length += n;
}

template <class Row>
__global__ void read_keys_kernel(RowTableView t, int64_t begin, Row* out) {
  const int64_t i = blockIdx.x;
  const int head = blockIdx.y;
  const Row* row = reinterpret_cast<const Row*>(t.row(head, begin + i));
  Row* dst = out + (i * t.kv_heads + head) * t.head_dim;
  for (int c = threadIdx.x; c < t.head_dim; c += blockDim.x)
    dst[c] = row[c];
}

template <class Row>
Status launch_write(const RowTableView& t, const void* keys, const void* values, DType in,
                    int64_t first, int64_t n, const int64_t* length, int64_t max_tokens,
                    cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(t.kv_heads));
  const int threads = t.head_dim < 128 ? t.head_dim : 128;
  switch (in) {
    case DType::kF32:
      write_rows_kernel<float, Row><<<grid, threads, 0, stream>>>(
          t, static_cast<const float*>(keys), static_cast<const float*>(values), first, length, n,
          max_tokens);
      break;
    case DType::kBF16:
      write_rows_kernel<__nv_bfloat16, Row><<<grid, threads, 0, stream>>>(
          t, static_cast<const __nv_bfloat16*>(keys), static_cast<const __nv_bfloat16*>(values),
          first, length, n, max_tokens);
      break;
    case DType::kF16:
      write_rows_kernel<__half, Row><<<grid, threads, 0, stream>>>(
          t, static_cast<const __half*>(keys), static_cast<const __half*>(values), first, length, n,
          max_tokens);
      break;
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace

Status write_rows_cuda(const RowTableView& table, const void* keys, const void* values,
                       DType in_dtype, int64_t first_token, int64_t n, cudaStream_t stream) {
  if (n == 0) return ok_status();
  switch (table.row_dtype) {
    case DType::kF32:
      return launch_write<float>(table, keys, values, in_dtype, first_token, n, nullptr, 0, stream);
    case DType::kBF16:
      return launch_write<__nv_bfloat16>(table, keys, values, in_dtype, first_token, n, nullptr, 0,
                                         stream);
    case DType::kF16:
      return launch_write<__half>(table, keys, values, in_dtype, first_token, n, nullptr, 0,
                                  stream);
  }
  return Status::internal("unknown row dtype");
}

Status write_rows_at_length_cuda(const RowTableView& table, const void* keys, const void* values,
                                 DType in_dtype, int64_t n, const int64_t* length,
                                 int64_t max_tokens, cudaStream_t stream) {
  if (n == 0) return ok_status();
  switch (table.row_dtype) {
    case DType::kF32:
      return launch_write<float>(table, keys, values, in_dtype, 0, n, length, max_tokens, stream);
    case DType::kBF16:
      return launch_write<__nv_bfloat16>(table, keys, values, in_dtype, 0, n, length, max_tokens,
                                         stream);
    case DType::kF16:
      return launch_write<__half>(table, keys, values, in_dtype, 0, n, length, max_tokens, stream);
  }
  return Status::internal("unknown row dtype");
}

Status advance_length_cuda(int64_t* length, int64_t n, int64_t max_tokens, int32_t* overflow,
                           cudaStream_t stream) {
  advance_length_kernel<<<1, 1, 0, stream>>>(length, n, max_tokens, overflow);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status read_keys_cuda(const RowTableView& table, int64_t begin, int64_t end, void* out,
                      cudaStream_t stream) {
  if (end <= begin) return ok_status();
  const dim3 grid(static_cast<unsigned>(end - begin), static_cast<unsigned>(table.kv_heads));
  const int threads = table.head_dim < 128 ? table.head_dim : 128;
  switch (table.row_dtype) {
    case DType::kF32:
      read_keys_kernel<<<grid, threads, 0, stream>>>(table, begin, static_cast<float*>(out));
      break;
    case DType::kBF16:
      read_keys_kernel<<<grid, threads, 0, stream>>>(table, begin,
                                                     static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kF16:
      read_keys_kernel<<<grid, threads, 0, stream>>>(table, begin, static_cast<__half*>(out));
      break;
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::storage
