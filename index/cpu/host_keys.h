// Keys [n, kv_heads, head_dim] in host memory, of any key dtype, as the CPU
// index reads them: validated once, then gathered per (KV head, dims) as fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "pqkv/dtype.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"

namespace pqkv::index::cpu {

struct HostKeys {
  const void* data = nullptr;  // host memory, [n][kv_heads][head_dim] of `dtype`
  DType dtype = DType::kF32;
  int64_t n = 0;
  int kv_heads = 0;
  int head_dim = 0;

  // Checks that `keys` lives on the host with shape [*, kv_heads, head_dim]
  // and that every element is finite. `what` names the argument in errors.
  static Result<HostKeys> from_view(const TensorView& keys, int kv_heads, int head_dim,
                                    const char* what);

  int64_t row_elements() const { return int64_t{kv_heads} * head_dim; }
  // Copies dims [dim0, dim0 + dims) of KV head `head` of tokens [t0, t1) to
  // out[(t - t0) * dims + i] as fp32.
  void gather(int head, int dim0, int dims, int64_t t0, int64_t t1, float* out) const;
  // Appends every key to `out` as fp32, [n][kv_heads][head_dim].
  void append_to(std::vector<float>* out) const;
};

}  // namespace pqkv::index::cpu
