// A refit of LayerIndexCuda being built (layer_index_cuda_refit.cu): the new
// codec and codes, built on the index's build stream, and the fp32 keys added
// while it is built, kept on the caller's stream.
#pragma once

#include "core/cuda_handles.h"
#include "index/cuda/layer_index_cuda.h"

namespace pqkv::index {

struct LayerIndexCuda::Refit {
  int64_t n = 0;          // tokens re-encoded: [0, n)
  int64_t fit_begin = 0;  // the fit's keys: [fit_begin, n)
  int64_t capacity = 0;   // the index's capacity when it started; codes and pending fit it
  cudaStream_t build = nullptr;

  // Built on `build` (allocated and freed there).
  gpu::DeviceArray<float> centroids;   // PQ
  gpu::DeviceArray<double> objective;  // PQ: [kv_head * m] over the fit keys
  gpu::DeviceArray<float> scale;       // scalar codes
  gpu::DeviceArray<float> offset;      // scalar codes
  gpu::DeviceArray<double> sums;       // the fit pass's sums, [2 * kv_heads]
  gpu::DeviceArray<uint8_t> codes;     // [kv_head][capacity][code_size]
  gpu::EventHandle started;            // timing events around the build
  gpu::EventHandle done;

  // Keys added while it is built, tokens [n, n + pending_tokens), fp32
  // [capacity - n][kv_heads][head_dim]: written on the callers' streams
  // (allocated on the first), freed on `build` once it has waited for
  // `pending_used`, recorded after each use.
  gpu::DeviceArray<float> pending;
  int64_t pending_tokens = 0;
  gpu::EventHandle pending_used;

  Refit() = default;
  Refit(const Refit&) = delete;
  Refit& operator=(const Refit&) = delete;
  // The frees run on `build` after the callers' last use of `pending` and
  // after the build itself (stream order); nothing waits on the host.
  ~Refit() {
    if (build != nullptr && pending_used != nullptr)
      static_cast<void>(cudaStreamWaitEvent(build, pending_used.get(), 0));
  }
};

}  // namespace pqkv::index
