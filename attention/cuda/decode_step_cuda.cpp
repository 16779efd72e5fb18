#include "attention/cuda/decode_step_cuda.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "attention/cuda/attended_positions.cuh"
#include "attention/cuda/decode_attention.cuh"
#include "attention/cuda/gather_rows.cuh"
#include "attention/cuda/gather_tiered_rows.cuh"
#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

// Grows `buffer` to at least `bytes`, by half again, so a budget that creeps
// up a token per step reallocates rarely.
template <class Buffer>
Status grow(Buffer& buffer, size_t bytes) {
  if (bytes <= buffer.bytes()) return ok_status();
  return buffer.reserve(std::max(bytes, buffer.bytes() + buffer.bytes() / 2));
}

float elapsed_us(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms * 1000.0f;
}

DecodeAttentionShape attention_shape(const ModelSpec& spec, const DecodePlan& plan,
                                     DType query_dtype, DType out_dtype) {
  DecodeAttentionShape shape =
      DecodeAttentionShape::from_spec(spec, std::max<int64_t>(plan.tokens_per_head(), 1));
  shape.query_dtype = query_dtype;
  shape.out_dtype = out_dtype;
  return shape;
}

// The SSD tier of a step whose layer has spilled rows: copies the planned
// positions back (a stream synchronisation), reads the spilled rows among
// them and stages them where the gather reads them; sets *staged to the
// device array of per-entry row pointers, or null when the step attends to
// no spilled row.
Status stage_spilled_rows(const DecodeStepInputs& in, DecodeStepCudaWorkspace& ws,
                          cudaStream_t stream, tiering::FetchPlan* fetch, double* ssd_us,
                          const std::byte* const** staged) {
  *staged = nullptr;
  const int kv_heads = in.spec->num_kv_heads;
  const int64_t per_head = in.plan.tokens_per_head();
  const int64_t entries = kv_heads * per_head;
  if (entries == 0) return ok_status();
  const size_t positions_bytes = sizeof(int32_t) * static_cast<size_t>(entries);
  // The previous spilled step's gather read the staging: wait before reusing it.
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ws.staged_read.get()));
  PQKV_RETURN_IF_ERROR(grow(ws.host_positions, positions_bytes));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.host_positions.data(), ws.positions.data(),
                                            positions_bytes, cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  PQKV_RETURN_IF_ERROR(tiering::fetch_spilled_rows(in.host_rows, in.layer, in.spilled,
                                                   ws.host_positions.as<int32_t>(), per_head,
                                                   ws.ssd, fetch, ssd_us));
  if (ws.ssd.staged.empty()) return ok_status();
  // The SSD tier's staging is plain host memory: copy the rows into pinned,
  // mapped staging, which the gather reads over PCIe as it reads DRAM blocks.
  const int64_t row_bytes = in.spec->row_bytes();
  const size_t n = ws.ssd.entries.size();
  PQKV_RETURN_IF_ERROR(grow(ws.staged_rows, n * static_cast<size_t>(row_bytes)));
  const size_t pointer_bytes = sizeof(const std::byte*) * static_cast<size_t>(entries);
  PQKV_RETURN_IF_ERROR(grow(ws.staged_pointers, pointer_bytes));
  PQKV_RETURN_IF_ERROR(grow(ws.staged, pointer_bytes));
  auto* pointers = ws.staged_pointers.as<const std::byte*>();
  std::fill_n(pointers, entries, nullptr);
  auto* rows = ws.staged_rows.as<std::byte>();
  for (size_t k = 0; k < n; ++k) {
    std::byte* row = rows + k * static_cast<size_t>(row_bytes);
    std::memcpy(row, ws.ssd.fetched[k], static_cast<size_t>(row_bytes));
    pointers[ws.ssd.entries[k]] = row;
  }
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(ws.staged.data(), pointers, pointer_bytes, cudaMemcpyHostToDevice, stream));
  *staged = ws.staged.as<const std::byte* const>();
  return ok_status();
}

}  // namespace

Status DecodeStepCudaWorkspace::init() {
  for (auto& e : stage_events) {
    PQKV_ASSIGN_OR_RETURN(e, gpu::make_timing_event());
  }
  PQKV_ASSIGN_OR_RETURN(staged_read, gpu::make_event());
  return ok_status();
}

Status DecodeStepCudaWorkspace::reserve(const ModelSpec& spec, const DecodePlan& plan,
                                        DType query_dtype, DType out_dtype) {
  const int kv_heads = spec.num_kv_heads;
  const int64_t per_head = std::max<int64_t>(plan.tokens_per_head(), 1);
  // With a device plan the index may pick up to counts.top_k (search_k is 0
  // when the largest step attends its middle in full).
  const int64_t picks = std::max<int64_t>({plan.search_k, plan.counts.top_k, 1});
  PQKV_RETURN_IF_ERROR(grow(selected, sizeof(int32_t) * kv_heads * picks));
  PQKV_RETURN_IF_ERROR(grow(positions, sizeof(int32_t) * kv_heads * per_head));
  PQKV_RETURN_IF_ERROR(grow(rows, static_cast<size_t>(kv_heads * per_head * spec.row_bytes())));
  return grow(attention, decode_attention_workspace_bytes(
                             attention_shape(spec, plan, query_dtype, out_dtype)));
}

Status plan_decode_step_cuda(const DecodeStepInputs& in, const void* queries, DType query_dtype,
                             DecodeStepCudaWorkspace& ws, cudaStream_t stream) {
  const ModelSpec& spec = *in.spec;
  const DecodePlan& plan = in.plan;
  auto* selected = ws.selected.as<int32_t>();
  if (in.device_plan != nullptr) {
    if (plan.counts.top_k > 0 && in.index != nullptr) {
      index::SearchRequest request;
      request.queries =
          TensorView(queries, query_dtype, in.index->device(), {spec.num_q_heads, spec.head_dim});
      request.begin = 0;
      request.end = plan.length;
      request.k = plan.counts.top_k;
      request.aggregation = in.aggregation;
      request.sm_share = in.search_sm_share;
      request.device_range = &in.device_plan->search;
      PQKV_RETURN_IF_ERROR(in.index->search(request, selected, Stream::cuda(stream), nullptr));
    }
    return launch_attended_positions(in.device_plan, plan.tokens_per_head(), spec.num_kv_heads,
                                     selected, ws.positions.as<int32_t>(), stream);
  }
  if (plan.search_k > 0) {
    index::SearchRequest request;
    request.queries =
        TensorView(queries, query_dtype, in.index->device(), {spec.num_q_heads, spec.head_dim});
    request.begin = plan.search_begin;
    request.end = plan.search_end;
    request.k = plan.search_k;
    request.aggregation = in.aggregation;
    request.sm_share = in.search_sm_share;
    PQKV_RETURN_IF_ERROR(in.index->search(request, selected, Stream::cuda(stream), nullptr));
  }
  return launch_attended_positions(plan, spec.num_kv_heads, selected, ws.positions.as<int32_t>(),
                                   stream);
}

Status run_decode_step_cuda(const DecodeStepInputs& in, const void* queries, DType query_dtype,
                            void* out, DType out_dtype, DecodeStepCudaWorkspace& ws,
                            cudaStream_t stream, AttendTrace* trace) {
  const ModelSpec& spec = *in.spec;
  const DecodePlan& plan = in.plan;
  const int kv_heads = spec.num_kv_heads;
  const int64_t per_head = plan.tokens_per_head();
  if (in.spilled != nullptr) {
    if (in.device_plan != nullptr) {
      return Status::invalid_argument(
          "a step with rows spilled to disk plans on the host; it takes no device plan");
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      return Status::failed_precondition(
          "layer " + std::to_string(in.layer) +
          " has rows spilled to disk: its decode step reads the selected positions on the host "
          "(a stream synchronisation) and cannot be captured in a CUDA graph; run it directly, "
          "or raise StoreOptions::dram_budget_bytes so that nothing spills");
    }
  }
  if (trace != nullptr)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.stage_events[0].get(), stream));
  PQKV_RETURN_IF_ERROR(plan_decode_step_cuda(in, queries, query_dtype, ws, stream));
  if (trace != nullptr)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.stage_events[1].get(), stream));

  // Fetch every range of the tiers' plan into the compact row buffer, in one launch.
  tiering::FetchPlan fetch = in.tiers->plan(step_rows(plan), in.resident.shape);
  double ssd_us = 0;
  const std::byte* const* staged = nullptr;
  if (in.spilled != nullptr)
    PQKV_RETURN_IF_ERROR(stage_spilled_rows(in, ws, stream, &fetch, &ssd_us, &staged));
  GatherRowsArgs gather;
  gather.table = in.rows;
  gather.positions = ws.positions.as<int32_t>();
  gather.tokens = per_head;
  gather.out = ws.rows.as<std::byte>();
  if (in.device_plan != nullptr) gather.device_tokens = &in.device_plan->tokens_per_head;
  GatherTieredRowsArgs tiered;
  tiered.dram = gather;
  tiered.resident = in.resident;
  tiered.plan = fetch;
  tiered.cache = in.cache;
  tiered.staged = staged;
  if (in.device_plan != nullptr && in.resident.rows != nullptr) {
    // A replayed step: each row's tier is chosen on the device from the length.
    tiered.device_length = &in.device_plan->length;
    PQKV_RETURN_IF_ERROR(launch_gather_tiered_rows(tiered, stream));
  } else if (fetch.rows_from(tiering::RowSource::kResident) == 0 && in.cache.empty() &&
             staged == nullptr) {
    PQKV_RETURN_IF_ERROR(launch_gather_rows(gather, stream));
  } else {
    PQKV_RETURN_IF_ERROR(launch_gather_tiered_rows(tiered, stream));
  }
  if (staged != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.staged_read.get(), stream));
  if (ws.after_gather != nullptr)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.after_gather, stream));
  if (trace != nullptr)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.stage_events[2].get(), stream));

  DecodeAttentionArgs args;
  args.shape = attention_shape(spec, plan, query_dtype, out_dtype);
  args.shape.tokens = per_head;
  args.rows = ws.rows.data();
  args.queries = queries;
  args.out = out;
  args.workspace = ws.attention.data();
  args.workspace_bytes = ws.attention.bytes();
  if (in.device_plan != nullptr) args.device_tokens = &in.device_plan->tokens_per_head;
  args.report = in.output_report;
  args.report_layer = in.layer;
  PQKV_RETURN_IF_ERROR(launch_decode_attention(args, stream));
  if (trace == nullptr) return ok_status();
  if (in.device_plan != nullptr) {
    return Status::invalid_argument(
        "a trace reads the plan on the host; a step with a device plan has none");
  }

  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.stage_events[3].get(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<int32_t> host_selected(static_cast<size_t>(kv_heads) * plan.search_k);
  std::vector<int32_t> host_positions(static_cast<size_t>(kv_heads) * per_head);
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_selected.data(), ws.selected.data(),
                                       host_selected.size() * sizeof(int32_t),
                                       cudaMemcpyDeviceToHost));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_positions.data(), ws.positions.data(),
                                       host_positions.size() * sizeof(int32_t),
                                       cudaMemcpyDeviceToHost));
  fill_trace(plan, kv_heads, host_selected.data(), host_positions.data(), trace);
  fill_fetch_trace(fetch, spec, trace);
  trace->fetch.ssd_us = ssd_us;
  // Search and position assembly count as scoring; the GPU fuses scan and top-k.
  trace->score_us = elapsed_us(ws.stage_events[0].get(), ws.stage_events[1].get());
  trace->topk_us = 0;
  // The SSD reads ran on the host between those events: reported apart, as
  // the CPU step does.
  trace->gather_us = std::max(0.0f, elapsed_us(ws.stage_events[1].get(), ws.stage_events[2].get()) -
                                        static_cast<float>(ssd_us));
  trace->attention_us = elapsed_us(ws.stage_events[2].get(), ws.stage_events[3].get());
  return ok_status();
}

}  // namespace pqkv::attention::cuda
