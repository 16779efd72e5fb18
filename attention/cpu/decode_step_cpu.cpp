#include "attention/cpu/decode_step_cpu.h"

#include <new>

#include "attention/cpu/sparse_attention_cpu.h"

namespace pqkv::attention {

Status DecodeStepCpuWorkspace::reserve(const ModelSpec& spec, const DecodePlan& plan) {
  try {
    queries.reserve(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
    out.reserve(static_cast<size_t>(spec.num_q_heads) * spec.head_dim);
    selected.reserve(static_cast<size_t>(spec.num_kv_heads) * plan.search_k);
    positions.reserve(static_cast<size_t>(spec.num_kv_heads) * plan.tokens_per_head());
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory reserving the decode step's scratch");
  }
  return ok_status();
}

Status plan_decode_step_cpu(const DecodeStepInputs& in, const TensorView& queries,
                            DecodeStepCpuWorkspace& ws, index::SearchTimings* timings) {
  const ModelSpec& spec = *in.spec;
  const DecodePlan& plan = in.plan;
  try {
    ws.queries.resize(queries.numel());
    convert_to_float(queries.data, queries.dtype, queries.numel(), ws.queries.data());
    if (plan.search_k > 0) {
      index::SearchRequest request;
      request.queries = host_view(ws.queries.data(), {spec.num_q_heads, spec.head_dim});
      request.begin = plan.search_begin;
      request.end = plan.search_end;
      request.k = plan.search_k;
      request.aggregation = in.aggregation;
      ws.selected.resize(static_cast<size_t>(spec.num_kv_heads) * plan.search_k);
      PQKV_RETURN_IF_ERROR(in.index->search(request, ws.selected.data(), Stream::host(), timings));
    }
    list_attended_tokens(plan, spec.num_kv_heads, ws.selected.data(), &ws.positions);
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the decode step's scratch");
  }
  return ok_status();
}

Status run_decode_step_cpu(const DecodeStepInputs& in, const TensorView& queries,
                           const TensorView& out, DecodeStepCpuWorkspace& ws, AttendTrace* trace) {
  const DecodePlan& plan = in.plan;
  index::SearchTimings search_timings;
  PQKV_RETURN_IF_ERROR(plan_decode_step_cpu(in, queries, ws, &search_timings));

  // Fetch: the CPU step reads DRAM rows in place, through the host view; it
  // has no resident rows, so its plan reads every row from DRAM, except the
  // rows whose blocks were spilled, which the SSD tier stages first.
  tiering::FetchPlan fetch = in.tiers->plan(step_rows(plan), tiering::ResidentShape{});
  double ssd_us = 0;
  PQKV_RETURN_IF_ERROR(tiering::fetch_spilled_rows(in.rows, in.layer, in.spilled,
                                                   ws.positions.data(), plan.tokens_per_head(),
                                                   ws.ssd, &fetch, &ssd_us));

  AttentionTimings attention_timings;
  try {
    ws.out.resize(out.numel());
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the decode step's output");
  }
  sparse_attention_cpu(in.rows, in.spec->num_q_heads, ws.queries.data(), ws.positions.data(),
                       plan.tokens_per_head(), ws.out.data(), &attention_timings,
                       ws.ssd.staged.empty() ? nullptr : ws.ssd.staged.data());
  convert_from_float(ws.out.data(), out.numel(), out.data, out.dtype);

  if (trace != nullptr) {
    fill_trace(plan, in.spec->num_kv_heads, ws.selected.data(), ws.positions.data(), trace);
    fill_fetch_trace(fetch, *in.spec, trace);
    trace->fetch.ssd_us = ssd_us;
    trace->score_us = search_timings.score_us;
    trace->topk_us = search_timings.topk_us;
    trace->gather_us = attention_timings.gather_us;
    trace->attention_us = attention_timings.attention_us;
  }
  return ok_status();
}

}  // namespace pqkv::attention
