#include "engine/cpu/sequence_state_cpu.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>

#include "attention/cpu/sparse_attention_cpu.h"

namespace pqkv::engine {

SequenceStateCpu::SequenceStateCpu(const SequenceStateConfig& config)
    : config_(config),
      kv_(config.spec, config.arena, config.spill),
      indexes_(config.spec.num_layers) {}

Status SequenceStateCpu::reserve(int64_t max_tokens, const attention::DecodePlan& plan) {
  const std::vector<int64_t> blocks_before = kv_.block_counts();
  PQKV_RETURN_IF_ERROR(kv_.reserve(max_tokens));
  const auto take_rest = [&]() -> Status {
    PQKV_RETURN_IF_ERROR(workspace_.reserve(config_.spec, plan));
    if (cache_ != nullptr) return ok_status();
    const tiering::BlockCacheOptions cache = engine::block_cache_for(config_, max_tokens);
    if (cache.num_slots == 0) return ok_status();
    PQKV_ASSIGN_OR_RETURN(cache_, tiering::BlockCacheCpu::create(cache, config_.spec.row_bytes(),
                                                                 config_.cache_budget));
    return ok_status();
  };
  const Status s = take_rest();
  // All or nothing: the row blocks this call took go back to the DRAM budget.
  if (!s.ok()) kv_.release_blocks_past(blocks_before);
  return s;
}

Status SequenceStateCpu::append(int layer, const TensorView& keys, const TensorView& values,
                                Stream /*stream: host work only*/) {
  const int64_t before = kv_.length(layer);
  PQKV_RETURN_IF_ERROR(kv_.append(layer, keys, values));
  if (indexes_[layer] == nullptr) return ok_status();
  const Status s = encode_new_keys(layer);
  // All or nothing: rows without codes would leave the index behind the store.
  if (!s.ok()) kv_.truncate(layer, before);
  return s;
}

Status SequenceStateCpu::build_index(int layer, int64_t train_begin, Stream /*stream*/) {
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  const int64_t n = length - train_begin;
  if (n <= 0) return ok_status();
  PQKV_ASSIGN_OR_RETURN(auto index,
                        index::make_layer_index(Device::cpu(), spec.head_dim, spec.num_kv_heads,
                                                config_.options.pq, config_.options.selection));
  std::vector<float> keys(static_cast<size_t>(n) * spec.num_kv_heads * spec.head_dim);
  PQKV_RETURN_IF_ERROR(kv_.keys_as_float(layer, train_begin, length, keys.data()));
  PQKV_RETURN_IF_ERROR(index->train(host_view(keys.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                    config_.options.pq, Stream::host()));
  indexes_[layer] = std::move(index);
  return encode_new_keys(layer);
}

Status SequenceStateCpu::refit_index(int layer, int64_t train_begin, Stream /*stream*/,
                                     const index::LayerIndex::BackgroundRunner& run) {
  if (indexes_[layer] == nullptr) {
    return Status::failed_precondition("layer " + std::to_string(layer) +
                                       " has no index to refit yet");
  }
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  // From the stored (dtype-rounded) rows, as build_index trains.
  std::vector<float> keys(static_cast<size_t>(length) * spec.num_kv_heads * spec.head_dim);
  PQKV_RETURN_IF_ERROR(kv_.keys_as_float(layer, 0, length, keys.data()));
  return indexes_[layer]->refit(std::move(keys), train_begin, config_.options.pq, run);
}

void SequenceStateCpu::drop_indexes() {
  for (auto& index : indexes_)
    index.reset();
}

Status SequenceStateCpu::encode_new_keys(int layer) {
  const ModelSpec& spec = config_.spec;
  index::LayerIndex& index = *indexes_[layer];
  const int64_t begin = index.num_tokens();
  const int64_t end = kv_.length(layer);
  if (begin == end) return ok_status();
  // Encode from the stored (dtype-rounded) rows, so codes match a later retrain.
  std::vector<float> keys(static_cast<size_t>(end - begin) * spec.num_kv_heads * spec.head_dim);
  PQKV_RETURN_IF_ERROR(kv_.keys_as_float(layer, begin, end, keys.data()));
  return index.add(host_view(keys.data(), {end - begin, spec.num_kv_heads, spec.head_dim}),
                   Stream::host());
}

attention::DecodeStepInputs SequenceStateCpu::step_inputs(int layer,
                                                          const attention::DecodePlan& plan) const {
  attention::DecodeStepInputs in;
  in.spec = &config_.spec;
  in.plan = plan;
  in.rows = kv_.host_table(layer);
  in.index = indexes_[layer].get();
  in.aggregation = config_.options.aggregation;
  in.tiers = config_.tiers;
  in.layer = layer;
  in.host_cache = cache_.get();
  in.spilled = kv_.spilled();
  return in;
}

Status SequenceStateCpu::attend(int layer, const attention::DecodePlan& plan,
                                const TensorView& queries, const TensorView& out,
                                Stream /*stream: host work only*/, AttendTrace* trace) {
  PQKV_RETURN_IF_ERROR(
      attention::run_decode_step_cpu(step_inputs(layer, plan), queries, out, workspace_, trace));
  if (cache_ != nullptr && layer == config_.spec.num_layers - 1) cache_->end_step();
  return ok_status();
}

Status SequenceStateCpu::select(int layer, const attention::DecodePlan& plan,
                                const TensorView& queries, int32_t* positions, int64_t max_selected,
                                bool /*positions_on_device: never for a cpu store*/,
                                Stream /*stream*/) {
  PQKV_RETURN_IF_ERROR(
      attention::plan_decode_step_cpu(step_inputs(layer, plan), queries, workspace_, nullptr));
  const int64_t per_head = plan.tokens_per_head();
  for (int h = 0; h < config_.spec.num_kv_heads; ++h) {
    int32_t* dst = positions + h * max_selected;
    std::copy_n(workspace_.positions.data() + h * per_head, per_head, dst);
    std::fill(dst + per_head, dst + max_selected, -1);
  }
  return ok_status();
}

Status SequenceStateCpu::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                      Stream /*stream*/) {
  workspace_.queries.resize(queries.numel());
  convert_to_float(queries.data, queries.dtype, queries.numel(), workspace_.queries.data());
  workspace_.out.resize(out.numel());
  if (kv_.blocks_spilled() == 0) {
    PQKV_RETURN_IF_ERROR(attention::full_attention_cpu(kv_, layer, workspace_.queries.data(),
                                                       workspace_.out.data()));
  } else {
    // Every token: spilled rows are staged through the SSD tier first (all
    // of them at once, in host memory outside the DRAM budget: the exact
    // reference is for checks, not for decoding).
    const int64_t n = kv_.length(layer);
    const int kv_heads = config_.spec.num_kv_heads;
    std::vector<int32_t> tokens(static_cast<size_t>(n) * kv_heads);
    for (int h = 0; h < kv_heads; ++h)
      std::iota(tokens.begin() + h * n, tokens.begin() + (h + 1) * n, 0);
    tiering::FetchPlan fetch;
    const storage::RowTableView table = kv_.host_table(layer);
    PQKV_RETURN_IF_ERROR(tiering::fetch_spilled_rows(table, layer, kv_.spilled(), tokens.data(), n,
                                                     workspace_.ssd, &fetch, nullptr));
    PQKV_RETURN_IF_ERROR(attention::sparse_attention_cpu(
        table, config_.spec.num_q_heads, workspace_.queries.data(), tokens.data(), n,
        workspace_.out.data(), nullptr,
        workspace_.ssd.staged.empty() ? nullptr : workspace_.ssd.staged.data()));
  }
  PQKV_RETURN_IF_ERROR(attention::check_output_storable(workspace_.out.data(), out.numel(),
                                                        config_.spec.head_dim, out.dtype));
  convert_from_float(workspace_.out.data(), out.numel(), out.data, out.dtype);
  return ok_status();
}

}  // namespace pqkv::engine

namespace pqkv::engine {

Status SequenceStateCpu::restore_index(int layer, const index::IndexSnapshot& snapshot,
                                       Stream /*stream*/) {
  const ModelSpec& spec = config_.spec;
  if (snapshot.num_tokens > kv_.length(layer)) {
    return Status::corruption("the saved index of layer " + std::to_string(layer) + " codes " +
                              std::to_string(snapshot.num_tokens) + " tokens but only " +
                              std::to_string(kv_.length(layer)) + " rows are stored");
  }
  PQKV_ASSIGN_OR_RETURN(auto index,
                        index::make_layer_index(Device::cpu(), spec.head_dim, spec.num_kv_heads,
                                                config_.options.pq, config_.options.selection));
  PQKV_RETURN_IF_ERROR(index->restore(snapshot, Stream::host()));
  indexes_[layer] = std::move(index);
  return encode_new_keys(layer);
}

}  // namespace pqkv::engine
