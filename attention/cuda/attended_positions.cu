#include "attention/cuda/attended_positions.cuh"

#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

constexpr int kThreads = 256;

struct PositionsLayout {
  int64_t sink;
  int64_t picked;        // search_k, or the middle size when it is attended in full
  int64_t picked_first;  // first middle position when in full; -1 when from `selected`
  int64_t window;
  int64_t window_first;
  int64_t search_k;
};

__device__ PositionsLayout layout_of(const DeviceStepPlan& p) {
  PositionsLayout l;
  l.sink = p.sink;
  l.picked = p.picked;
  l.picked_first = p.picked_first;
  l.window = p.window;
  l.window_first = p.search.end;
  l.search_k = p.search.k;
  return l;
}

// `device_plan`, when set, replaces `l` with the plan read on the device.
__global__ void attended_positions_kernel(PositionsLayout l, const DeviceStepPlan* device_plan,
                                          const int32_t* selected, int32_t* out) {
  if (device_plan != nullptr) l = layout_of(*device_plan);
  const int head = blockIdx.y;
  const int64_t per_head = l.sink + l.picked + l.window;
  int32_t* dst = out + head * per_head;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < per_head;
       i += int64_t{gridDim.x} * blockDim.x) {
    int64_t v;
    if (i < l.sink) {
      v = i;
    } else if (i < l.sink + l.picked) {
      const int64_t j = i - l.sink;
      v = l.picked_first >= 0 ? l.picked_first + j : selected[head * l.search_k + j];
    } else {
      v = l.window_first + (i - l.sink - l.picked);
    }
    dst[i] = static_cast<int32_t>(v);
  }
}

}  // namespace

Status launch_attended_positions(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                                 int32_t* out, cudaStream_t stream) {
  PositionsLayout l;
  l.sink = plan.counts.sink;
  l.picked = plan.middle_in_full ? plan.middle_size() : plan.search_k;
  l.picked_first = plan.middle_in_full ? plan.search_begin : -1;
  l.window = plan.counts.window;
  l.window_first = plan.search_end;
  l.search_k = plan.search_k;
  const int64_t per_head = plan.tokens_per_head();
  if (per_head == 0) return ok_status();
  const int64_t blocks = std::min<int64_t>((per_head + kThreads - 1) / kThreads, 1024);
  attended_positions_kernel<<<dim3(static_cast<unsigned>(blocks), kv_heads), kThreads, 0, stream>>>(
      l, nullptr, selected, out);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_attended_positions(const DeviceStepPlan* plan, int64_t max_per_head, int kv_heads,
                                 const int32_t* selected, int32_t* out, cudaStream_t stream) {
  if (max_per_head == 0) return ok_status();
  // The kernel strides over the positions, so any grid covers them.
  const int64_t blocks = std::min<int64_t>((max_per_head + kThreads - 1) / kThreads, 1024);
  attended_positions_kernel<<<dim3(static_cast<unsigned>(blocks), kv_heads), kThreads, 0, stream>>>(
      PositionsLayout{}, plan, selected, out);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::attention::cuda
