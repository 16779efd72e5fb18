// A check, on the GPU, that keys and values headed for the row store are
// finite and stay finite in the row dtype: the device-side twin of the host
// check the engine runs on host input (pqkv::find_unstorable, the CPU
// reference). It writes what it finds into a report in pinned, mapped host
// memory and never synchronises; the host reads the report at its next
// host-visible point (Sequence::check_health).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::storage {

// The first bad element any check found. Zero-initialised by the owner; once
// `found` is set, later checks leave the report as it is.
struct StorableReport {
  int32_t found = 0;  // 1 once a bad element was seen
  int32_t layer = 0;
  int64_t token = 0;  // position in the layer
  int32_t head = 0;
  int32_t dim = 0;
  int32_t is_value = 0;  // 0: a key, 1: a value
  float value = 0;       // the input element, before conversion
};

struct StorableCheckArgs {
  const void* keys = nullptr;    // [n, kv_heads, head_dim], device-readable
  const void* values = nullptr;  // same shape
  DType in_dtype = DType::kF32;
  DType row_dtype = DType::kBF16;  // the dtype the rows are stored in
  int64_t n = 0;                   // tokens
  int kv_heads = 0;
  int head_dim = 0;
  int layer = 0;                     // recorded in the report
  int64_t first_token = 0;           // position of token 0 in the layer, for the report
  StorableReport* report = nullptr;  // device-writable (pinned, mapped host memory)
};

// Enqueues the check on `stream`. An element is bad when it is NaN or Inf, or
// becomes Inf once converted to row_dtype (above 65504 for fp16). Returns
// only launch errors; what it finds appears in *report once `stream` has
// passed it.
Status check_storable_cuda(const StorableCheckArgs& args, cudaStream_t stream);

}  // namespace pqkv::storage
