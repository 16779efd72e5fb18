#include "attention/cpu/decode_step_cpu.h"

#include <cstring>
#include <new>
#include <span>

#include "attention/cpu/sparse_attention_cpu.h"
#include "core/host_memory.h"

namespace pqkv::attention {

Status DecodeStepCpuWorkspace::reserve(const ModelSpec& spec, const DecodePlan& plan) {
  // A step of a reserve() past the machine's memory (possible with rows on
  // disk) is refused before any vector is sized.
  const double rows = static_cast<double>(spec.num_q_heads) * spec.head_dim;
  const double bytes =
      sizeof(float) * 2 * rows + sizeof(int32_t) * static_cast<double>(spec.num_kv_heads) *
                                     (static_cast<double>(plan.search_k) + plan.tokens_per_head());
  PQKV_RETURN_IF_ERROR(check_fits_host_memory(bytes, "reserving the decode step's scratch"));
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

namespace {

// ws.rows seen as a row table: blocks of 1 << kEntryBlockShift entries.
constexpr int kEntryBlockShift = 7;

// Fetches every attended row of the step into ws.rows: middle rows whose
// block has a ready slot from the cache, spilled rows that no slot serves
// through the SSD tier (filling fetch's ssd counts and *ssd_us), the others
// from DRAM; then admits the blocks the policy picks, and sets *hits. Then
// ws.row_blocks and ws.entries describe ws.rows as a row table whose token e
// of each head is the head's entry e.
Status fetch_through_cache(const DecodeStepInputs& in, DecodeStepCpuWorkspace& ws,
                           tiering::FetchPlan* fetch, double* ssd_us, int64_t* hits) {
  const ModelSpec& spec = *in.spec;
  const DecodePlan& plan = in.plan;
  const tiering::StepRows shape = step_rows(plan);
  const int64_t per_head = plan.tokens_per_head();
  const int64_t row_bytes = spec.row_bytes();
  const int kv_heads = spec.num_kv_heads;
  ws.rows.resize(static_cast<size_t>(kv_heads * per_head * row_bytes));
  ws.served.resize(static_cast<size_t>(kv_heads));
  *hits = 0;
  for (int h = 0; h < kv_heads; ++h) {
    const int32_t* positions = ws.positions.data() + h * per_head;
    const std::span<const int32_t> middle(positions + shape.sink,
                                          static_cast<size_t>(shape.middle));
    ws.served[h] = in.host_cache->step(in.layer, h, middle, plan.length);
    *hits += ws.served[h].hits;
  }
  const std::byte* const* staged = nullptr;
  if (in.spilled != nullptr) {
    // Only the spilled rows that no slot serves are read from disk.
    ws.unserved = ws.positions;
    for (int h = 0; h < kv_heads; ++h) {
      for (int64_t m = 0; m < shape.middle; ++m) {
        if (ws.served[h].slot_of[m] >= 0) ws.unserved[h * per_head + shape.sink + m] = -1;
      }
    }
    PQKV_RETURN_IF_ERROR(tiering::fetch_spilled_rows(
        in.rows, in.layer, in.spilled, ws.unserved.data(), per_head, ws.ssd, fetch, ssd_us));
    if (!ws.ssd.staged.empty()) staged = ws.ssd.staged.data();
  }
  for (int h = 0; h < kv_heads; ++h) {
    const int32_t* positions = ws.positions.data() + h * per_head;
    const tiering::BlockStep& served = ws.served[h];
    std::byte* out = ws.rows.data() + h * per_head * row_bytes;
    for (int64_t e = 0; e < per_head; ++e) {
      const int64_t m = e - shape.sink;
      const int64_t slot = m >= 0 && m < shape.middle ? served.slot_of[m] : -1;
      const std::byte* src = slot >= 0 ? in.host_cache->slot_row(slot, positions[e])
                             : staged != nullptr && staged[h * per_head + e] != nullptr
                                 ? staged[h * per_head + e]
                                 : in.rows.row(h, positions[e]);
      std::memcpy(out + e * row_bytes, src, static_cast<size_t>(row_bytes));
    }
  }
  // After every read (an admission of a spilled block reuses the SSD tier's
  // staging): an admitted block serves from the next step.
  // Their page reads count in the SSD tier's pages and time.
  storage::SpillReadStats admitted;
  PQKV_RETURN_IF_ERROR(in.host_cache->admit(ws.served, in.rows, in.spilled, &admitted));
  fetch->ssd_pages += admitted.pages;
  *ssd_us += admitted.read_us;
  // ws.rows as a row table: blocks of kTokens entries, head after head.
  constexpr int64_t kTokens = int64_t{1} << kEntryBlockShift;
  const int64_t blocks = (per_head + kTokens - 1) / kTokens;
  ws.row_blocks.resize(static_cast<size_t>(blocks * kv_heads));
  for (int64_t b = 0; b < blocks; ++b) {
    for (int h = 0; h < kv_heads; ++h)
      ws.row_blocks[b * kv_heads + h] = ws.rows.data() + (h * per_head + b * kTokens) * row_bytes;
  }
  ws.entries.resize(static_cast<size_t>(kv_heads * per_head));
  for (int h = 0; h < kv_heads; ++h) {
    for (int64_t e = 0; e < per_head; ++e)
      ws.entries[h * per_head + e] = static_cast<int32_t>(e);
  }
  return ok_status();
}

}  // namespace

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
  // With a cache, the SSD tier reads only the rows its slots do not serve
  // (fetch_through_cache).
  ws.ssd.staged.clear();
  if (in.host_cache == nullptr) {
    PQKV_RETURN_IF_ERROR(tiering::fetch_spilled_rows(in.rows, in.layer, in.spilled,
                                                     ws.positions.data(), plan.tokens_per_head(),
                                                     ws.ssd, &fetch, &ssd_us));
  }

  AttentionTimings attention_timings;
  try {
    ws.out.resize(out.numel());
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the decode step's output");
  }
  storage::RowTableView rows = in.rows;
  const int32_t* entries = ws.positions.data();
  int64_t cache_hits = 0;
  if (in.host_cache != nullptr) {
    try {
      PQKV_RETURN_IF_ERROR(fetch_through_cache(in, ws, &fetch, &ssd_us, &cache_hits));
    } catch (const std::bad_alloc&) {
      return Status::resource_exhausted("out of host memory for the decode step's fetched rows");
    }
    rows.blocks = ws.row_blocks.data();
    rows.tokens_per_block = int64_t{1} << kEntryBlockShift;
    rows.block_shift = kEntryBlockShift;
    entries = ws.entries.data();
  }
  PQKV_RETURN_IF_ERROR(sparse_attention_cpu(
      rows, in.spec->num_q_heads, ws.queries.data(), entries, plan.tokens_per_head(), ws.out.data(),
      &attention_timings,
      ws.ssd.staged.empty() || in.host_cache != nullptr ? nullptr : ws.ssd.staged.data()));
  PQKV_RETURN_IF_ERROR(
      check_output_storable(ws.out.data(), out.numel(), in.spec->head_dim, out.dtype));
  convert_from_float(ws.out.data(), out.numel(), out.data, out.dtype);

  if (trace != nullptr) {
    fill_trace(plan, in.spec->num_kv_heads, ws.selected.data(), ws.positions.data(), trace);
    fill_fetch_trace(fetch, *in.spec, trace);
    add_cache_hits(cache_hits, *in.spec, trace);
    trace->fetch.ssd_us = ssd_us;
    trace->score_us = search_timings.score_us;
    trace->topk_us = search_timings.topk_us;
    trace->gather_us = attention_timings.gather_us;
    trace->attention_us = attention_timings.attention_us;
  }
  return ok_status();
}

}  // namespace pqkv::attention
