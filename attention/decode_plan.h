// Which tokens one decode step attends to: the sink, the recent window, and
// the top-K of the middle range as chosen by the index. Planned once per step
// from the budget policy and the context length; the same plan serves every
// layer of that step.
#pragma once

#include <cstdint>
#include <vector>

#include "index/layer_index.h"
#include "pqkv/options.h"
#include "pqkv/sequence.h"

namespace pqkv::attention {

struct DecodePlan {
  int64_t length = 0;          // tokens in the context, the newest included
  int64_t prefill_length = 0;  // the prompt's length the budget was resolved with
  BudgetPolicy::Counts counts;
  // The middle range [search_begin, search_end) and how many of its tokens the
  // index picks per KV head. search_k == 0 means no search: either the budget
  // has no top-K or it covers the whole middle, which is then attended in full.
  int64_t search_begin = 0;
  int64_t search_end = 0;
  int64_t search_k = 0;
  bool middle_in_full = false;

  int64_t middle_size() const { return search_end - search_begin; }
  // Tokens attended per KV head.
  int64_t tokens_per_head() const {
    return counts.sink + counts.window + (middle_in_full ? middle_size() : search_k);
  }
  // True when every token of the context is attended.
  bool exact() const { return tokens_per_head() == length; }
};

DecodePlan plan_decode_step(const BudgetPolicy& budget, int64_t length, int64_t prefill_length);

// The same plan in device memory, written by a kernel from a device-side
// length (attention/cuda/device_plan.cuh) and read by every kernel of the
// step, so that a step captured once in a CUDA graph follows the length at
// each replay. Field for field what plan_decode_step computes.
struct DeviceStepPlan {
  int64_t length = 0;
  int64_t sink = 0;
  int64_t window = 0;
  // The middle range and the index's k; k == 0 when nothing is searched
  // (no top-K, or the middle attended in full).
  index::DeviceSearchRange search;
  int64_t picked = 0;         // search.k, or the middle's size when attended in full
  int64_t picked_first = -1;  // the middle's first position when in full; -1 otherwise
  int64_t tokens_per_head = 0;
};

// Writes the attended token positions of every KV head to `out`
// ([kv_heads, plan.tokens_per_head()]): sink, then the index's picks (or the
// whole middle), then the window. `selected` is [kv_heads, plan.search_k] on the
// host, ignored when the plan has no search.
void list_attended_tokens(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                          std::vector<int32_t>* out);

// Fills a trace's plan fields and token lists from host copies of the
// selection ([kv_heads, plan.search_k]) and the attended lists
// ([kv_heads, plan.tokens_per_head()]).
void fill_trace(const DecodePlan& plan, int kv_heads, const int32_t* selected,
                const int32_t* attended, AttendTrace* trace);

}  // namespace pqkv::attention
