// The decode step's plan derived on the GPU: one tiny kernel reads a layer's
// device-side length and writes the DeviceStepPlan that the step's kernels
// read (attention/decode_plan.h). Nothing is copied to or from the host, so
// a captured step replays with the counts of each new length.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/decode_plan.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

// Writes to `plan` (device) what plan_decode_step(budget, *length,
// prefill_length) returns, *length (device int64) read when the kernel runs.
// Enqueued on `stream`; no allocation, no host synchronisation.
Status launch_device_plan(const BudgetPolicy& budget, int64_t prefill_length, const int64_t* length,
                          DeviceStepPlan* plan, cudaStream_t stream);

}  // namespace pqkv::attention::cuda
