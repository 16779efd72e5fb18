// The keys a codec can fit in fp32, shared by the CPU codecs (which refuse
// others in train) and the CUDA index (which records them on the device and
// answers in LayerIndex::fit_status), so both backends draw the same line and
// say the same thing.
#pragma once

#include "pqkv/status.h"

namespace pqkv::index {

// PQ fits and encodes by squared distances in fp32: a KV head's largest
// |key| past kPqLargestKey overflows them, and keys all below kPqSmallestKey
// (but not zero) lose them to underflow; either way every key gets the same
// code and the selection is arbitrary.
inline constexpr float kPqLargestKey = 0x1p60f;
inline constexpr float kPqSmallestKey = 0x1p-50f;

// InvalidArgument for the keys of `kv_head`, whose largest |key| is `largest`.
Status pq_key_range_error(int kv_head, float largest);

// InvalidArgument for channel `channel` of `kv_head` spanning lo..hi, a range
// past fp32's, under int`bits` scalar quantization.
Status scalar_key_range_error(int bits, int kv_head, int channel, float lo, float hi);

}  // namespace pqkv::index
