// Non-owning views of caller memory: a pointer, a shape, a dtype and where the
// memory lives. Rows are dense and row-major; pqkv never frees a view's memory.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "pqkv/device.h"
#include "pqkv/dtype.h"
#include "pqkv/export.h"

namespace pqkv {

struct PQKV_API TensorView {
  static constexpr int kMaxRank = 4;

  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::cpu();
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};

  TensorView() = default;
  TensorView(void* data_, DType dtype_, Device device_, std::initializer_list<int64_t> dims);
  TensorView(const void* data_, DType dtype_, Device device_, std::initializer_list<int64_t> dims)
      : TensorView(const_cast<void*>(data_), dtype_, device_, dims) {}

  int64_t dim(int i) const { return shape[i]; }
  int64_t numel() const;
  int64_t bytes() const { return numel() * dtype_size(dtype); }
  std::string shape_string() const;  // "[4096, 8, 128]"
  std::string describe() const;      // "bf16 [4096, 8, 128] on cpu"

  // OK when the view has this rank and these dims (-1 matches any size);
  // otherwise an InvalidArgument that names `what` and both shapes. A negative
  // size, a byte count past int64, or a null pointer with elements is always
  // an InvalidArgument.
  Status expect_shape(const char* what, std::initializer_list<int64_t> dims) const;
};

// Views of host float buffers, the common case in tests and tools.
inline TensorView host_view(float* data, std::initializer_list<int64_t> dims) {
  return TensorView(data, DType::kF32, Device::cpu(), dims);
}
inline TensorView host_view(const float* data, std::initializer_list<int64_t> dims) {
  return TensorView(data, DType::kF32, Device::cpu(), dims);
}

}  // namespace pqkv
