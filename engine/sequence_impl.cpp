#include "engine/sequence_impl.h"

#include <cmath>
#include <string>

#include "attention/cpu/sparse_attention_cpu.h"

namespace pqkv {
namespace {

// OK when every element of a host tensor [n, heads, dim] is finite; otherwise
// names the first bad element.
Status check_finite(const char* what, const TensorView& t) {
  const int64_t heads = t.dim(1);
  const int64_t dim = t.dim(2);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float v = load_as_float(t.data, t.dtype, i);
    if (!std::isfinite(v)) {
      return Status::invalid_argument(
          std::string(what) + " contain a non-finite value (" + (std::isnan(v) ? "NaN" : "Inf") +
          ") at token " + std::to_string(i / (heads * dim)) + ", head " +
          std::to_string((i / dim) % heads) + ", dim " + std::to_string(i % dim) +
          "; nothing was appended");
    }
  }
  return ok_status();
}

Status check_on_host(const char* what, const TensorView& t) {
  if (t.device.is_cpu()) return ok_status();
  return Status::invalid_argument(std::string(what) + " are on " + t.device.to_string() +
                                  " but this sequence runs on cpu; pass host memory");
}

}  // namespace

Sequence::Impl::Impl(std::string name, const ModelSpec& spec, const SequenceOptions& options,
                     Device device, storage::MemoryBudget* budget, tbb::task_arena* arena)
    : name_(std::move(name)),
      spec_(spec),
      options_(options),
      device_(device),
      arena_(arena),
      kv_(spec, budget),
      indexes_(spec.num_layers) {}

Status Sequence::Impl::check_layer(int layer) const {
  if (layer >= 0 && layer < spec_.num_layers) return ok_status();
  return Status::invalid_argument("layer " + std::to_string(layer) + " is out of range: " +
                                  spec_.name + " has " + std::to_string(spec_.num_layers) +
                                  " layers (0.." + std::to_string(spec_.num_layers - 1) + ")");
}

Status Sequence::Impl::check_append_order(int layer, int64_t n) const {
  if (!prefilled_) return ok_status();
  if (layer > 0 && kv_.length(layer) + n > kv_.length(layer - 1)) {
    return Status::failed_precondition(
        "append out of order: layer " + std::to_string(layer) + " would hold " +
        std::to_string(kv_.length(layer) + n) + " tokens, more than layer " +
        std::to_string(layer - 1) + " (" + std::to_string(kv_.length(layer - 1)) +
        "); during decode append each new token to layer 0 first, then 1, 2, ...");
  }
  const int last = spec_.num_layers - 1;
  if (layer == 0 && kv_.length(0) != kv_.length(last)) {
    return Status::failed_precondition(
        "append out of order: layer 0 starts a new decode step, but layer " +
        std::to_string(last) + " has not received the previous token yet (it holds " +
        std::to_string(kv_.length(last)) + " tokens, layer 0 holds " +
        std::to_string(kv_.length(0)) + ")");
  }
  return ok_status();
}

Status Sequence::Impl::append(int layer, const TensorView& keys, const TensorView& values,
                              Stream /*stream: host work only on this backend*/) {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(keys.expect_shape("keys", {-1, spec_.num_kv_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(
      values.expect_shape("values", {keys.dim(0), spec_.num_kv_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(check_on_host("keys", keys));
  PQKV_RETURN_IF_ERROR(check_on_host("values", values));
  PQKV_RETURN_IF_ERROR(check_finite("keys", keys));
  PQKV_RETURN_IF_ERROR(check_finite("values", values));
  PQKV_RETURN_IF_ERROR(check_append_order(layer, keys.dim(0)));
  PQKV_RETURN_IF_ERROR(kv_.append(layer, keys, values));
  if (prefilled_ && indexes_[layer] != nullptr && indexes_[layer]->trained()) {
    return encode_new_keys(layer);
  }
  return ok_status();
}

Status Sequence::Impl::finish_prefill() {
  if (prefilled_) {
    return Status::failed_precondition("finish_prefill was already called on sequence '" + name_ +
                                       "'; append decode tokens and call attend");
  }
  const int64_t length = kv_.length(0);
  for (int l = 0; l < spec_.num_layers; ++l) {
    if (kv_.length(l) != length) {
      return Status::failed_precondition(
          "finish_prefill needs every layer to hold the prompt, but layer 0 holds " +
          std::to_string(length) + " tokens and layer " + std::to_string(l) + " holds " +
          std::to_string(kv_.length(l)));
    }
  }
  if (length == 0) {
    return Status::failed_precondition("finish_prefill on an empty sequence: append the prompt's "
                                       "keys and values to every layer first");
  }
  for (int l = 0; l < spec_.num_layers; ++l) {
    Status s = build_index(l);
    if (!s.ok()) {
      for (auto& index : indexes_) index.reset();
      return s.with_context("training the index of layer " + std::to_string(l));
    }
  }
  prefilled_ = true;
  prefill_length_ = length;
  return ok_status();
}

Status Sequence::Impl::build_index(int layer) {
  const int64_t length = kv_.length(layer);
  const int64_t sink = std::min(options_.budget.sink.resolve(length), length);
  const int64_t n = length - sink;
  if (n == 0) return ok_status();  // nothing past the sink yet: trained when first needed
  PQKV_ASSIGN_OR_RETURN(
      auto index, index::make_layer_index(device_, index::PqShape::from_config(spec_.head_dim, options_.pq),
                                          spec_.num_kv_heads));
  std::vector<float> keys(static_cast<size_t>(n) * spec_.num_kv_heads * spec_.head_dim);
  kv_.keys_as_float(layer, sink, length, keys.data());
  PQKV_RETURN_IF_ERROR(index->train(
      host_view(keys.data(), {n, spec_.num_kv_heads, spec_.head_dim}), options_.pq, Stream::host()));
  indexes_[layer] = std::move(index);
  return encode_new_keys(layer);
}

Status Sequence::Impl::encode_new_keys(int layer) {
  index::LayerIndex& index = *indexes_[layer];
  const int64_t begin = index.num_tokens();
  const int64_t end = kv_.length(layer);
  if (begin == end) return ok_status();
  std::vector<float> keys(static_cast<size_t>(end - begin) * spec_.num_kv_heads * spec_.head_dim);
  kv_.keys_as_float(layer, begin, end, keys.data());
  return index.add(host_view(keys.data(), {end - begin, spec_.num_kv_heads, spec_.head_dim}),
                   Stream::host());
}

Status Sequence::Impl::check_queries(const TensorView& queries, const TensorView& out) const {
  PQKV_RETURN_IF_ERROR(queries.expect_shape("queries", {spec_.num_q_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(out.expect_shape("out", {spec_.num_q_heads, spec_.head_dim}));
  PQKV_RETURN_IF_ERROR(check_on_host("queries", queries));
  PQKV_RETURN_IF_ERROR(check_on_host("out", out));
  for (int64_t i = 0; i < queries.numel(); ++i) {
    if (!std::isfinite(load_as_float(queries.data, queries.dtype, i))) {
      return Status::invalid_argument("queries contain a non-finite value at element " +
                                      std::to_string(i));
    }
  }
  return ok_status();
}

Status Sequence::Impl::attend(int layer, const TensorView& queries, const TensorView& out,
                              Stream /*stream: host work only on this backend*/,
                              AttendTrace* trace) {
  if (!prefilled_) {
    return Status::failed_precondition(
        "attend before finish_prefill on sequence '" + name_ +
        "': append the prompt to every layer and call finish_prefill() first");
  }
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(check_queries(queries, out));

  const int64_t length = kv_.length(layer);
  const attention::DecodePlan plan =
      attention::plan_decode_step(options_.budget, length, prefill_length_);
  const int kv_heads = spec_.num_kv_heads;
  queries_f32_.resize(queries.numel());
  convert_to_float(queries.data, queries.dtype, queries.numel(), queries_f32_.data());

  index::SearchTimings search_timings;
  if (plan.search_k > 0) {
    if (indexes_[layer] == nullptr) PQKV_RETURN_IF_ERROR(build_index(layer));
    index::SearchRequest request;
    request.queries = host_view(queries_f32_.data(), {spec_.num_q_heads, spec_.head_dim});
    request.begin = plan.search_begin;
    request.end = plan.search_end;
    request.k = plan.search_k;
    request.aggregation = options_.aggregation;
    selected_.resize(static_cast<size_t>(kv_heads) * plan.search_k);
    PQKV_RETURN_IF_ERROR(
        indexes_[layer]->search(request, selected_.data(), Stream::host(), &search_timings));
  }
  attention::list_attended_tokens(plan, kv_heads, selected_.data(), &attended_);

  attention::AttentionTimings attention_timings;
  out_f32_.resize(out.numel());
  attention::sparse_attention_cpu(kv_, layer, queries_f32_.data(), attended_.data(),
                                  plan.tokens_per_head(), out_f32_.data(), &attention_timings);
  convert_from_float(out_f32_.data(), out.numel(), out.data, out.dtype);

  if (trace != nullptr) {
    trace->context_length = length;
    trace->budget = plan.counts;
    trace->exact = plan.exact();
    const int64_t per_head = plan.tokens_per_head();
    trace->selected.assign(kv_heads, {});
    trace->attended.assign(kv_heads, {});
    for (int h = 0; h < kv_heads; ++h) {
      trace->selected[h].assign(selected_.begin() + h * plan.search_k,
                                selected_.begin() + (h + 1) * plan.search_k);
      trace->attended[h].assign(attended_.begin() + h * per_head,
                                attended_.begin() + (h + 1) * per_head);
    }
    trace->score_us = search_timings.score_us;
    trace->topk_us = search_timings.topk_us;
    trace->gather_us = attention_timings.gather_us;
    trace->attention_us = attention_timings.attention_us;
  }
  return ok_status();
}

Status Sequence::Impl::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                    Stream /*stream*/) {
  PQKV_RETURN_IF_ERROR(check_layer(layer));
  PQKV_RETURN_IF_ERROR(check_queries(queries, out));
  if (kv_.length(layer) == 0) {
    return Status::failed_precondition("attend_exact on layer " + std::to_string(layer) +
                                       ", which holds no tokens yet");
  }
  queries_f32_.resize(queries.numel());
  convert_to_float(queries.data, queries.dtype, queries.numel(), queries_f32_.data());
  out_f32_.resize(out.numel());
  attention::full_attention_cpu(kv_, layer, queries_f32_.data(), out_f32_.data());
  convert_from_float(out_f32_.data(), out.numel(), out.data, out.dtype);
  return ok_status();
}

}  // namespace pqkv
