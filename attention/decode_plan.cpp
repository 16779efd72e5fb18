#include "attention/decode_plan.h"

#include <algorithm>
#include <numeric>

namespace pqkv::attention {

DecodePlan plan_decode_step(const BudgetPolicy& budget, int64_t length, int64_t prefill_length) {
  DecodePlan plan;
  plan.length = length;
  plan.prefill_length = prefill_length;
  plan.counts = budget.resolve(length, prefill_length);
  plan.search_begin = plan.counts.sink;
  plan.search_end = length - plan.counts.window;
  if (plan.counts.top_k >= plan.middle_size()) {
    plan.middle_in_full = true;
    plan.counts.top_k = plan.middle_size();
  } else {
    plan.search_k = plan.counts.top_k;
  }
  return plan;
}

void list_attended_tokens(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                          std::vector<int32_t>* out) {
  const int64_t per_head = plan.tokens_per_head();
  out->resize(static_cast<size_t>(per_head) * kv_heads);
  for (int h = 0; h < kv_heads; ++h) {
    int32_t* dst = out->data() + h * per_head;
    std::iota(dst, dst + plan.counts.sink, 0);
    dst += plan.counts.sink;
    if (plan.middle_in_full) {
      std::iota(dst, dst + plan.middle_size(), static_cast<int32_t>(plan.search_begin));
      dst += plan.middle_size();
    } else {
      std::copy_n(selected + h * plan.search_k, plan.search_k, dst);
      dst += plan.search_k;
    }
    std::iota(dst, dst + plan.counts.window, static_cast<int32_t>(plan.search_end));
  }
}

void fill_trace(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                const int32_t* attended, AttendTrace* trace) {
  const int64_t per_head = plan.tokens_per_head();
  trace->context_length = plan.length;
  trace->budget = plan.counts;
  trace->exact = plan.exact();
  trace->selected.assign(kv_heads, {});
  trace->attended.assign(kv_heads, {});
  for (int h = 0; h < kv_heads; ++h) {
    trace->selected[h].assign(selected + h * plan.search_k, selected + (h + 1) * plan.search_k);
    trace->attended[h].assign(attended + h * per_head, attended + (h + 1) * per_head);
  }
}

}  // namespace pqkv::attention
