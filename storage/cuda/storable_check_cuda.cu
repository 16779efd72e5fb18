#include "storage/cuda/storable_check_cuda.h"

#include <algorithm>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"

namespace pqkv::storage {
namespace {

// Finite: the exponent bits are not all ones (Inf and NaN have them all set).
__device__ __forceinline__ bool finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

template <class Row>
__device__ __forceinline__ bool storable(float v) {
  return finite(v) && finite(gpu::to_float(gpu::from_float<Row>(v)));
}

__device__ void record(StorableReport* report, const StorableCheckArgs& a, int64_t i, int is_value,
                       float v) {
  // The first thread to find a bad element owns the report; the others leave it.
  if (atomicCAS(&report->found, 0, 1) != 0) return;
  const int64_t per_token = int64_t{a.kv_heads} * a.head_dim;
  report->layer = a.layer;
  report->token = a.first_token + i / per_token;
  report->head = static_cast<int32_t>((i / a.head_dim) % a.kv_heads);
  report->dim = static_cast<int32_t>(i % a.head_dim);
  report->is_value = is_value;
  report->value = v;
  __threadfence_system();
}

// Grid-stride over every element of keys and values.
template <class In, class Row>
__global__ void check_storable_kernel(StorableCheckArgs a) {
  const int64_t total = a.n * a.kv_heads * a.head_dim;
  const auto* keys = static_cast<const In*>(a.keys);
  const auto* values = static_cast<const In*>(a.values);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float k = gpu::to_float(keys[i]);
    const float v = gpu::to_float(values[i]);
    if (!storable<Row>(k)) record(a.report, a, i, 0, k);
    if (!storable<Row>(v)) record(a.report, a, i, 1, v);
  }
}

template <class Row>
Status launch(const StorableCheckArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = a.n * a.kv_heads * a.head_dim;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1024));
  switch (a.in_dtype) {
    case DType::kF32:
      check_storable_kernel<float, Row><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case DType::kBF16:
      check_storable_kernel<__nv_bfloat16, Row><<<blocks, kThreads, 0, stream>>>(a);
      break;
    case DType::kF16:
      check_storable_kernel<__half, Row><<<blocks, kThreads, 0, stream>>>(a);
      break;
  }
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace

Status check_storable_cuda(const StorableCheckArgs& args, cudaStream_t stream) {
  if (args.n <= 0) return ok_status();
  switch (args.row_dtype) {
    case DType::kF32:
      return launch<float>(args, stream);
    case DType::kBF16:
      return launch<__nv_bfloat16>(args, stream);
    case DType::kF16:
      return launch<__half>(args, stream);
  }
  return Status::internal("unknown row dtype");
}

}  // namespace pqkv::storage
