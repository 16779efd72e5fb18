// Row-wise and element-wise kernels of the CUDA Llama forward pass. Activations are fp32; weight
// tables (embeddings) may be bf16, fp16 or fp32. Every launcher enqueues on `stream` and returns
// the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::model::cuda {

// out[t, :] = table[ids[t], :] as fp32; table [vocab, hidden] in `dtype`.
Status embed(const int32_t* ids, int64_t tokens, const void* table, DType dtype, int hidden,
             float* out, cudaStream_t stream);

// y[t, :] = x[t, :] / rms(x[t, :]) * weight (fp32 weight [n]).
Status rms_norm(const float* x, int64_t tokens, int n, const float* weight, float eps, float* y,
                cudaStream_t stream);

// Rotates x [tokens, heads, head_dim] in place with cos/sin [tokens, head_dim/2].
Status rope(float* x, int64_t tokens, int heads, int head_dim, const float* cos, const float* sin,
            cudaStream_t stream);

// y[t, i] += bias[i] for y [tokens, n].
Status add_bias(float* y, int64_t tokens, int n, const float* bias, cudaStream_t stream);

// x[i] += y[i].
Status add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream);

// gate[i] = silu(gate[i]) * up[i].
Status swiglu(float* gate, const float* up, int64_t n, cudaStream_t stream);

// out[i] = x[i] in `dtype` (to feed fp32 activations to a bf16/fp16 GEMM).
Status convert_from_f32(const float* x, int64_t n, void* out, DType dtype, cudaStream_t stream);

}  // namespace pqkv::model::cuda
