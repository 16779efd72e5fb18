// The decode step on the GPU (see attention/decode_step.h): the index's
// search, the attended positions assembled on the device, the fetch of each
// range of the tiers' FetchPlan (one gather from the pinned DRAM blocks, the
// resident rows and the block cache) and split-K attention, all enqueued on
// the caller's stream with no host synchronisation and no allocation once
// the workspace is sized.
//
// The exception is a step of a layer with rows spilled to disk
// (DecodeStepInputs::spilled): the SSD tier needs the selected positions on
// the host, so that step copies them back and synchronises its stream, reads
// the spilled rows among them through io_uring (tiering/ssd_tier.h), copies
// them into pinned, mapped staging and lets the gather read them from there
// (GatherTieredRowsArgs::staged). Such a step cannot be captured in a CUDA
// graph; it refuses a capturing stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention/decode_step.h"
#include "core/cuda_handles.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"
#include "tiering/ssd_tier.h"

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
  // The SSD tier (steps with spilled rows only; empty otherwise): the
  // positions copied back, the host-side read scratch, the staged rows
  // [spilled entries, row_bytes] and their pointers per entry (pinned,
  // mapped), the pointers' device copy, and an event after the gather that
  // read them (the next spilled step waits for it before reusing them).
  gpu::PinnedBuffer host_positions;  // int32 [kv_heads, plan.tokens_per_head()]
  tiering::SsdTierWorkspace ssd;
  gpu::PinnedBuffer staged_rows;
  gpu::PinnedBuffer staged_pointers;  // const std::byte* [kv_heads, tokens_per_head]
  gpu::DeviceBuffer staged;           // the same, device memory
  gpu::EventHandle staged_read;
  // When set (owned by the caller), recorded on the step's stream right after
  // the gather: work forked from it on another stream (the hot rows' policy)
  // reads the gathered rows and positions while the attention runs.
  cudaEvent_t after_gather = nullptr;

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
// filling it synchronises the stream (its gather_us leaves out the SSD
// reads, in trace->fetch.ssd_us). Unimplemented for a fetch range the
// GPU step cannot read yet. With in.spilled (rows of the layer on disk) the
// step synchronises `stream` once its positions are planned and returns
// after enqueueing the rest: FailedPrecondition when `stream` is capturing
// a graph, the errors of tiering::fetch_spilled_rows (Corruption naming the
// file and page, IoError), ResourceExhausted when staging cannot grow.
Status run_decode_step_cuda(const DecodeStepInputs& in, const void* queries, DType query_dtype,
                            void* out, DType out_dtype, DecodeStepCudaWorkspace& ws,
                            cudaStream_t stream, AttendTrace* trace);

}  // namespace pqkv::attention::cuda
