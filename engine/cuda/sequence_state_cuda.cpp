#include "engine/cuda/sequence_state_cuda.h"

#include <algorithm>
#include <functional>
#include <new>
#include <string>
#include <vector>

#include "attention/cuda/device_plan.cuh"
#include "core/cuda_check.h"
#include "core/cuda_handles.h"
#include "index/cuda/layer_index_cuda.h"
#include "storage/cuda/row_transfer_cuda.h"
#include "storage/cuda/storable_check_cuda.h"

namespace pqkv::engine {
namespace {

// Row-table room is reserved in steps of this many tokens (a table never
// moves between steps, so captured graphs stay valid while it has room).
constexpr int64_t kTableTokensStep = 1 << 17;

// Grows `buffer` to at least `bytes`, by half again, so a budget that creeps
// up a token per step reallocates rarely.
Status grow(gpu::DeviceBuffer& buffer, size_t bytes) {
  if (bytes <= buffer.bytes()) return ok_status();
  return buffer.reserve(std::max(bytes, buffer.bytes() + buffer.bytes() / 2));
}

// The spill settings of `config` with `before_spill` as the hook that runs
// before blocks leave DRAM.
storage::SpillConfig spill_with_hook(const SequenceStateConfig& config,
                                     std::function<Status()> before_spill) {
  storage::SpillConfig spill = config.spill;
  if (spill.enabled()) spill.before_spill = std::move(before_spill);
  return spill;
}

}  // namespace

SequenceStateCuda::SequenceStateCuda(const SequenceStateConfig& config)
    : config_(config),
      kv_(config.spec, config.arena, spill_with_hook(config, [this] { return wait_row_users(); })),
      layers_(config.spec.num_layers) {}

Status SequenceStateCuda::wait_row_users() const {
  // Every kernel that reads or writes this sequence's blocks is ordered
  // before one of these events: appends, steps and index builds.
  for (const Layer& l : layers_) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.appended.get()));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.rows_read.get()));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.build_read.get()));
  }
  return ok_status();
}

Status SequenceStateCuda::refuse_spilled_capture(int layer) const {
  return Status::failed_precondition(
      "layer " + std::to_string(layer) +
      " has rows spilled to disk: its decode step reads the selected positions on the host (a "
      "stream synchronisation) and cannot be captured in a CUDA graph; run its steps directly, or "
      "raise StoreOptions::dram_budget_bytes so that nothing spills");
}

Result<std::unique_ptr<SequenceStateCuda>> SequenceStateCuda::create(
    const SequenceStateConfig& config) {
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
  if (config.arena == nullptr || !config.arena->device_readable() || config.host_stream.host_only ||
      config.build_stream.host_only) {
    return Status::internal("a CUDA sequence needs the Store's pinned arena and streams");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config.device));
  std::unique_ptr<SequenceStateCuda> e(new SequenceStateCuda(config));
  PQKV_RETURN_IF_ERROR(e->init());
  return e;
}

Status SequenceStateCuda::init() {
  for (auto& layer : layers_) {
    PQKV_ASSIGN_OR_RETURN(layer.appended, gpu::make_event());
    PQKV_ASSIGN_OR_RETURN(layer.build_after, gpu::make_event());
    PQKV_ASSIGN_OR_RETURN(layer.rows_read, gpu::make_event());
    PQKV_ASSIGN_OR_RETURN(layer.build_read, gpu::make_event());
  }
  PQKV_ASSIGN_OR_RETURN(storable_report_,
                        gpu::PinnedBuffer::allocate(sizeof(storage::StorableReport)));
  *storable_report_.as<storage::StorableReport>() = {};
  PQKV_ASSIGN_OR_RETURN(output_report_,
                        gpu::PinnedBuffer::allocate(sizeof(attention::OutputReport)));
  *output_report_.as<attention::OutputReport>() = {};
  const cudaStream_t s = static_cast<cudaStream_t>(config_.host_stream.handle);
  PQKV_ASSIGN_OR_RETURN(lengths_, gpu::DeviceArray<int64_t>::allocate(config_.spec.num_layers, s));
  PQKV_ASSIGN_OR_RETURN(overflow_, gpu::DeviceArray<int32_t>::allocate(1, s));
  PQKV_RETURN_IF_ERROR(step_plan_.reserve(2 * sizeof(attention::DeviceStepPlan)));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(lengths_.get(), 0, lengths_.bytes(), s));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(overflow_.get(), 0, overflow_.bytes(), s));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return workspace_.init();
}

bool SequenceStateCuda::capturing(Stream stream) const {
  if (stream.host_only) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream_of(stream), &status) == cudaSuccess &&
         status == cudaStreamCaptureStatusActive;
}

Status SequenceStateCuda::sync_length(Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const cudaStream_t s = stream_of(stream);
  const int layers = config_.spec.num_layers;
  std::vector<int64_t> lengths(static_cast<size_t>(layers));
  int32_t overflow = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(lengths.data(), lengths_.get(), lengths_.bytes(), cudaMemcpyDeviceToHost));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(&overflow, overflow_.get(), sizeof(overflow), cudaMemcpyDeviceToHost));
  for (int layer = 0; layer < layers; ++layer) {
    const int64_t delta = lengths[layer] - kv_.length(layer);
    if (delta < 0) {
      return Status::internal("layer " + std::to_string(layer) + " holds " +
                              std::to_string(kv_.length(layer)) + " tokens on the host but only " +
                              std::to_string(lengths[layer]) + " on the device");
    }
    if (delta == 0) continue;
    // Within the reservation: the blocks exist, so this takes none.
    PQKV_RETURN_IF_ERROR(kv_.extend(layer, delta));
    if (layers_[layer].index != nullptr) PQKV_RETURN_IF_ERROR(layers_[layer].index->advance(delta));
  }
  if (overflow == 0) return ok_status();
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemset(overflow_.get(), 0, overflow_.bytes()));
  return Status::out_of_range(
      "replayed decode steps reached the " + std::to_string(reserved_tokens_) +
      " tokens reserved: the appends past it were dropped (those steps attended without their "
      "token); reserve() the longest generation before capturing");
}

Result<bool> SequenceStateCuda::lengths_behind(Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  if (stream.host_only) {
    // Replays may run on any stream of the device.
    PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  } else {
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_of(stream)));
  }
  std::vector<int64_t> lengths(static_cast<size_t>(config_.spec.num_layers));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(lengths.data(), lengths_.get(), lengths_.bytes(), cudaMemcpyDeviceToHost));
  for (int layer = 0; layer < config_.spec.num_layers; ++layer) {
    // Direct appends still in flight on other streams leave it behind, never ahead.
    if (lengths[static_cast<size_t>(layer)] > kv_.length(layer)) return true;
  }
  return false;
}

Status SequenceStateCuda::check_health() {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  // After the appends' streams pass their checks, the report in mapped host memory is final.
  for (const Layer& l : layers_)
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.appended.get()));
  const storage::StorableReport r = *storable_report_.as<storage::StorableReport>();
  if (r.found == 0) return take_output_report();
  return Status::invalid_argument(
      std::string(r.is_value ? "values" : "keys") + " appended to layer " +
      std::to_string(r.layer) + " hold " + std::to_string(r.value) + " at token " +
      std::to_string(r.token) + ", head " + std::to_string(r.head) + ", dim " +
      std::to_string(r.dim) + ", which is NaN, Inf or overflows " + dtype_name(config_.spec.dtype) +
      " storage; the sequence holds it and attention would spread it: drop the sequence and "
      "append finite keys and values");
}

Status SequenceStateCuda::check_fits() {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (layers_[l].index == nullptr) continue;
    if (Status fit = layers_[l].index->fit_status(); !fit.ok())
      return fit.with_context("the index of layer " + std::to_string(l));
  }
  return ok_status();
}

Status SequenceStateCuda::take_output_report() {
  auto* report = output_report_.as<attention::OutputReport>();
  if (report->found == 0) return ok_status();
  const attention::OutputReport r = *report;
  *report = {};
  return Status::invalid_argument(
      "a decode step of layer " + std::to_string(r.layer) + " gave " + std::to_string(r.value) +
      " at query head " + std::to_string(r.q_head) + ", dim " + std::to_string(r.dim) +
      ": its scores q . k / sqrt(head_dim) or its weighted sum of values passed fp32's range "
      "(or the bf16 output's); the stored keys and values are unchanged: scale the queries, "
      "keys or values down");
}

cudaStream_t SequenceStateCuda::stream_of(Stream stream) const {
  return static_cast<cudaStream_t>(stream.host_only ? config_.host_stream.handle : stream.handle);
}

Result<std::unique_ptr<index::LayerIndex>> SequenceStateCuda::make_index() const {
  const ModelSpec& spec = config_.spec;
  PQKV_ASSIGN_OR_RETURN(
      std::unique_ptr<index::LayerIndexCuda> made,
      index::LayerIndexCuda::create(config_.device, spec.head_dim, spec.num_kv_heads,
                                    config_.options.pq, config_.options.selection,
                                    static_cast<cudaStream_t>(config_.build_stream.handle)));
  return std::unique_ptr<index::LayerIndex>(std::move(made));
}

Status SequenceStateCuda::sync_table(int layer, cudaStream_t stream, int64_t room) {
  Layer& l = layers_[layer];
  const int64_t tokens = std::max(kv_.length(layer), room);
  const int64_t blocks = std::max(
      (tokens + storage::KvRowStore::kTokensPerBlock - 1) / storage::KvRowStore::kTokensPerBlock,
      kv_.num_blocks(layer));
  if (!l.table || l.table->block_capacity() < blocks) {
    const int64_t step_room = (tokens / kTableTokensStep + 1) * kTableTokensStep;
    PQKV_ASSIGN_OR_RETURN(auto table, storage::DeviceRowTable::create(kv_, layer, step_room));
    l.table = std::move(table);
  }
  return l.table->update(stream);
}

Status SequenceStateCuda::reserve(int64_t max_tokens, const attention::DecodePlan& plan) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const cudaStream_t s = static_cast<cudaStream_t>(config_.host_stream.handle);
  const std::vector<int64_t> blocks_before = kv_.block_counts();
  // With spilling on, the blocks are taken only when the DRAM budget holds
  // them all (captured appends need them; direct ones spill as they go).
  PQKV_RETURN_IF_ERROR(kv_.reserve_if_room(max_tokens));
  const Status status = reserve_device(max_tokens, plan, s);
  // All or nothing: the row blocks this call took go back to the DRAM
  // budget (the device tables drop their entries at their next update).
  if (!status.ok()) kv_.release_blocks_past(blocks_before);
  return status;
}

Status SequenceStateCuda::reserve_device(int64_t max_tokens, const attention::DecodePlan& plan,
                                         cudaStream_t s) {
  for (int layer = 0; layer < config_.spec.num_layers; ++layer) {
    PQKV_RETURN_IF_ERROR(sync_table(layer, s, max_tokens));
    Layer& l = layers_[layer];
    if (l.index != nullptr) PQKV_RETURN_IF_ERROR(l.index->reserve(max_tokens, Stream::cuda(s)));
  }
  PQKV_ASSIGN_OR_RETURN(auto resident, make_resident(plan));
  PQKV_ASSIGN_OR_RETURN(auto cache, make_cache(max_tokens, plan, s));
  PQKV_ASSIGN_OR_RETURN(auto hot_rows, make_hot_rows(max_tokens, s));
  PQKV_RETURN_IF_ERROR(workspace_.reserve(config_.spec, plan, DType::kF32, DType::kF32));
  // Staging for host tensors: one decode token's keys and values, and the
  // queries and outputs of a step.
  const ModelSpec& spec = config_.spec;
  const size_t row_elems = size_t{1} * spec.num_kv_heads * spec.head_dim;
  const size_t q_bytes = sizeof(float) * spec.num_q_heads * spec.head_dim;
  PQKV_RETURN_IF_ERROR(grow(keys_in_, sizeof(float) * row_elems));
  PQKV_RETURN_IF_ERROR(grow(values_in_, sizeof(float) * row_elems));
  PQKV_RETURN_IF_ERROR(grow(queries_in_, q_bytes));
  PQKV_RETURN_IF_ERROR(grow(out_, q_bytes));
  // The resident rows are copied from DRAM: a sink or window row that was
  // spilled (a window grown by the larger plan) cannot be.
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    if (!resident[layer] || kv_.blocks_spilled(static_cast<int>(layer)) == 0) continue;
    const storage::RowTableView host = kv_.host_table(static_cast<int>(layer));
    const tiering::ResidentShape shape = resident[layer]->view().shape;
    const int64_t length = kv_.length(static_cast<int>(layer));
    for (int64_t t = 0; t < length; t += storage::KvRowStore::kTokensPerBlock) {
      const int64_t last = std::min(t + storage::KvRowStore::kTokensPerBlock, length) - 1;
      const bool resident_block = t < shape.sink_slots || last >= length - shape.window_slots;
      if (resident_block && host.blocks[host.block_index(0, t)] == nullptr) {
        return Status::failed_precondition(
            "layer " + std::to_string(layer) +
            " has rows of its sink or recent window spilled to disk, which the resident rows "
            "would copy; reserve() the longest context before appending past the DRAM budget, "
            "or set SequenceOptions::resident_sink_window to false");
      }
    }
  }
  // Everything is taken: install it.
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    if (!resident[layer]) continue;
    Layer& l = layers_[layer];
    PQKV_RETURN_IF_ERROR(
        resident[layer]->write(l.table->view(), 0, kv_.length(static_cast<int>(layer)), s));
    l.resident = std::move(resident[layer]);
  }
  if (cache != nullptr) cache_ = std::move(cache);
  if (hot_rows != nullptr) {
    hot_rows_ = std::move(hot_rows);
    if (hot_stream_ == nullptr) {
      PQKV_ASSIGN_OR_RETURN(hot_stream_, gpu::make_ranked_stream(0, 1));
      PQKV_ASSIGN_OR_RETURN(hot_gathered_, gpu::make_event());
      PQKV_ASSIGN_OR_RETURN(hot_admitted_, gpu::make_event());
      workspace_.after_gather = hot_gathered_.get();
    }
  }
  PQKV_RETURN_IF_ERROR(grow_hot_spares());
  if (max_tokens >= reserved_tokens_) {
    reserved_tokens_ = max_tokens;
    reserved_plan_ = plan;
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return ok_status();
}

Result<std::vector<std::optional<tiering::ResidentRowsCuda>>> SequenceStateCuda::make_resident(
    const attention::DecodePlan& plan) const {
  std::vector<std::optional<tiering::ResidentRowsCuda>> made(layers_.size());
  if (!config_.options.resident_sink_window || config_.hbm_budget == nullptr) return made;
  const tiering::ResidentShape shape{plan.counts.sink, plan.counts.window};
  const auto covers = [&](const Layer& l) {
    return l.resident && l.resident->view().shape.sink_slots >= shape.sink_slots &&
           l.resident->view().shape.window_slots >= shape.window_slots;
  };
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    if (covers(layers_[layer])) continue;
    PQKV_ASSIGN_OR_RETURN(made[layer], tiering::ResidentRowsCuda::create(
                                           config_.spec.num_kv_heads, config_.spec.row_bytes(),
                                           shape, config_.hbm_budget));
  }
  return made;
}

Result<std::unique_ptr<tiering::BlockCacheCuda>> SequenceStateCuda::make_cache(
    int64_t max_tokens, const attention::DecodePlan& plan, cudaStream_t stream) const {
  std::unique_ptr<tiering::BlockCacheCuda> none;
  if (cache_ != nullptr || config_.copy_stream.host_only) return none;
  const tiering::BlockCacheOptions options = block_cache_for(config_, max_tokens);
  if (options.num_slots == 0 || options.tokens_per_block == 1) return none;
  tiering::BlockCacheCudaShape shape;
  shape.layers = config_.spec.num_layers;
  shape.kv_heads = config_.spec.num_kv_heads;
  shape.row_bytes = config_.spec.row_bytes();
  shape.max_tokens = max_tokens;
  shape.max_selected = std::max(plan.search_k, plan.counts.top_k);
  return tiering::BlockCacheCuda::create(options, shape,
                                         static_cast<cudaStream_t>(config_.copy_stream.handle),
                                         config_.hbm_budget, config_.cache_budget, stream);
}

Result<std::unique_ptr<tiering::HotRowsCuda>> SequenceStateCuda::make_hot_rows(
    int64_t max_tokens, cudaStream_t stream) const {
  std::unique_ptr<tiering::HotRowsCuda> none;
  if (hot_rows_ != nullptr) return none;
  const tiering::BlockCacheOptions options = block_cache_for(config_, max_tokens);
  if (options.num_slots == 0 || options.tokens_per_block != 1) return none;
  tiering::HotRowsShape shape;
  shape.layers = config_.spec.num_layers;
  shape.kv_heads = config_.spec.num_kv_heads;
  shape.row_bytes = config_.spec.row_bytes();
  shape.max_tokens = max_tokens;
  return tiering::HotRowsCuda::create(options, shape, config_.hbm_budget, config_.cache_budget,
                                      stream);
}

Status SequenceStateCuda::admit_hot_rows(const attention::DecodeStepInputs& in, bool replayed,
                                         cudaStream_t stream, unsigned long long capture_id) {
  tiering::HotRowsStep step;
  step.layer = in.layer;
  step.positions = workspace_.positions.as<int32_t>();
  step.rows = workspace_.rows.as<std::byte>();
  step.tokens = in.plan.tokens_per_head();
  step.length = in.plan.length;
  if (in.resident.rows != nullptr) {
    // The sink and window are resident: only the middle's entries are candidates.
    step.resident = in.resident.shape;
    step.first = in.plan.counts.sink;
    step.count = in.plan.tokens_per_head() - in.plan.counts.sink - in.plan.counts.window;
  }
  if (replayed) {
    step.device_tokens = &in.device_plan->tokens_per_head;
    step.device_length = &in.device_plan->length;
    if (in.resident.rows != nullptr) {
      step.device_first = &in.device_plan->sink;
      step.device_count = &in.device_plan->picked;
    }
  }
  // A captured step joins the previous captured step's policy here, after
  // its own attention: the next step writes the buffers that policy reads.
  if (replayed) PQKV_RETURN_IF_ERROR(join_hot_rows(stream, capture_id));
  // The policy reads the positions and rows the gather just wrote, on its
  // own stream, while `stream` goes on with the attention.
  const cudaStream_t hs = hot_stream_.get();
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(hs, hot_gathered_.get()));
  PQKV_RETURN_IF_ERROR(hot_rows_->after_gather(step, hs));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(hot_admitted_.get(), hs));
  if (!replayed) PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, hot_admitted_.get()));
  return ok_status();
}

Status SequenceStateCuda::join_hot_rows(cudaStream_t stream, unsigned long long capture_id) {
  if (hot_pending_capture_ != 0 && hot_pending_capture_ == capture_id)
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, hot_admitted_.get()));
  hot_pending_capture_ = 0;
  hot_pending_layer_ = -1;
  return ok_status();
}

Status SequenceStateCuda::end_hot_rows(int layer, cudaStream_t stream,
                                       unsigned long long capture_id) {
  if (layer == config_.spec.num_layers - 1) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, hot_admitted_.get()));
    hot_pending_capture_ = 0;
    hot_pending_layer_ = -1;
  } else {
    hot_pending_capture_ = capture_id;
    hot_pending_layer_ = layer;
  }
  std::swap(workspace_.positions, hot_positions_);
  std::swap(workspace_.rows, hot_rows_spare_);
  step_plan_slot_ ^= 1;
  return ok_status();
}

Status SequenceStateCuda::grow_hot_spares() {
  if (hot_rows_ == nullptr) return ok_status();
  PQKV_RETURN_IF_ERROR(hot_positions_.reserve(workspace_.positions.bytes()));
  return hot_rows_spare_.reserve(workspace_.rows.bytes());
}

Result<const void*> SequenceStateCuda::on_device(const TensorView& t, gpu::DeviceBuffer& staging,
                                                 cudaStream_t stream) {
  if (t.device.is_cuda()) return static_cast<const void*>(t.data);
  PQKV_RETURN_IF_ERROR(grow(staging, static_cast<size_t>(t.bytes())));
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(staging.data(), t.data, t.bytes(), cudaMemcpyHostToDevice, stream));
  return static_cast<const void*>(staging.data());
}

Status SequenceStateCuda::check_storable(int layer, const void* keys, const void* values,
                                         DType in_dtype, int64_t first, int64_t n,
                                         cudaStream_t stream) {
  storage::StorableCheckArgs check;
  check.keys = keys;
  check.values = values;
  check.in_dtype = in_dtype;
  check.row_dtype = config_.spec.dtype;
  check.n = n;
  check.kv_heads = config_.spec.num_kv_heads;
  check.head_dim = config_.spec.head_dim;
  check.layer = layer;
  check.first_token = first;
  check.report = storable_report_.as<storage::StorableReport>();
  return storage::check_storable_cuda(check, stream);
}

Status SequenceStateCuda::append_captured(int layer, const TensorView& keys,
                                          const TensorView& values, Stream stream) {
  if (reserved_tokens_ == 0) {
    return Status::failed_precondition(
        "an append captured in a CUDA graph writes into rows taken ahead of time: call "
        "Sequence::reserve(max_tokens) before capturing");
  }
  if (!keys.device.is_cuda() || !values.device.is_cuda()) {
    return Status::invalid_argument(
        "an append captured in a CUDA graph reads keys and values from device memory of " +
        config_.device.to_string() + " at each replay; got " + keys.describe() + " and " +
        values.describe());
  }
  if (kv_.num_blocks(layer) * storage::KvRowStore::kTokensPerBlock < reserved_tokens_) {
    return Status::failed_precondition(
        "an append captured in a CUDA graph writes into rows taken ahead of time, and the DRAM "
        "budget could not hold the " +
        std::to_string(reserved_tokens_) +
        " tokens reserved (a store that spills to disk then takes blocks as tokens arrive); "
        "append directly, or raise StoreOptions::dram_budget_bytes");
  }
  const cudaStream_t s = stream_of(stream);
  const int64_t n = keys.dim(0);
  int64_t* length = lengths_.get() + layer;
  Layer& l = layers_[layer];
  PQKV_RETURN_IF_ERROR(storage::write_rows_at_length_cuda(
      l.table->view(), keys.data, values.data, keys.dtype, n, length, reserved_tokens_, s));
  if (l.resident) {
    PQKV_RETURN_IF_ERROR(
        l.resident->write_at_device_position(l.table->view(), length, n, reserved_tokens_, s));
  }
  // The report names the token by the host-side length, which replays pass.
  PQKV_RETURN_IF_ERROR(
      check_storable(layer, keys.data, values.data, keys.dtype, kv_.length(layer), n, s));
  if (l.index != nullptr) {
    PQKV_RETURN_IF_ERROR(l.index->add_at_device_position(
        TensorView(keys.data, keys.dtype, config_.device,
                   {n, config_.spec.num_kv_heads, config_.spec.head_dim}),
        length, Stream::cuda(s)));
  }
  return storage::advance_length_cuda(length, n, reserved_tokens_, overflow_.get(), s);
}

Status SequenceStateCuda::append(int layer, const TensorView& keys, const TensorView& values,
                                 Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  if (capturing(stream)) return append_captured(layer, keys, values, stream);
  const cudaStream_t s = stream_of(stream);
  const int64_t n = keys.dim(0);
  const int64_t first = kv_.length(layer);
  PQKV_ASSIGN_OR_RETURN(const void* k, on_device(keys, keys_in_, s));
  PQKV_ASSIGN_OR_RETURN(const void* v, on_device(values, values_in_, s));
  Layer& l = layers_[layer];
  // With spilling on, a long append goes a block at a time, so the rows it
  // wrote first can leave DRAM to make room for the rest (the spill hook
  // waits for their writes: `appended` is recorded after each piece).
  const int64_t piece = config_.spill.enabled() ? storage::KvRowStore::kTokensPerBlock : n;
  const size_t token_bytes = static_cast<size_t>(config_.spec.num_kv_heads) *
                             config_.spec.head_dim * dtype_size(keys.dtype);
  for (int64_t i = 0; i < n; i += piece) {
    const int64_t m = std::min(piece, n - i);
    const Status extended = kv_.extend(layer, m);
    if (!extended.ok()) {
      // All or nothing: forget the pieces written (their blocks stay for the next append).
      kv_.truncate(layer, first);
      return extended;
    }
    PQKV_RETURN_IF_ERROR(sync_table(layer, s));
    PQKV_RETURN_IF_ERROR(storage::write_rows_cuda(
        l.table->view(), static_cast<const std::byte*>(k) + i * token_bytes,
        static_cast<const std::byte*>(v) + i * token_bytes, keys.dtype, first + i, m, s));
    if (l.resident) PQKV_RETURN_IF_ERROR(l.resident->write(l.table->view(), first + i, m, s));
    if (piece < n) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.appended.get(), s));
  }
  PQKV_RETURN_IF_ERROR(storage::advance_length_cuda(lengths_.get() + layer, n, 0, nullptr, s));
  PQKV_RETURN_IF_ERROR(check_storable(layer, k, v, keys.dtype, first, n, s));
  if (l.index != nullptr) {
    PQKV_RETURN_IF_ERROR(
        l.index->add(TensorView(k, keys.dtype, config_.device,
                                {n, config_.spec.num_kv_heads, config_.spec.head_dim}),
                     Stream::cuda(s)));
    // Large adds run on the index's build stream; the keys buffer must outlive them.
    PQKV_RETURN_IF_ERROR(l.index->wait_ready(Stream::cuda(s)));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.appended.get(), s));
  // Staged host input is reused by the next call: finish before returning.
  if (stream.host_only || !keys.device.is_cuda())
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return ok_status();
}

Status SequenceStateCuda::build_index(int layer, int64_t train_begin, Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  const int64_t n = length - train_begin;
  if (n <= 0) return ok_status();
  Layer& l = layers_[layer];
  PQKV_ASSIGN_OR_RETURN(auto made, make_index());
  index::LayerIndex* idx = made.get();
  // The build runs on the Store's low-priority build stream, after the rows
  // are written and after the caller's work so far (a host caller's is on
  // the Store's stream, already ordered by `appended`).
  const cudaStream_t bs = static_cast<cudaStream_t>(idx->background_stream().handle);
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(bs, l.appended.get()));
  if (!stream.host_only && stream_of(stream) != bs) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.build_after.get(), stream_of(stream)));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(bs, l.build_after.get()));
  }
  const int64_t row_elems = int64_t{spec.num_kv_heads} * spec.head_dim;
  gpu::DeviceArray<uint16_t> row_keys;
  gpu::DeviceArray<float> float_keys;
  const std::byte* keys = nullptr;
  DType keys_dtype = spec.dtype;
  if (kv_.blocks_spilled(layer) == 0) {
    PQKV_ASSIGN_OR_RETURN(row_keys, gpu::DeviceArray<uint16_t>::allocate(length * row_elems, bs));
    PQKV_RETURN_IF_ERROR(storage::read_keys_cuda(l.table->view(), 0, length, row_keys.get(), bs));
    keys = reinterpret_cast<const std::byte*>(row_keys.get());
  } else {
    // Some blocks are only on disk: the keys come from the host (spilled
    // blocks read back), as the same dtype-rounded values in fp32.
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(l.appended.get()));
    std::vector<float> host;
    try {
      host.resize(static_cast<size_t>(length * row_elems));
    } catch (const std::bad_alloc&) {
      return Status::resource_exhausted("out of host memory reading layer " +
                                        std::to_string(layer) + "'s keys for its index");
    }
    PQKV_RETURN_IF_ERROR(kv_.keys_as_float(layer, 0, length, host.data()));
    PQKV_ASSIGN_OR_RETURN(float_keys, gpu::DeviceArray<float>::allocate(length * row_elems, bs));
    // From pageable memory: returns once `host` is copied out.
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        float_keys.get(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice, bs));
    keys = reinterpret_cast<const std::byte*>(float_keys.get());
    keys_dtype = DType::kF32;
  }
  // The spill hook waits for the build's row reads.
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.build_read.get(), bs));
  const size_t token_bytes = static_cast<size_t>(row_elems) * dtype_size(keys_dtype);
  PQKV_RETURN_IF_ERROR(idx->train(TensorView(keys + train_begin * token_bytes, keys_dtype,
                                             config_.device, {n, spec.num_kv_heads, spec.head_dim}),
                                  config_.options.pq, Stream::cuda(bs)));
  PQKV_RETURN_IF_ERROR(idx->add(
      TensorView(keys, keys_dtype, config_.device, {length, spec.num_kv_heads, spec.head_dim}),
      Stream::cuda(bs)));
  // The key buffers are freed in stream order on `bs`, after the work above.
  l.index = std::move(made);
  return ok_status();
}

Status SequenceStateCuda::refit_index(int layer, int64_t train_begin, Stream stream,
                                      const index::LayerIndex::BackgroundRunner& /*run*/) {
  Layer& l = layers_[layer];
  if (l.index == nullptr) {
    return Status::failed_precondition("layer " + std::to_string(layer) +
                                       " has no index to refit yet");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const ModelSpec& spec = config_.spec;
  const int64_t length = kv_.length(layer);
  // As build_index: the stored (dtype-rounded) keys, read on the build
  // stream once the rows are written; the index orders its work after the
  // caller's.
  const cudaStream_t bs = static_cast<cudaStream_t>(l.index->background_stream().handle);
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(bs, l.appended.get()));
  const int64_t row_elems = int64_t{spec.num_kv_heads} * spec.head_dim;
  PQKV_ASSIGN_OR_RETURN(auto keys, gpu::DeviceArray<uint16_t>::allocate(length * row_elems, bs));
  PQKV_RETURN_IF_ERROR(storage::read_keys_cuda(l.table->view(), 0, length, keys.get(), bs));
  // `keys` is freed in stream order on `bs`, after the refit's work.
  return l.index->refit_on_device(TensorView(keys.get(), spec.dtype, config_.device,
                                             {length, spec.num_kv_heads, spec.head_dim}),
                                  train_begin, config_.options.pq, Stream::cuda(stream_of(stream)));
}

void SequenceStateCuda::drop_indexes() {
  for (auto& l : layers_)
    l.index.reset();
}

attention::DecodeStepInputs SequenceStateCuda::step_inputs(
    int layer, const attention::DecodePlan& plan) const {
  attention::DecodeStepInputs in;
  in.spec = &config_.spec;
  in.plan = plan;
  in.rows = layers_[layer].table->view();
  in.index = layers_[layer].index.get();
  in.aggregation = config_.options.aggregation;
  in.tiers = config_.tiers;
  if (layers_[layer].resident) in.resident = layers_[layer].resident->view();
  in.layer = layer;
  in.search_sm_share = search_sm_share();
  in.output_report = output_report_.as<attention::OutputReport>();
  if (cache_ != nullptr) in.cache = cache_->view(layer);
  if (hot_rows_ != nullptr) in.cache = hot_rows_->view(layer);
  if (kv_.blocks_spilled(layer) > 0) {
    in.spilled = kv_.spilled();
    in.host_rows = kv_.host_table(layer);
  }
  return in;
}

Status SequenceStateCuda::attend(int layer, const attention::DecodePlan& plan,
                                 const TensorView& queries, const TensorView& out, Stream stream,
                                 AttendTrace* trace) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const cudaStream_t s = stream_of(stream);
  if (queries.dtype == DType::kF16 || out.dtype == DType::kF16) {
    return Status::invalid_argument("the CUDA decode path takes fp32 or bf16 queries and outputs");
  }
  const bool captured = (reserved_tokens_ > 0 || config_.spill.enabled()) && capturing(stream);
  if (captured && kv_.blocks_spilled(layer) > 0) return refuse_spilled_capture(layer);
  // Without a reservation a captured step keeps its host counts and replays
  // that one step only.
  if (reserved_tokens_ > 0 && captured) {
    return attend_captured(layer, plan, queries, out, s, trace);
  }
  // With spilling, table entries of blocks that were spilled since (by
  // another layer's append) or read back change.
  const bool spilling = config_.spill.enabled() && !captured;
  if (spilling && layers_[layer].table) PQKV_RETURN_IF_ERROR(sync_table(layer, s));
  PQKV_ASSIGN_OR_RETURN(const void* q, on_device(queries, queries_in_, s));
  void* o = out.data;
  if (!out.device.is_cuda()) {
    PQKV_RETURN_IF_ERROR(grow(out_, static_cast<size_t>(out.bytes())));
    o = out_.data();
  }
  if (hot_rows_ != nullptr) {
    // A policy left running by a captured step belongs to a capture that has ended.
    PQKV_RETURN_IF_ERROR(join_hot_rows(s, 0));
  }
  PQKV_RETURN_IF_ERROR(workspace_.reserve(config_.spec, plan, queries.dtype, out.dtype));
  PQKV_RETURN_IF_ERROR(grow_hot_spares());
  if (cache_ != nullptr) PQKV_RETURN_IF_ERROR(cache_->before_step(layer, kv_.host_table(layer), s));
  const attention::DecodeStepInputs in = step_inputs(layer, plan);
  PQKV_RETURN_IF_ERROR(attention::cuda::run_decode_step_cuda(in, q, queries.dtype, o, out.dtype,
                                                             workspace_, s, trace));
  // The spill hook waits for the step's reads of the blocks.
  if (spilling) PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(layers_[layer].rows_read.get(), s));
  if (hot_rows_ != nullptr) {
    PQKV_RETURN_IF_ERROR(admit_hot_rows(in, /*replayed=*/false, s));
    if (trace != nullptr) {
      PQKV_ASSIGN_OR_RETURN(const int64_t hits, hot_rows_->last_hits(layer, s));
      attention::add_cache_hits(hits, config_.spec, trace);
    }
  }
  if (cache_ != nullptr) {
    PQKV_RETURN_IF_ERROR(cache_->after_step(layer, workspace_.selected.as<int32_t>(), plan.search_k,
                                            plan.length, s));
    if (trace != nullptr) PQKV_RETURN_IF_ERROR(add_trace_hits(layer, plan, in, trace));
    if (layer == config_.spec.num_layers - 1) cache_->end_step();
  }
  if (o != out.data) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data, o, out.bytes(), cudaMemcpyDeviceToHost, s));
  }
  // Host outputs and host callers: the call finishes before it returns.
  if (stream.host_only || !out.device.is_cuda()) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return take_output_report();
  }
  return ok_status();
}

Status SequenceStateCuda::add_trace_hits(int layer, const attention::DecodePlan& plan,
                                         const attention::DecodeStepInputs& in,
                                         AttendTrace* trace) const {
  const tiering::FetchPlan fetch = in.tiers->plan(attention::step_rows(plan), in.resident.shape);
  attention::add_cache_hits(cache_->hits(layer, trace->attended, fetch), config_.spec, trace);
  const tiering::BlockCacheHostTime time = cache_->take_host_time(layer);
  trace->fetch.cache_policy_us = time.policy_us;
  trace->fetch.cache_enqueue_us = time.enqueue_us;
  return ok_status();
}

Status SequenceStateCuda::attend_captured(int layer, const attention::DecodePlan& plan,
                                          const TensorView& queries, const TensorView& out,
                                          cudaStream_t stream, AttendTrace* trace) {
  if (trace != nullptr) {
    return Status::invalid_argument(
        "a decode step captured in a CUDA graph cannot fill a trace (its plan is made on the "
        "device at each replay); pass no trace");
  }
  if (!queries.device.is_cuda() || !out.device.is_cuda()) {
    return Status::invalid_argument(
        "a decode step captured in a CUDA graph reads its queries from and writes its output to "
        "device memory of " +
        config_.device.to_string() + "; got " + queries.describe() + " and " + out.describe());
  }
  Layer& l = layers_[layer];
  if (reserved_plan_.counts.top_k > 0 && l.index == nullptr) {
    return Status::failed_precondition(
        "capturing a decode step of layer " + std::to_string(layer) +
        " needs its index, and it has none yet (the prompt ended within the sink): run direct "
        "steps until the context passes the sink, then capture");
  }
  unsigned long long capture_id = 0;
  if (hot_rows_ != nullptr) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamGetCaptureInfo(stream, &capture, &capture_id));
    // This step's gather reads the table the policy left running may still write.
    if (hot_pending_layer_ == layer || hot_pending_capture_ != capture_id)
      PQKV_RETURN_IF_ERROR(join_hot_rows(stream, capture_id));
  }
  auto* device_plan = static_cast<attention::DeviceStepPlan*>(step_plan_.data()) + step_plan_slot_;
  PQKV_RETURN_IF_ERROR(attention::cuda::launch_device_plan(
      config_.options.budget, plan.prefill_length, lengths_.get() + layer, device_plan, stream));
  attention::DecodeStepInputs in = step_inputs(layer, reserved_plan_);
  in.device_plan = device_plan;
  PQKV_RETURN_IF_ERROR(attention::cuda::run_decode_step_cuda(
      in, queries.data, queries.dtype, out.data, out.dtype, workspace_, stream, nullptr));
  if (hot_rows_ == nullptr) return ok_status();
  PQKV_RETURN_IF_ERROR(admit_hot_rows(in, /*replayed=*/true, stream, capture_id));
  return end_hot_rows(layer, stream, capture_id);
}

Status SequenceStateCuda::select(int layer, const attention::DecodePlan& plan,
                                 const TensorView& queries, int32_t* positions,
                                 int64_t max_selected, bool positions_on_device, Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  const cudaStream_t s = stream_of(stream);
  const int kv_heads = config_.spec.num_kv_heads;
  const int64_t per_head = plan.tokens_per_head();
  if (queries.dtype == DType::kF16) {
    return Status::invalid_argument("the CUDA decode path takes fp32 or bf16 queries");
  }
  PQKV_ASSIGN_OR_RETURN(const void* q, on_device(queries, queries_in_, s));
  PQKV_RETURN_IF_ERROR(workspace_.reserve(config_.spec, plan, queries.dtype, DType::kF32));
  PQKV_RETURN_IF_ERROR(attention::cuda::plan_decode_step_cuda(step_inputs(layer, plan), q,
                                                              queries.dtype, workspace_, s));
  const size_t width = sizeof(int32_t) * per_head;
  const size_t pitch = sizeof(int32_t) * max_selected;
  if (positions_on_device) {
    // 0xFF bytes are -1 as int32: the padding, then the positions over it.
    if (max_selected > per_head) {
      PQKV_CUDA_RETURN_IF_ERROR(
          cudaMemset2DAsync(positions + per_head, pitch, 0xFF, pitch - width, kv_heads, s));
    }
    if (per_head > 0) {
      PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(positions, pitch, workspace_.positions.data(),
                                                  width, width, kv_heads, cudaMemcpyDeviceToDevice,
                                                  s));
    }
    if (stream.host_only || !queries.device.is_cuda())
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return ok_status();
  }
  if (per_head > 0) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(positions, pitch, workspace_.positions.data(),
                                                width, width, kv_heads, cudaMemcpyDeviceToHost, s));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  for (int h = 0; h < kv_heads; ++h)
    std::fill(positions + h * max_selected + per_head, positions + (h + 1) * max_selected, -1);
  return ok_status();
}

Status SequenceStateCuda::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                                       Stream stream) {
  // attend() below enters the device.
  const int64_t length = kv_.length(layer);
  const attention::DecodePlan plan =
      attention::plan_decode_step(BudgetPolicy::everything(), length, length);
  return attend(layer, plan, queries, out, stream, nullptr);
}

Status SequenceStateCuda::restore_index(int layer, const index::IndexSnapshot& snapshot,
                                        Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(config_.device));
  if (snapshot.num_tokens != kv_.length(layer)) {
    return Status::corruption("the saved index of layer " + std::to_string(layer) + " codes " +
                              std::to_string(snapshot.num_tokens) + " tokens but " +
                              std::to_string(kv_.length(layer)) + " rows are stored");
  }
  PQKV_ASSIGN_OR_RETURN(auto made, make_index());
  PQKV_RETURN_IF_ERROR(made->restore(snapshot, Stream::cuda(stream_of(stream))));
  layers_[layer].index = std::move(made);
  return ok_status();
}

}  // namespace pqkv::engine
