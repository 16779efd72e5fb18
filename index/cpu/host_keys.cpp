#include "index/cpu/host_keys.h"

#include <cmath>
#include <cstring>
#include <string>

namespace pqkv::index::cpu {

Result<HostKeys> HostKeys::from_view(const TensorView& keys, int kv_heads, int head_dim,
                                     const char* what) {
  if (!keys.device.is_cpu()) {
    return Status::invalid_argument(std::string(what) +
                                    " must be in host memory for the CPU index, got " +
                                    keys.describe() + "; copy them to the host first");
  }
  PQKV_RETURN_IF_ERROR(keys.expect_shape(what, {-1, kv_heads, head_dim}));
  HostKeys out{keys.data, keys.dtype, keys.dim(0), kv_heads, head_dim};
  std::vector<float> row(static_cast<size_t>(out.row_elements()));
  for (int64_t t = 0; t < out.n; ++t) {
    const auto* src =
        static_cast<const std::byte*>(out.data) + t * out.row_elements() * dtype_size(out.dtype);
    convert_to_float(src, out.dtype, out.row_elements(), row.data());
    for (int64_t i = 0; i < out.row_elements(); ++i) {
      if (!std::isfinite(row[i])) {
        return Status::invalid_argument(std::string(what) + " hold NaN or Inf at token " +
                                        std::to_string(t) + ", KV head " +
                                        std::to_string(i / head_dim) + ", dim " +
                                        std::to_string(i % head_dim) + "; pass finite keys");
      }
    }
  }
  return out;
}

void HostKeys::gather(int head, int dim0, int dims, int64_t t0, int64_t t1, float* out) const {
  const int elem = dtype_size(dtype);
  const auto* base = static_cast<const std::byte*>(data);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t offset = t * row_elements() + int64_t{head} * head_dim + dim0;
    convert_to_float(base + offset * elem, dtype, dims, out + (t - t0) * dims);
  }
}

void HostKeys::append_to(std::vector<float>* out) const {
  const size_t old_size = out->size();
  out->resize(old_size + static_cast<size_t>(n * row_elements()));
  convert_to_float(data, dtype, n * row_elements(), out->data() + old_size);
}

}  // namespace pqkv::index::cpu
