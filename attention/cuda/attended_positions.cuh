// The attended positions of a decode step, assembled on the GPU from the plan
// and the index's picks, so the plan needs no host round trip.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/decode_plan.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

// out [kv_heads, plan.tokens_per_head()] (device): per KV head the sink, then
// the index's picks `selected` [kv_heads, plan.search_k] (device; ignored
// without a search) or the whole middle, then the window, in the order
// list_attended_tokens writes on the host.
Status launch_attended_positions(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                                 int32_t* out, cudaStream_t stream);

// The same from a plan in device memory (read when the kernel runs), for
// steps replayed from a graph: out [kv_heads, plan->tokens_per_head],
// `selected` [kv_heads, plan->search.k]. The launch is sized for
// `max_per_head` positions per KV head, at least plan->tokens_per_head.
Status launch_attended_positions(const DeviceStepPlan* plan, int64_t max_per_head, int kv_heads,
                                 const int32_t* selected, int32_t* out, cudaStream_t stream);

}  // namespace pqkv::attention::cuda
