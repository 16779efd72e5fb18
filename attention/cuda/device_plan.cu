#include "attention/cuda/device_plan.cuh"

#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

struct Count {
  int64_t tokens;
  double ratio;
};

struct BudgetArgs {
  Count sink;
  Count window;
  Count top_k;
  bool fixed_at_prefill;
  int64_t prefill_length;
};

// TokenCount::resolve, in the same double arithmetic.
__device__ int64_t resolve(Count c, int64_t length) {
  const auto from_ratio = static_cast<int64_t>(ceil(c.ratio * static_cast<double>(length)));
  return max(c.tokens, from_ratio);
}

__device__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// BudgetPolicy::resolve and plan_decode_step, step for step.
__global__ void device_plan_kernel(BudgetArgs b, const int64_t* length_in, DeviceStepPlan* out) {
  const int64_t length = *length_in;
  DeviceStepPlan p;
  p.length = length;
  int64_t top_k = 0;
  if (length > 0) {
    p.sink = min(resolve(b.sink, length), length);
    int64_t window_n = 0;
    int64_t topk_n = 0;
    if (b.fixed_at_prefill) {
      const int64_t base = max(int64_t{0}, b.prefill_length - min(b.sink.tokens, b.prefill_length));
      window_n = resolve(b.window, base);
      topk_n = resolve(b.top_k, base);
    } else {
      window_n = resolve(b.window, length);
      topk_n = resolve(b.top_k, length);
    }
    p.window = clamp64(window_n, min(int64_t{1}, length - p.sink), length - p.sink);
    top_k = clamp64(topk_n, 0, length - p.sink - p.window);
  }
  p.search.begin = p.sink;
  p.search.end = length - p.window;
  const int64_t middle = p.search.end - p.search.begin;
  if (top_k >= middle) {
    p.search.k = 0;
    p.picked = middle;
    p.picked_first = p.search.begin;
  } else {
    p.search.k = top_k;
    p.picked = top_k;
    p.picked_first = -1;
  }
  p.tokens_per_head = p.sink + p.window + p.picked;
  *out = p;
}

}  // namespace

Status launch_device_plan(const BudgetPolicy& budget, int64_t prefill_length, const int64_t* length,
                          DeviceStepPlan* plan, cudaStream_t stream) {
  BudgetArgs b;
  b.sink = {budget.sink.tokens, budget.sink.ratio};
  b.window = {budget.window.tokens, budget.window.ratio};
  b.top_k = {budget.top_k.tokens, budget.top_k.ratio};
  b.fixed_at_prefill = budget.fixed_at_prefill;
  b.prefill_length = prefill_length;
  device_plan_kernel<<<1, 1, 0, stream>>>(b, length, plan);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::attention::cuda
