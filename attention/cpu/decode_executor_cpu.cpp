#include "attention/cpu/decode_executor_cpu.h"

#include "attention/cpu/sparse_attention_cpu.h"

namespace pqkv::attention {

DecodeExecutorCpu::DecodeExecutorCpu(const ExecutorConfig& config)
    : config_(config), kv_(config.spec, config.budget), indexes_(config.spec.num_layers) {}

Status DecodeExecutorCpu::append(int layer, const TensorView& keys, const TensorView& values,
                                 Stream /*stream: host work only*/) {
  const int64_t before = kv_.length(layer);
  PQKV_RETURN_IF_ERROR(kv_.append(layer, keys, values));
  if (indexes_[layer] == nullptr) return ok_status();
  const Status s = encode_new_keys(layer);
  // All or nothing: rows without codes would leave the index behind the store.
  if (!s.ok()) kv_.truncate(layer, before);
  return s;
}

Status DecodeExecutorCpu::build_index(int layer, int64_t train_begin, Stream /*stream*/) {
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  const int64_t n = length - train_begin;
  if (n <= 0) return ok_status();
  PQKV_ASSIGN_OR_RETURN(
      auto index, index::make_layer_index(
                      Device::cpu(), index::PqShape::from_config(spec.head_dim, config_.options.pq),
                      spec.num_kv_heads));
  std::vector<float> keys(static_cast<size_t>(n) * spec.num_kv_heads * spec.head_dim);
  kv_.keys_as_float(layer, train_begin, length, keys.data());
  PQKV_RETURN_IF_ERROR(index->train(host_view(keys.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                    config_.options.pq, Stream::host()));
  indexes_[layer] = std::move(index);
  return encode_new_keys(layer);
}

void DecodeExecutorCpu::drop_indexes() {
  for (auto& index : indexes_)
    index.reset();
}

Status DecodeExecutorCpu::encode_new_keys(int layer) {
  const ModelSpec& spec = config_.spec;
  index::LayerIndex& index = *indexes_[layer];
  const int64_t begin = index.num_tokens();
  const int64_t end = kv_.length(layer);
  if (begin == end) return ok_status();
  // Encode from the stored (dtype-rounded) rows, so codes match a later retrain.
  std::vector<float> keys(static_cast<size_t>(end - begin) * spec.num_kv_heads * spec.head_dim);
  kv_.keys_as_float(layer, begin, end, keys.data());
  return index.add(host_view(keys.data(), {end - begin, spec.num_kv_heads, spec.head_dim}),
                   Stream::host());
}

Status DecodeExecutorCpu::attend(int layer, const DecodePlan& plan, const TensorView& queries,
                                 const TensorView& out, Stream /*stream*/, AttendTrace* trace) {
  const ModelSpec& spec = config_.spec;
  const int kv_heads = spec.num_kv_heads;
  queries_f32_.resize(queries.numel());
  convert_to_float(queries.data, queries.dtype, queries.numel(), queries_f32_.data());

  index::SearchTimings search_timings;
  if (plan.search_k > 0) {
    index::SearchRequest request;
    request.queries = host_view(queries_f32_.data(), {spec.num_q_heads, spec.head_dim});
    request.begin = plan.search_begin;
    request.end = plan.search_end;
    request.k = plan.search_k;
    request.aggregation = config_.options.aggregation;
    selected_.resize(static_cast<size_t>(kv_heads) * plan.search_k);
    PQKV_RETURN_IF_ERROR(
        indexes_[layer]->search(request, selected_.data(), Stream::host(), &search_timings));
  }
  list_attended_tokens(plan, kv_heads, selected_.data(), &attended_);

  AttentionTimings attention_timings;
  out_f32_.resize(out.numel());
  sparse_attention_cpu(kv_, layer, queries_f32_.data(), attended_.data(), plan.tokens_per_head(),
                       out_f32_.data(), &attention_timings);
  convert_from_float(out_f32_.data(), out.numel(), out.data, out.dtype);

  if (trace != nullptr) {
    fill_trace(plan, kv_heads, selected_.data(), attended_.data(), trace);
    trace->score_us = search_timings.score_us;
    trace->topk_us = search_timings.topk_us;
    trace->gather_us = attention_timings.gather_us;
    trace->attention_us = attention_timings.attention_us;
  }
  return ok_status();
}

Status DecodeExecutorCpu::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                       Stream /*stream*/) {
  queries_f32_.resize(queries.numel());
  convert_to_float(queries.data, queries.dtype, queries.numel(), queries_f32_.data());
  out_f32_.resize(out.numel());
  full_attention_cpu(kv_, layer, queries_f32_.data(), out_f32_.data());
  convert_from_float(out_f32_.data(), out.numel(), out.data, out.dtype);
  return ok_status();
}

}  // namespace pqkv::attention
