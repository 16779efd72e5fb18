#include "attention/cuda/decode_executor_cuda.h"

#include <algorithm>
#include <string>

#include "attention/cuda/attended_positions.cuh"
#include "attention/cuda/decode_attention.cuh"
#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#include "index/cuda/layer_index_cuda.h"
#include "storage/cuda/row_transfer_cuda.h"
#include "storage/cuda/storable_check_cuda.h"

namespace pqkv::attention::cuda {
namespace {

// Slab-table room is reserved in steps of this many tokens (a table never
// moves between steps, so captured graphs stay valid while it has room).
constexpr int64_t kTableTokensStep = 1 << 17;

// Grows `buffer` to at least `bytes`, by half again, so a budget that creeps
// up a token per step reallocates rarely.
Status grow(gpu::DeviceBuffer& buffer, size_t bytes) {
  if (bytes <= buffer.bytes()) return ok_status();
  return buffer.reserve(std::max(bytes, buffer.bytes() + buffer.bytes() / 2));
}

float elapsed_us(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms * 1000.0f;
}

}  // namespace

DecodeExecutorCuda::DecodeExecutorCuda(const ExecutorConfig& config,
                                       std::shared_ptr<storage::SlabAllocator> pinned)
    : config_(config),
      kv_(config.spec, config.budget, std::move(pinned)),
      layers_(config.spec.num_layers) {}

Result<std::unique_ptr<DecodeExecutorCuda>> DecodeExecutorCuda::create(
    const ExecutorConfig& config) {
  const ModelSpec& spec = config.spec;
  if (spec.dtype == DType::kF32) {
    return Status::invalid_argument(
        "the CUDA decode path stores rows in bf16 or fp16; set "
        "ModelSpec::dtype to bf16 or fp16, or use a cpu store");
  }
  if (spec.head_dim != 64 && spec.head_dim != 128) {
    return Status::invalid_argument("the CUDA decode path is built for head_dim 64 and 128, got " +
                                    std::to_string(spec.head_dim) + "; use a cpu store");
  }
  PQKV_RETURN_IF_ERROR(check_device_usable(config.device));
  PQKV_ASSIGN_OR_RETURN(auto pinned, storage::make_pinned_slab_allocator());
  std::unique_ptr<DecodeExecutorCuda> e(new DecodeExecutorCuda(config, std::move(pinned)));
  PQKV_RETURN_IF_ERROR(e->init());
  return e;
}

Status DecodeExecutorCuda::init() {
  PQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(config_.device.index));
  PQKV_ASSIGN_OR_RETURN(own_stream_, gpu::make_stream());
  for (auto& layer : layers_) {
    PQKV_ASSIGN_OR_RETURN(layer.appended, gpu::make_event());
  }
  for (auto& e : stage_events_) {
    PQKV_ASSIGN_OR_RETURN(e, gpu::make_timing_event());
  }
  PQKV_ASSIGN_OR_RETURN(storable_report_,
                        gpu::PinnedBuffer::allocate(sizeof(storage::StorableReport)));
  *storable_report_.as<storage::StorableReport>() = {};
  return ok_status();
}

Status DecodeExecutorCuda::check_health() {
  // After the appends' streams pass their checks, the report in mapped host memory is final.
  for (const Layer& l : layers_)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.appended.get()));
  const storage::StorableReport r = *storable_report_.as<storage::StorableReport>();
  if (r.found == 0) return ok_status();
  return Status::invalid_argument(
      std::string(r.is_value ? "values" : "keys") + " appended to layer " +
      std::to_string(r.layer) + " hold " + std::to_string(r.value) + " at token " +
      std::to_string(r.token) + ", head " + std::to_string(r.head) + ", dim " +
      std::to_string(r.dim) + ", which is NaN, Inf or " + "overflows " +
      dtype_name(config_.spec.dtype) +
      " storage; the sequence holds it and attention would spread it: drop the sequence and "
      "append finite keys and values");
}

cudaStream_t DecodeExecutorCuda::stream_of(Stream stream) const {
  return stream.host_only ? own_stream_.get() : static_cast<cudaStream_t>(stream.handle);
}

Status DecodeExecutorCuda::sync_table(int layer, cudaStream_t stream) {
  Layer& l = layers_[layer];
  const int64_t tokens = kv_.length(layer);
  const int64_t slabs =
      (tokens + storage::KvRowStore::kTokensPerSlab - 1) / storage::KvRowStore::kTokensPerSlab;
  if (!l.table || l.table->slab_capacity() < slabs) {
    const int64_t room = (tokens / kTableTokensStep + 1) * kTableTokensStep;
    PQKV_ASSIGN_OR_RETURN(auto table, DeviceSlabTable::create(kv_, layer, room));
    l.table = std::move(table);
  }
  return l.table->update(stream);
}

Result<const void*> DecodeExecutorCuda::on_device(const TensorView& t, gpu::DeviceBuffer& staging,
                                                  cudaStream_t stream) {
  if (t.device.is_cuda()) return static_cast<const void*>(t.data);
  PQKV_RETURN_IF_ERROR(grow(staging, static_cast<size_t>(t.bytes())));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(staging.data(), t.data, t.bytes(), cudaMemcpyHostToDevice, stream));
  return static_cast<const void*>(staging.data());
}

Status DecodeExecutorCuda::append(int layer, const TensorView& keys, const TensorView& values,
                                  Stream stream) {
  const cudaStream_t s = stream_of(stream);
  const int64_t n = keys.dim(0);
  const int64_t first = kv_.length(layer);
  PQKV_ASSIGN_OR_RETURN(const void* k, on_device(keys, keys_in_, s));
  PQKV_ASSIGN_OR_RETURN(const void* v, on_device(values, values_in_, s));
  PQKV_RETURN_IF_ERROR(kv_.extend(layer, n));
  Layer& l = layers_[layer];
  PQKV_RETURN_IF_ERROR(sync_table(layer, s));
  const storage::SlabTableView table{const_cast<std::byte* const*>(l.table->device_table()),
                                     config_.spec.num_kv_heads, storage::KvRowStore::kTokensPerSlab,
                                     config_.spec.head_dim, config_.spec.dtype};
  PQKV_RETURN_IF_ERROR(storage::write_rows_cuda(table, k, v, keys.dtype, first, n, s));
  storage::StorableCheckArgs check;
  check.keys = k;
  check.values = v;
  check.in_dtype = keys.dtype;
  check.row_dtype = config_.spec.dtype;
  check.n = n;
  check.kv_heads = config_.spec.num_kv_heads;
  check.head_dim = config_.spec.head_dim;
  check.layer = layer;
  check.first_token = first;
  check.report = storable_report_.as<storage::StorableReport>();
  PQKV_RETURN_IF_ERROR(storage::check_storable_cuda(check, s));
  if (l.index != nullptr) {
    auto* idx = static_cast<index::LayerIndexCuda*>(l.index.get());
    PQKV_RETURN_IF_ERROR(idx->add(TensorView(k, keys.dtype, config_.device,
                                             {n, config_.spec.num_kv_heads, config_.spec.head_dim}),
                                  Stream::cuda(s)));
    // Large adds run on the index's build stream; the keys buffer must outlive them.
    PQKV_RETURN_IF_ERROR(idx->wait_ready(s));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.appended.get(), s));
  // Staged host input is reused by the next call: finish before returning.
  if (stream.host_only || !keys.device.is_cuda())
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return ok_status();
}

Status DecodeExecutorCuda::build_index(int layer, int64_t train_begin, Stream /*stream*/) {
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  const int64_t n = length - train_begin;
  if (n <= 0) return ok_status();
  Layer& l = layers_[layer];
  PQKV_ASSIGN_OR_RETURN(
      auto made, index::make_layer_index(
                     config_.device, index::PqShape::from_config(spec.head_dim, config_.options.pq),
                     spec.num_kv_heads));
  auto* idx = static_cast<index::LayerIndexCuda*>(made.get());
  // The build runs on the index's low-priority stream, after the rows are written.
  const cudaStream_t bs = idx->build_stream();
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(bs, l.appended.get()));
  const int64_t row_elems = int64_t{spec.num_kv_heads} * spec.head_dim;
  PQKV_ASSIGN_OR_RETURN(auto keys, gpu::DeviceArray<uint16_t>::allocate(length * row_elems, bs));
  const storage::SlabTableView table{const_cast<std::byte* const*>(l.table->device_table()),
                                     spec.num_kv_heads, storage::KvRowStore::kTokensPerSlab,
                                     spec.head_dim, spec.dtype};
  PQKV_RETURN_IF_ERROR(storage::read_keys_cuda(table, 0, length, keys.get(), bs));
  PQKV_RETURN_IF_ERROR(idx->train(TensorView(keys.get() + train_begin * row_elems, spec.dtype,
                                             config_.device, {n, spec.num_kv_heads, spec.head_dim}),
                                  config_.options.pq, Stream::cuda(bs)));
  PQKV_RETURN_IF_ERROR(idx->add(TensorView(keys.get(), spec.dtype, config_.device,
                                           {length, spec.num_kv_heads, spec.head_dim}),
                                Stream::cuda(bs)));
  // `keys` is freed in stream order on `bs`, after the work above.
  l.index = std::move(made);
  return ok_status();
}

void DecodeExecutorCuda::drop_indexes() {
  for (auto& l : layers_)
    l.index.reset();
}

Status DecodeExecutorCuda::attend(int layer, const DecodePlan& plan, const TensorView& queries,
                                  const TensorView& out, Stream stream, AttendTrace* trace) {
  const ModelSpec& spec = config_.spec;
  const cudaStream_t s = stream_of(stream);
  const int kv_heads = spec.num_kv_heads;
  const int64_t per_head = plan.tokens_per_head();
  if (queries.dtype == DType::kF16 || out.dtype == DType::kF16) {
    return Status::invalid_argument("the CUDA decode path takes fp32 or bf16 queries and outputs");
  }
  Layer& l = layers_[layer];
  PQKV_ASSIGN_OR_RETURN(const void* q, on_device(queries, queries_in_, s));
  void* o = out.data;
  if (!out.device.is_cuda()) {
    PQKV_RETURN_IF_ERROR(grow(out_, static_cast<size_t>(out.bytes())));
    o = out_.data();
  }
  PQKV_RETURN_IF_ERROR(
      grow(selected_, sizeof(int32_t) * kv_heads * std::max<int64_t>(plan.search_k, 1)));
  PQKV_RETURN_IF_ERROR(
      grow(positions_, sizeof(int32_t) * kv_heads * std::max<int64_t>(per_head, 1)));
  PQKV_RETURN_IF_ERROR(grow(
      rows_, static_cast<size_t>(kv_heads * std::max<int64_t>(per_head, 1) * spec.row_bytes())));
  DecodeAttentionShape shape = DecodeAttentionShape::from_spec(spec, per_head);
  shape.query_dtype = queries.dtype;
  shape.out_dtype = out.dtype;
  PQKV_RETURN_IF_ERROR(grow(attention_workspace_, decode_attention_workspace_bytes(shape)));

  if (trace != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stage_events_[0].get(), s));
  auto* selected = static_cast<int32_t*>(selected_.data());
  if (plan.search_k > 0) {
    index::SearchRequest request;
    request.queries =
        TensorView(q, queries.dtype, config_.device, {spec.num_q_heads, spec.head_dim});
    request.begin = plan.search_begin;
    request.end = plan.search_end;
    request.k = plan.search_k;
    request.aggregation = config_.options.aggregation;
    PQKV_RETURN_IF_ERROR(l.index->search(request, selected, Stream::cuda(s), nullptr));
  }
  auto* positions = static_cast<int32_t*>(positions_.data());
  PQKV_RETURN_IF_ERROR(launch_attended_positions(plan, kv_heads, selected, positions, s));
  if (trace != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stage_events_[1].get(), s));
  PQKV_RETURN_IF_ERROR(launch_gather_rows(
      l.table->gather_args(positions, per_head, static_cast<std::byte*>(rows_.data())), s));
  if (trace != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stage_events_[2].get(), s));
  DecodeAttentionArgs args;
  args.shape = shape;
  args.rows = rows_.data();
  args.queries = q;
  args.out = o;
  args.workspace = attention_workspace_.data();
  args.workspace_bytes = attention_workspace_.bytes();
  PQKV_RETURN_IF_ERROR(launch_decode_attention(args, s));
  if (trace != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stage_events_[3].get(), s));
  if (o != out.data) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data, o, out.bytes(), cudaMemcpyDeviceToHost, s));
  }

  if (trace != nullptr) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    std::vector<int32_t> host_selected(static_cast<size_t>(kv_heads) * plan.search_k);
    std::vector<int32_t> host_positions(static_cast<size_t>(kv_heads) * per_head);
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_selected.data(), selected,
                                         host_selected.size() * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_positions.data(), positions,
                                         host_positions.size() * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost));
    fill_trace(plan, kv_heads, host_selected.data(), host_positions.data(), trace);
    // Search and position assembly count as scoring; the GPU fuses scan and top-k.
    trace->score_us = elapsed_us(stage_events_[0].get(), stage_events_[1].get());
    trace->topk_us = 0;
    trace->gather_us = elapsed_us(stage_events_[1].get(), stage_events_[2].get());
    trace->attention_us = elapsed_us(stage_events_[2].get(), stage_events_[3].get());
  } else if (stream.host_only || !out.device.is_cuda()) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  }
  return ok_status();
}

Status DecodeExecutorCuda::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                        Stream stream) {
  const int64_t length = kv_.length(layer);
  DecodePlan plan = plan_decode_step(BudgetPolicy::everything(), length, length);
  return attend(layer, plan, queries, out, stream, nullptr);
}

}  // namespace pqkv::attention::cuda
