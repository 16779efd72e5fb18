// Element types of keys, values and queries, and host-side conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include "pqkv/export.h"
#include "pqkv/status.h"

namespace pqkv {

enum class DType : uint8_t { kBF16 = 0, kF16 = 1, kF32 = 2 };

constexpr int dtype_size(DType t) {
  return t == DType::kF32 ? 4 : 2;
}
PQKV_API const char* dtype_name(DType t);
PQKV_API Result<DType> parse_dtype(std::string_view name);

// bf16 is the top half of an IEEE float; rounding is to nearest even, NaN kept quiet.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
PQKV_API uint16_t float_to_f16(float f);
PQKV_API float f16_to_float(uint16_t h);

// Reads element i of a buffer of type t as float.
inline float load_as_float(const void* data, DType t, int64_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kF16:
      return f16_to_float(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}
inline void store_from_float(void* data, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(data)[i] = v;
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(data)[i] = float_to_bf16(v);
      return;
    case DType::kF16:
      static_cast<uint16_t*>(data)[i] = float_to_f16(v);
      return;
  }
}
// True when `v` stays finite once stored as `t`: false for NaN and Inf, and for
// finite values that round to Inf (above 65504 in fp16, near FLT_MAX in bf16).
PQKV_API bool storable_as(float v, DType t);
// The index of the first of n elements of `src` (host memory, type src_type)
// that is not storable_as(dst_type); -1 when every element is.
PQKV_API int64_t find_unstorable(const void* src, DType src_type, int64_t n, DType dst_type);

// Converts n elements; src and dst are host memory.
PQKV_API void convert_to_float(const void* src, DType src_type, int64_t n, float* dst);
PQKV_API void convert_from_float(const float* src, int64_t n, void* dst, DType dst_type);
// Copies n elements starting at element `src_offset` of src into dst, converting
// the type; a plain copy when the types match.
PQKV_API void convert_elements(const void* src, DType src_type, int64_t src_offset, int64_t n,
                               void* dst, DType dst_type);

}  // namespace pqkv
