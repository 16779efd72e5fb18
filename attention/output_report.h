// What a CUDA decode step reports when its attention output is not finite:
// scores q . k / sqrt(head_dim) or sums of weighted values past fp32's range,
// or an output past its dtype's (bf16). The kernels cannot return a Status,
// so they record the first such element here, in pinned host memory mapped
// into the device, and the engine reads it once the step's stream is done.
#pragma once

#include <cstdint>

namespace pqkv::attention {

struct OutputReport {
  int32_t found = 0;  // 0 until an element is recorded; then 1 and the rest is set
  int32_t layer = 0;
  int32_t q_head = 0;
  int32_t dim = 0;
  float value = 0.0f;  // the element as computed (NaN or Inf)
};

}  // namespace pqkv::attention
