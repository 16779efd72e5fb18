#include "pqkv/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>

namespace pqkv {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kF32:
      return "fp32";
  }
  return "?";
}

Result<DType> parse_dtype(std::string_view name) {
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp16" || name == "f16" || name == "float16") return DType::kF16;
  if (name == "fp32" || name == "f32" || name == "float32") return DType::kF32;
  return Status::invalid_argument("unknown dtype '" + std::string(name) +
                                  "': use bf16, fp16 or fp32");
}

uint16_t float_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to Inf
  if (abs < 0x38800000u) {
    // Subnormal half (or zero): scale into the 10-bit mantissa, rounding to nearest even.
    const float mag = std::fabs(f) * 16777216.0f;  // 2^24
    const auto m = static_cast<uint32_t>(std::nearbyint(mag));
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t e = ((abs >> 23) - 112u) << 10;
  uint32_t m = (abs >> 13) & 0x3ffu;
  uint32_t h = e | m;
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -v : v;
  }
  if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

bool storable_as(float v, DType t) {
  if (!std::isfinite(v)) return false;
  switch (t) {
    case DType::kF32:
      return true;
    case DType::kBF16:
      return std::isfinite(bf16_to_float(float_to_bf16(v)));
    case DType::kF16:
      return std::isfinite(f16_to_float(float_to_f16(v)));
  }
  return false;
}

int64_t find_unstorable(const void* src, DType src_type, int64_t n, DType dst_type) {
  for (int64_t i = 0; i < n; ++i) {
    if (!storable_as(load_as_float(src, src_type, i), dst_type)) return i;
  }
  return -1;
}

void convert_to_float(const void* src, DType src_type, int64_t n, float* dst) {
  if (src_type == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  const auto* s = static_cast<const uint16_t*>(src);
  if (src_type == DType::kBF16) {
    for (int64_t i = 0; i < n; ++i)
      dst[i] = bf16_to_float(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i)
      dst[i] = f16_to_float(s[i]);
  }
}

void convert_from_float(const float* src, int64_t n, void* dst, DType dst_type) {
  if (dst_type == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  auto* d = static_cast<uint16_t*>(dst);
  if (dst_type == DType::kBF16) {
    for (int64_t i = 0; i < n; ++i)
      d[i] = float_to_bf16(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i)
      d[i] = float_to_f16(src[i]);
  }
}

void convert_elements(const void* src, DType src_type, int64_t src_offset, int64_t n, void* dst,
                      DType dst_type) {
  const auto* s = static_cast<const std::byte*>(src) + src_offset * dtype_size(src_type);
  if (src_type == dst_type) {
    std::memcpy(dst, s, static_cast<size_t>(n) * dtype_size(src_type));
    return;
  }
  if (dst_type == DType::kF32) {
    convert_to_float(s, src_type, n, static_cast<float*>(dst));
    return;
  }
  if (src_type == DType::kF32) {
    convert_from_float(reinterpret_cast<const float*>(s), n, dst, dst_type);
    return;
  }
  constexpr int64_t kChunk = 256;
  float tmp[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t len = std::min(kChunk, n - i);
    convert_to_float(s + i * dtype_size(src_type), src_type, len, tmp);
    convert_from_float(tmp, len, static_cast<std::byte*>(dst) + i * dtype_size(dst_type), dst_type);
  }
}

}  // namespace pqkv
