#include "pqkv/tensor_view.h"

#include <string>

namespace pqkv {

TensorView::TensorView(void* data_, DType dtype_, Device device_,
                       std::initializer_list<int64_t> dims)
    : data(data_), dtype(dtype_), device(device_), rank(static_cast<int>(dims.size())) {
  assert(dims.size() <= kMaxRank);
  int i = 0;
  for (int64_t d : dims)
    shape[i++] = d;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i)
    n *= shape[i];
  return n;
}

std::string TensorView::shape_string() const {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string TensorView::describe() const {
  return std::string(dtype_name(dtype)) + " " + shape_string() + " on " + device.to_string();
}

Status TensorView::expect_shape(const char* what, std::initializer_list<int64_t> dims) const {
  // Sizes come from callers (the C ABI passes token counts straight through):
  // a negative or overflowing size is refused here, for every API.
  int64_t bytes = dtype_size(dtype);
  for (int i = 0; i < rank; ++i) {
    if (shape[i] < 0) {
      return Status::invalid_argument(std::string(what) + " has a negative size " +
                                      std::to_string(shape[i]) + " in dimension " +
                                      std::to_string(i) + " (shape " + shape_string() +
                                      "); sizes and token counts must be >= 0");
    }
    if (__builtin_mul_overflow(bytes, shape[i], &bytes)) {
      return Status::invalid_argument(std::string(what) + " of shape " + shape_string() +
                                      " has more bytes than fit in 64 bits");
    }
  }
  bool match = rank == static_cast<int>(dims.size());
  int i = 0;
  for (int64_t d : dims) {
    if (!match) break;
    if (d >= 0 && shape[i] != d) match = false;
    ++i;
  }
  if (match && data == nullptr && numel() > 0) {
    return Status::invalid_argument(std::string(what) + " has a null data pointer");
  }
  if (match) return ok_status();
  std::string want = "[";
  i = 0;
  for (int64_t d : dims) {
    if (i++) want += ", ";
    want += d >= 0 ? std::to_string(d) : std::string("*");
  }
  want += "]";
  return Status::invalid_argument(std::string(what) + " must have shape " + want + ", got " +
                                  shape_string());
}

}  // namespace pqkv
