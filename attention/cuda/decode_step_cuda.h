// The decode step on the GPU (see attention/decode_step.h): the index's
// search, the attended positions assembled on the device, the fetch of each
// range of the tiers' FetchPlan (today one gather from the pinned DRAM
// blocks) and split-K attention, all enqueued on the caller's stream with no
// host synchronisation and no allocation once the workspace is sized.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/decode_step.h"
#include "core/cuda_handles.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

// Device scratch of the CUDA step, owned by whoever drives the steps of one
// sequence and reused across steps and layers (steps of one workspace must
// be ordered on one stream).
struct DecodeStepCudaWorkspace {
  gpu::DeviceBuffer selected;        // int32 [kv_heads, plan.search_k]
  gpu::DeviceBuffer positions;       // int32 [kv_heads, plan.tokens_per_head()]
  gpu::DeviceBuffer rows;            // [kv_heads, plan.tokens_per_head(), row_bytes]
  gpu::DeviceBuffer attention;       // decode_attention_workspace_bytes
  gpu::EventHandle stage_events[4];  // timing of the stages when a trace is asked for

  // Creates the timing events (on the current device).
  Status init();
  // Grows the buffers for `plan` with queries and outputs of the given
  // dtypes (fp32 or bf16). Growing frees and allocates device memory (a
  // device synchronisation): size for the largest step first (reserve).
  Status reserve(const ModelSpec& spec, const DecodePlan& plan, DType query_dtype, DType out_dtype);
};

// Plan: the index's search and the attended positions into ws.positions
// [kv_heads, plan.tokens_per_head()] (device). `queries` device memory
// [q_heads, head_dim], fp32 or bf16. ws must be reserved for the plan.
Status plan_decode_step_cuda(const DecodeStepInputs& in, const void* queries, DType query_dtype,
                             DecodeStepCudaWorkspace& ws, cudaStream_t stream);

// The whole step: plan, fetch, attend. `queries`, `out` device memory
// [q_heads, head_dim] of their dtypes (fp32 or bf16). `trace` may be null;
// filling it synchronises the stream. Unimplemented for a fetch range the
// GPU step cannot read yet.
Status run_decode_step_cuda(const DecodeStepInputs& in, const void* queries, DType query_dtype,
                            void* out, DType out_dtype, DecodeStepCudaWorkspace& ws,
                            cudaStream_t stream, AttendTrace* trace);

}  // namespace pqkv::attention::cuda
