// Element conversions in device code, the GPU side of pqkv/dtype.h: by static
// type (to_float, from_float<T>) and by run-time DType (load_as_float,
// store_from_float). Rounding is to nearest even, as on the host.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pqkv/dtype.h"

namespace pqkv::gpu {

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Element i of `data`, whose type is known only at run time.
__device__ __forceinline__ float load_as_float(const void* data, DType t, int64_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kBF16:
      return to_float(static_cast<const __nv_bfloat16*>(data)[i]);
    case DType::kF16:
      return to_float(static_cast<const __half*>(data)[i]);
  }
  return 0.0f;
}

__device__ __forceinline__ void store_from_float(void* data, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(data)[i] = v;
      return;
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(data)[i] = from_float<__nv_bfloat16>(v);
      return;
    case DType::kF16:
      static_cast<__half*>(data)[i] = from_float<__half>(v);
      return;
  }
}

}  // namespace pqkv::gpu
