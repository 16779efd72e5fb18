#include "index/cuda/layer_index_cuda.h"

#include <algorithm>
#include <climits>
#include <numeric>
#include <random>
#include <string>

#include "core/cuda_check.h"
#include "index/cuda/layer_index_cuda_refit.h"
#include "index/cuda/pq_encode.cuh"
#include "index/cuda/pq_kmeans.cuh"
#include "index/cuda/sq_scan.cuh"
#include "index/key_range.h"

namespace pqkv::index {
namespace {

// The first `count` entries of a seeded random permutation of [0, n).
std::vector<int64_t> sample_without_replacement(int64_t n, int64_t count, std::mt19937_64& rng) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  for (int64_t i = 0; i < count; ++i) {
    std::uniform_int_distribution<int64_t> pick(i, n - 1);
    std::swap(v[i], v[pick(rng)]);
  }
  v.resize(static_cast<size_t>(count));
  return v;
}

// Bytes of one (token, KV head) code.
int code_size_of(KeyCode code, const PqShape& shape) {
  switch (code) {
    case KeyCode::kPq:
      return shape.m;
    case KeyCode::kInt8:
      return shape.head_dim;
    case KeyCode::kInt4:
      return shape.head_dim / 2;
    case KeyCode::kExact:
      break;
  }
  return shape.head_dim * static_cast<int>(sizeof(float));
}

// The workspace as a search held to `share` of the SMs sees it: the
// persistent search sizes its grid from sm_count (SearchRequest::sm_share).
cuda::SearchWorkspaceView shared_view(cuda::SearchWorkspaceView view, float share) {
  if (share > 0.0f && share < 1.0f)
    view.sm_count = std::max(1, static_cast<int>(static_cast<float>(view.sm_count) * share));
  return view;
}

cuda::KeySource key_source(const TensorView& keys) {
  return {keys.data, keys.dtype, static_cast<int>(keys.dim(1)), static_cast<int>(keys.dim(2))};
}

}  // namespace

Result<std::unique_ptr<LayerIndexCuda>> LayerIndexCuda::create(const Device& device,
                                                               const PqShape& shape, int kv_heads) {
  return create_pq(device, shape, kv_heads, nullptr);
}

Result<std::unique_ptr<LayerIndexCuda>> LayerIndexCuda::create_pq(const Device& device,
                                                                  const PqShape& shape,
                                                                  int kv_heads,
                                                                  cudaStream_t build_stream) {
  if (!device.is_cuda()) {
    return Status::invalid_argument("LayerIndexCuda needs a CUDA device, got " +
                                    device.to_string());
  }
  PQKV_RETURN_IF_ERROR(check_device_usable(device));
  PQKV_RETURN_IF_ERROR(shape.validate());
  if (kv_heads < 1) {
    return Status::invalid_argument("a layer index needs at least one KV head, got " +
                                    std::to_string(kv_heads));
  }
  if (shape.dsub() > cuda::kMaxSupportedDsub) {
    return Status::unimplemented(
        "the CUDA index handles sub-spaces of at most " + std::to_string(cuda::kMaxSupportedDsub) +
        " dims, got dsub=" + std::to_string(shape.dsub()) + "; use more sub-spaces");
  }
  std::unique_ptr<LayerIndexCuda> index(
      new LayerIndexCuda(device, shape, kv_heads, SelectionConfig::pq()));
  PQKV_RETURN_IF_ERROR(index->init(build_stream));
  return std::move(index);
}

Result<std::unique_ptr<LayerIndexCuda>> LayerIndexCuda::create(const Device& device, int head_dim,
                                                               int kv_heads, const PqConfig& pq,
                                                               const SelectionConfig& selection) {
  return create(device, head_dim, kv_heads, pq, selection, nullptr);
}

Result<std::unique_ptr<LayerIndexCuda>> LayerIndexCuda::create(const Device& device, int head_dim,
                                                               int kv_heads, const PqConfig& pq,
                                                               const SelectionConfig& selection,
                                                               cudaStream_t build_stream) {
  PQKV_RETURN_IF_ERROR(selection.validate());
  if (selection.two_stage()) {
    SelectionConfig first;
    first.code = selection.code;
    PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCuda> index,
                          create(device, head_dim, kv_heads, pq, first, build_stream));
    index->selection_ = selection;
    PQKV_RETURN_IF_ERROR(index->init_rerank(pq));
    return std::move(index);
  }
  if (selection.code == KeyCode::kPq) {
    PQKV_RETURN_IF_ERROR(pq.validate(head_dim));
    return create_pq(device, PqShape::from_config(head_dim, pq), kv_heads, build_stream);
  }
  if (!device.is_cuda()) {
    return Status::invalid_argument("LayerIndexCuda needs a CUDA device, got " +
                                    device.to_string());
  }
  const cuda::SqGeometry geo{kv_heads, head_dim,
                             selection.code == KeyCode::kInt8   ? 8
                             : selection.code == KeyCode::kInt4 ? 4
                                                                : cuda::kExactBits};
  if (const Status s = cuda::check_sq_geometry(geo); !s.ok()) {
    return Status::unimplemented("the CUDA index cannot score '" + selection.to_string() +
                                 "' keys here: " + s.message());
  }
  PQKV_RETURN_IF_ERROR(check_device_usable(device));
  std::unique_ptr<LayerIndexCuda> index(
      new LayerIndexCuda(device, PqShape{head_dim, 0, 0}, kv_heads, selection));
  PQKV_RETURN_IF_ERROR(index->init(build_stream));
  return std::move(index);
}

LayerIndexCuda::LayerIndexCuda(const Device& device, const PqShape& shape, int kv_heads,
                               const SelectionConfig& selection)
    : device_(device),
      shape_(shape),
      selection_(selection),
      kv_heads_(kv_heads),
      code_size_(code_size_of(selection.code, shape)) {}

const PqShape& LayerIndexCuda::shape() const {
  return !is_pq() && rerank_ != nullptr && rerank_->is_pq() ? rerank_->shape_ : shape_;
}

int64_t LayerIndexCuda::code_bytes_per_token() const {
  return code_size_ + (rerank_ != nullptr ? rerank_->code_size_ : 0);
}

bool LayerIndexCuda::trained() const {
  return trained_ && (rerank_ == nullptr || rerank_->trained_);
}

PqShape LayerIndexCuda::lut_shape() const {
  if (is_pq()) return shape_;
  if (rerank_ != nullptr && rerank_->is_pq()) return rerank_->shape_;
  return PqShape{shape_.head_dim, 0, 0};
}

Result<cuda::SearchWorkspace> LayerIndexCuda::make_workspace(int64_t capacity,
                                                             cudaStream_t stream) const {
  const PqShape lut = lut_shape();
  const bool pq = lut.m > 0;
  return cuda::SearchWorkspace::allocate(kv_heads_, pq ? lut.m : 1, pq ? lut.ksub() : 1,
                                         rerank_stage_ ? 0 : capacity, stream);
}

Status LayerIndexCuda::init_rerank(const PqConfig& pq) {
  SelectionConfig second;
  second.code = selection_.rerank;
  PQKV_ASSIGN_OR_RETURN(rerank_,
                        create(device_, shape_.head_dim, kv_heads_, pq, second, build_stream_));
  rerank_->rerank_stage_ = true;
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  // A PQ rerank after a scalar first stage builds its LUTs in this workspace.
  PQKV_ASSIGN_OR_RETURN(workspace_, make_workspace(capacity_, build_stream_));
  PQKV_ASSIGN_OR_RETURN(pool_ranges_,
                        gpu::DeviceArray<DeviceSearchRange>::allocate(2, build_stream_));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ready_.get(), build_stream_));
  return ok_status();
}

int LayerIndexCuda::sq_bits() const {
  switch (selection_.code) {
    case KeyCode::kInt8:
      return 8;
    case KeyCode::kInt4:
      return 4;
    default:
      return cuda::kExactBits;
  }
}

LayerIndexCuda::~LayerIndexCuda() {
  gpu::ScopedDevice guard;
  // The index's last change, not the whole build stream: a borrowed stream
  // also carries other indexes' builds.
  if (guard.enter(device_).ok() && ready_ != nullptr) cudaEventSynchronize(ready_.get());
}

Status LayerIndexCuda::init(cudaStream_t build_stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  if (build_stream == nullptr) {
    PQKV_ASSIGN_OR_RETURN(owned_stream_, gpu::make_low_priority_stream());
    build_stream = owned_stream_.get();
  }
  build_stream_ = build_stream;
  PQKV_ASSIGN_OR_RETURN(ready_, gpu::make_event());
  PQKV_ASSIGN_OR_RETURN(caller_done_, gpu::make_event());
  PQKV_ASSIGN_OR_RETURN(build_done_, gpu::make_event());
  cudaStream_t s = build_stream_;
  if (is_pq()) {
    PQKV_ASSIGN_OR_RETURN(objective_,
                          gpu::DeviceArray<double>::allocate(int64_t{kv_heads_} * shape_.m, s));
    PQKV_ASSIGN_OR_RETURN(
        workspace_, cuda::SearchWorkspace::allocate(kv_heads_, shape_.m, shape_.ksub(), 0, s));
  } else {
    const int64_t d = shape_.head_dim;
    if (sq_bits() != cuda::kExactBits) {
      PQKV_ASSIGN_OR_RETURN(scale_, gpu::DeviceArray<float>::allocate(kv_heads_ * d, s));
      PQKV_ASSIGN_OR_RETURN(offset_, gpu::DeviceArray<float>::allocate(kv_heads_ * d, s));
    }
    PQKV_ASSIGN_OR_RETURN(tables_, gpu::DeviceArray<float>::allocate(
                                       int64_t{kv_heads_} * cuda::kMaxGroup * (d + 1), s));
    // No LUTs: the scans read the tables above.
    PQKV_ASSIGN_OR_RETURN(workspace_, cuda::SearchWorkspace::allocate(kv_heads_, 1, 1, 0, s));
    // Exact keys are their own code: nothing to fit.
    trained_ = sq_bits() == cuda::kExactBits;
  }
  PQKV_RETURN_IF_ERROR(init_drift(s));
  PQKV_ASSIGN_OR_RETURN(fit_report_, gpu::PinnedBuffer::allocate(sizeof(cuda::KeyFitReport)));
  *fit_report_.as<cuda::KeyFitReport>() = {};
  if (is_pq()) {
    PQKV_ASSIGN_OR_RETURN(fit_scratch_, gpu::DeviceArray<uint32_t>::allocate(kv_heads_, s));
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ready_.get(), build_stream_));
  return ok_status();
}

Status LayerIndexCuda::fit_status() const {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ready_.get()));
  const cuda::KeyFitReport r = *fit_report_.as<cuda::KeyFitReport>();
  if (r.found != 0 && r.pq != 0) return pq_key_range_error(r.kv_head, r.largest);
  if (r.found != 0) return scalar_key_range_error(sq_bits(), r.kv_head, r.channel, r.lo, r.hi);
  return rerank_ != nullptr ? rerank_->fit_status() : ok_status();
}

Result<cudaStream_t> LayerIndexCuda::caller_stream(Stream stream) const {
  if (stream.host_only) {
    return Status::invalid_argument(
        "the CUDA index enqueues its work on a CUDA stream; pass "
        "Stream::cuda(stream), not Stream::host()");
  }
  return static_cast<cudaStream_t>(stream.handle);
}

Status LayerIndexCuda::wait_ready(Stream stream) const {
  if (stream.host_only) {
    return Status::invalid_argument(
        "wait_ready needs a CUDA stream of the index's device, got a host stream");
  }
  return wait_ready(static_cast<cudaStream_t>(stream.handle));
}

Status LayerIndexCuda::wait_ready(cudaStream_t stream) const {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  // Inside a capture the wait becomes an event-wait node, checked at each replay.
  const unsigned flags =
      capture == cudaStreamCaptureStatusActive ? cudaEventWaitExternal : cudaEventWaitDefault;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, ready_.get(), flags));
  if (rerank_ != nullptr) PQKV_RETURN_IF_ERROR(rerank_->wait_ready(stream));
  return ok_status();
}

Status LayerIndexCuda::record_ready(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capture));
  // Inside a capture the record becomes an event-record node run at each
  // replay: ready_ stays an ordinary event that direct calls after the
  // capture can wait on (an event recorded into a capture cannot be).
  const unsigned flags =
      capture == cudaStreamCaptureStatusActive ? cudaEventRecordExternal : cudaEventRecordDefault;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecordWithFlags(ready_.get(), stream, flags));
  return ok_status();
}

Status LayerIndexCuda::note_build() {
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(build_done_.get(), build_stream_));
  build_pending_ = true;
  return ok_status();
}

Result<bool> LayerIndexCuda::build_in_flight() {
  if (!build_pending_) return false;
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  const cudaError_t query = cudaEventQuery(build_done_.get());
  if (query == cudaErrorNotReady) return true;
  PQKV_CUDA_RETURN_IF_ERROR(query);
  build_pending_ = false;
  return false;
}

Result<float> LayerIndexCuda::search_share(float requested, cudaStream_t caller) {
  if (requested <= kBuildOverlapSmShare || !build_pending_) return requested;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(caller, &capture));
  // A graph keeps what it captured: the caller's share (layer_index_cuda.h).
  if (capture == cudaStreamCaptureStatusActive) return requested;
  // install_refit has just seen this refit's work not done.
  if (refit_ != nullptr) return kBuildOverlapSmShare;
  PQKV_ASSIGN_OR_RETURN(const bool in_flight, build_in_flight());
  return in_flight ? kBuildOverlapSmShare : requested;
}

Status LayerIndexCuda::build_after(cudaStream_t caller) {
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(caller_done_.get(), caller));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(build_stream_, caller_done_.get(), 0));
  // Changes made on caller streams are ordered by ready_.
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(build_stream_, ready_.get(), 0));
  return ok_status();
}

Status LayerIndexCuda::check_keys(const TensorView& keys, const char* what) const {
  PQKV_RETURN_IF_ERROR(keys.expect_shape(what, {-1, kv_heads_, shape_.head_dim}));
  if (keys.device != device_) {
    return Status::invalid_argument(std::string(what) + " are " + keys.describe() +
                                    "; the CUDA index on " + device_.to_string() +
                                    " reads keys from that device's memory");
  }
  if (keys.numel() > 0) {
    PQKV_RETURN_IF_ERROR(gpu::expect_device_pointer(keys.data, device_.index, what));
  }
  return ok_status();
}

Status LayerIndexCuda::grow(int64_t tokens, cudaStream_t caller) {
  if (tokens <= capacity_) return ok_status();
  if (tokens - 1 > INT32_MAX) {
    return Status::out_of_range("the index would hold " + std::to_string(tokens) +
                                " tokens, past the int32 positions search returns; split the "
                                "context");
  }
  const int64_t wanted = std::max(tokens, capacity_ + capacity_ / 2);
  const int64_t capacity = (wanted + kCapacityChunk - 1) / kCapacityChunk * kCapacityChunk;
  PQKV_RETURN_IF_ERROR(build_after(caller));
  cudaStream_t s = build_stream_;
  const int64_t size = code_size_;
  PQKV_ASSIGN_OR_RETURN(
      auto codes, gpu::DeviceArray<uint8_t>::allocate(int64_t{kv_heads_} * capacity * size, s));
  if (num_tokens_ > 0) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(codes.get(), capacity * size, codes_.get(),
                                                capacity_ * size, num_tokens_ * size, kv_heads_,
                                                cudaMemcpyDeviceToDevice, s));
  }
  PQKV_ASSIGN_OR_RETURN(auto workspace, make_workspace(capacity, s));
  gpu::DeviceArray<int32_t> candidates;
  if (rerank_ != nullptr) {
    PQKV_ASSIGN_OR_RETURN(candidates,
                          gpu::DeviceArray<int32_t>::allocate(int64_t{kv_heads_} * capacity, s));
  }
  codes_ = std::move(codes);
  workspace_ = std::move(workspace);
  candidates_ = std::move(candidates);
  capacity_ = capacity;
  PQKV_RETURN_IF_ERROR(record_ready(s));
  PQKV_RETURN_IF_ERROR(note_build());
  if (rerank_ != nullptr) PQKV_RETURN_IF_ERROR(rerank_->grow(tokens, caller));
  return ok_status();
}

Status LayerIndexCuda::reserve(int64_t tokens, Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  return grow(tokens, caller);
}

Status LayerIndexCuda::encode(const TensorView& keys, int64_t first_token, cudaStream_t stream,
                              const int64_t* first_position) {
  return encode_with(live_codec(), codes_.get(), capacity_, keys, first_token, stream,
                     first_position);
}

Status LayerIndexCuda::encode_with(const CodecView& codec, uint8_t* codes, int64_t capacity,
                                   const TensorView& keys, int64_t first_token, cudaStream_t stream,
                                   const int64_t* first_position) const {
  if (!is_pq()) {
    cuda::SqEncodeArgs sq;
    sq.geo = {kv_heads_, shape_.head_dim, sq_bits()};
    sq.keys = keys.data;
    sq.dtype = keys.dtype;
    sq.n = keys.dim(0);
    sq.scale = codec.scale;
    sq.offset = codec.offset;
    sq.codes = codes;
    sq.head_stride = capacity * code_size_;
    sq.first_token = first_token;
    sq.first_position = first_position;
    sq.max_tokens = capacity;
    return cuda::launch_sq_encode(sq, stream);
  }
  cuda::EncodeArgs args;
  args.first_position = first_position;
  args.max_tokens = capacity;
  args.geo = {kv_heads_, shape_.head_dim, shape_.m, shape_.ksub()};
  args.keys = key_source(keys);
  args.n = keys.dim(0);
  args.centroids = codec.centroids;
  args.codes = codes;
  args.head_stride = capacity * shape_.m;
  args.first_token = first_token;
  return cuda::launch_encode(args, stream);
}

Status LayerIndexCuda::install(gpu::DeviceArray<float>&& centroids) {
  // Codes made with the old codebook mean nothing under the new one; the
  // owner of the keys adds them again (layer_index.h).
  centroids_ = std::move(centroids);
  num_tokens_ = 0;
  trained_ = true;
  return ok_status();
}

Status LayerIndexCuda::train(const TensorView& keys, const PqConfig& config, Stream stream) {
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  if (is_pq()) PQKV_RETURN_IF_ERROR(shape_.check_config(config));
  if (rerank_ != nullptr && rerank_->is_pq())
    PQKV_RETURN_IF_ERROR(rerank_->shape_.check_config(config));
  PQKV_RETURN_IF_ERROR(check_keys(keys, "training keys"));
  const int64_t n = keys.dim(0);
  if (n < 1) return Status::invalid_argument("training needs at least one key, got none");
  drop_refit("");
  PQKV_RETURN_IF_ERROR(build_after(caller));
  cudaStream_t s = build_stream_;
  if (!is_pq()) {
    PQKV_RETURN_IF_ERROR(fit_scales(keys, s));
    PQKV_RETURN_IF_ERROR(start_drift(keys, s));
    PQKV_RETURN_IF_ERROR(record_ready(s));
  } else {
    PQKV_ASSIGN_OR_RETURN(auto centroids,
                          gpu::DeviceArray<float>::allocate(
                              int64_t{kv_heads_} * shape_.m * shape_.ksub() * shape_.dsub(), s));
    PQKV_RETURN_IF_ERROR(fit_pq(keys, config, centroids.get(), objective_.get(), s));
    PQKV_RETURN_IF_ERROR(install(std::move(centroids)));
    objective_from_training_ = true;
    PQKV_RETURN_IF_ERROR(start_drift(keys, s));
    PQKV_RETURN_IF_ERROR(record_ready(s));
  }
  PQKV_RETURN_IF_ERROR(note_build());
  if (rerank_ != nullptr) PQKV_RETURN_IF_ERROR(rerank_->train(keys, config, stream));
  return ok_status();
}

Status LayerIndexCuda::fit_pq(const TensorView& keys, const PqConfig& config, float* centroids,
                              double* objective, cudaStream_t s) {
  const int64_t n = keys.dim(0);
  const int ksub = shape_.ksub();

  // Rows to learn from and initial centroids, drawn on the host from the seed.
  std::mt19937_64 rng(config.seed);
  const int64_t cap = int64_t{config.max_train_points_per_centroid} * ksub;
  const int64_t n_train = config.max_train_points_per_centroid > 0 ? std::min(n, cap) : n;
  std::vector<int64_t> rows;
  if (n_train < n) rows = sample_without_replacement(n, n_train, rng);
  std::vector<int32_t> init(static_cast<size_t>(ksub));
  if (n_train <= ksub) {
    // Nothing to cluster: every centroid is a key, as in the CPU backend.
    for (int c = 0; c < ksub; ++c)
      init[c] = static_cast<int32_t>(c % n_train);
  } else {
    const std::vector<int64_t> perm = sample_without_replacement(n_train, ksub, rng);
    for (int c = 0; c < ksub; ++c)
      init[c] = static_cast<int32_t>(perm[c]);
  }

  PQKV_ASSIGN_OR_RETURN(auto rows_dev,
                        gpu::DeviceArray<int64_t>::allocate(int64_t(rows.size()), s));
  PQKV_ASSIGN_OR_RETURN(auto init_dev, gpu::DeviceArray<int32_t>::allocate(ksub, s));
  // Pageable sources: the copies have staged them by the time they return.
  if (!rows.empty()) {
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(rows_dev.get(), rows.data(), rows_dev.bytes(), cudaMemcpyHostToDevice, s));
  }
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(init_dev.get(), init.data(), init_dev.bytes(), cudaMemcpyHostToDevice, s));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(fit_report_.data(), 0, sizeof(cuda::KeyFitReport), s));
  PQKV_RETURN_IF_ERROR(cuda::launch_pq_key_range(keys.data, keys.dtype, n, kv_heads_,
                                                 shape_.head_dim, fit_scratch_.get(),
                                                 fit_report_.as<cuda::KeyFitReport>(), s));
  cuda::KmeansArgs km;
  km.geo = {kv_heads_, shape_.head_dim, shape_.m, ksub};
  km.keys = key_source(keys);
  km.train_rows = rows.empty() ? nullptr : rows_dev.get();
  km.n_train = n_train;
  km.init_rows = init_dev.get();
  km.iters = n_train <= ksub ? 0 : config.kmeans_iters;
  km.centroids = centroids;
  PQKV_RETURN_IF_ERROR(cuda::launch_kmeans(km, s));

  // The objective over every key, as the CPU backend reports it.
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(objective, 0, sizeof(double) * kv_heads_ * shape_.m, s));
  cuda::EncodeArgs measure;
  measure.geo = km.geo;
  measure.keys = km.keys;
  measure.n = n;
  measure.centroids = centroids;
  measure.objective = objective;
  return cuda::launch_encode(measure, s);
}

Status LayerIndexCuda::fit_scales(const TensorView& keys, cudaStream_t stream) {
  if (sq_bits() != cuda::kExactBits) {
    cuda::SqFitArgs fit;
    fit.geo = {kv_heads_, shape_.head_dim, sq_bits()};
    fit.keys = keys.data;
    fit.dtype = keys.dtype;
    fit.n = keys.dim(0);
    fit.scale = scale_.get();
    fit.offset = offset_.get();
    fit.report = fit_report_.as<cuda::KeyFitReport>();
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(fit.report, 0, sizeof(cuda::KeyFitReport), stream));
    PQKV_RETURN_IF_ERROR(cuda::launch_sq_fit(fit, stream));
  }
  // As a new codebook does, new scales drop the codes made with the old ones.
  num_tokens_ = 0;
  trained_ = true;
  return ok_status();
}

Status LayerIndexCuda::set_codebook(const LayerCodebook& codebook, Stream stream) {
  if (!is_pq() || rerank_ != nullptr) {
    return Status::failed_precondition(
        "set_codebook installs a PQ codebook; this index scores "
        "with '" +
        selection_.to_string() + "': train it instead");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  PQKV_RETURN_IF_ERROR(codebook.check_fits(shape_, kv_heads_));
  stop_drift();
  PQKV_RETURN_IF_ERROR(build_after(caller));
  cudaStream_t s = build_stream_;
  PQKV_ASSIGN_OR_RETURN(auto centroids,
                        gpu::DeviceArray<float>::allocate(codebook.centroids.size(), s));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(centroids.get(), codebook.centroids.data(),
                                            centroids.bytes(), cudaMemcpyHostToDevice, s));
  PQKV_RETURN_IF_ERROR(install(std::move(centroids)));
  set_objective_ = codebook.objective;
  objective_from_training_ = false;
  PQKV_RETURN_IF_ERROR(record_ready(s));
  return note_build();
}

Result<LayerCodebook> LayerIndexCuda::codebook() const {
  if (!is_pq() && rerank_ != nullptr && rerank_->is_pq()) return rerank_->codebook();
  if (!is_pq()) {
    return Status::failed_precondition("the index scores with '" + selection_.to_string() +
                                       "' and has no PQ codebook");
  }
  if (!trained_) {
    return Status::failed_precondition("the index has no codebook yet: call train or set_codebook");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  LayerCodebook out;
  out.shape = shape_;
  out.num_kv_heads = kv_heads_;
  out.centroids.resize(static_cast<size_t>(centroids_.size()));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ready_.get()));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.centroids.data(), centroids_.get(), centroids_.bytes(),
                                       cudaMemcpyDeviceToHost));
  if (objective_from_training_) {
    out.objective.resize(static_cast<size_t>(objective_.size()));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.objective.data(), objective_.get(), objective_.bytes(),
                                         cudaMemcpyDeviceToHost));
  } else {
    out.objective = set_objective_;
  }
  return out;
}

Status LayerIndexCuda::add(const TensorView& keys, Stream stream) {
  if (!trained_) {
    return Status::failed_precondition(
        "add needs a trained index to encode keys: call train or set_codebook first");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  PQKV_RETURN_IF_ERROR(check_keys(keys, "keys"));
  const int64_t n = keys.dim(0);
  if (n == 0) return ok_status();
  PQKV_RETURN_IF_ERROR(install_refit(caller));
  if (num_tokens_ + n > capacity_) {
    const std::string why =
        "the index grew past the " + std::to_string(capacity_) +
        " tokens reserved while a refit was built, which dropped it (a later append starts "
        "another); reserve() the longest context so that refits finish";
    drop_refit(why);
    // grow() below grows the rerank stage too, before its own add would see it.
    if (rerank_ != nullptr) rerank_->drop_refit(why);
  }
  PQKV_RETURN_IF_ERROR(grow(num_tokens_ + n, caller));
  if (n <= kCallerStreamAddMax) {
    PQKV_RETURN_IF_ERROR(wait_ready(caller));
    PQKV_RETURN_IF_ERROR(encode(keys, num_tokens_, caller));
    PQKV_RETURN_IF_ERROR(after_add(keys, num_tokens_, nullptr, caller));
    PQKV_RETURN_IF_ERROR(record_ready(caller));
  } else {
    PQKV_RETURN_IF_ERROR(build_after(caller));
    PQKV_RETURN_IF_ERROR(encode(keys, num_tokens_, build_stream_));
    PQKV_RETURN_IF_ERROR(after_add(keys, num_tokens_, nullptr, build_stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(ready_.get(), build_stream_));
    PQKV_RETURN_IF_ERROR(note_build());
  }
  num_tokens_ += n;
  if (rerank_ != nullptr) PQKV_RETURN_IF_ERROR(rerank_->add(keys, stream));
  return ok_status();
}

Status LayerIndexCuda::add_at_device_position(const TensorView& keys,
                                              const int64_t* device_position, Stream stream) {
  if (!trained_) {
    return Status::failed_precondition(
        "add needs a trained index to encode keys: call train or set_codebook first");
  }
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  PQKV_RETURN_IF_ERROR(check_keys(keys, "keys"));
  if (device_position == nullptr) {
    return Status::invalid_argument("add_at_device_position needs a device position, got null");
  }
  const int64_t n = keys.dim(0);
  if (n > capacity_) {
    return Status::failed_precondition("add_at_device_position of " + std::to_string(n) +
                                       " keys passes the " + std::to_string(capacity_) +
                                       " tokens reserved; reserve() the largest context first");
  }
  if (n == 0) return ok_status();
  PQKV_RETURN_IF_ERROR(wait_ready(caller));
  PQKV_RETURN_IF_ERROR(encode(keys, 0, caller, device_position));
  PQKV_RETURN_IF_ERROR(after_add(keys, 0, device_position, caller));
  PQKV_RETURN_IF_ERROR(record_ready(caller));
  if (rerank_ != nullptr)
    PQKV_RETURN_IF_ERROR(rerank_->add_at_device_position(keys, device_position, stream));
  return ok_status();
}

Status LayerIndexCuda::advance(int64_t n) {
  if (n < 0 || num_tokens_ + n > capacity_) {
    return Status::out_of_range("the index cannot count " + std::to_string(n) +
                                " more tokens: it holds " + std::to_string(num_tokens_) +
                                " of the " + std::to_string(capacity_) + " reserved");
  }
  if (refit_ != nullptr && n > 0) {
    drop_refit(
        "replayed steps added tokens while a refit was built, and their keys were not "
        "kept for it, which dropped it; a later direct append starts another");
  }
  if (rerank_ != nullptr) PQKV_RETURN_IF_ERROR(rerank_->advance(n));
  num_tokens_ += n;
  return ok_status();
}

Status LayerIndexCuda::copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const {
  PQKV_RETURN_IF_ERROR(check_copy_codes(*this, kv_head, begin, end, out));
  if (end == begin) return ok_status();
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ready_.get()));
  const uint8_t* src = codes_.get() + (kv_head * capacity_ + begin) * code_size_;
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out, src, static_cast<size_t>((end - begin) * code_size_),
                                       cudaMemcpyDeviceToHost));
  return ok_status();
}

Status LayerIndexCuda::validate_request(const SearchRequest& request, const int32_t* out) const {
  PQKV_RETURN_IF_ERROR(check_search_request(*this, request, out));
  const TensorView& q = request.queries;
  if (q.dim(0) / kv_heads_ > cuda::kMaxGroup) {
    return Status::unimplemented(
        "the CUDA search handles at most " + std::to_string(cuda::kMaxGroup) +
        " query heads per KV head, got " + std::to_string(q.dim(0) / kv_heads_));
  }
  if (q.dtype != DType::kF32 && q.dtype != DType::kBF16) {
    return Status::invalid_argument("the CUDA index scores fp32 or bf16 queries, got " +
                                    q.describe());
  }
  if (q.device != device_) {
    return Status::invalid_argument("queries are " + q.describe() + "; the CUDA index on " +
                                    device_.to_string() + " reads them from that device");
  }
  PQKV_RETURN_IF_ERROR(gpu::expect_device_pointer(q.data, device_.index, "queries"));
  if (std::min(request.k, request.end - request.begin) > 0) {
    PQKV_RETURN_IF_ERROR(gpu::expect_device_pointer(out, device_.index, "search output"));
  }
  if (request.device_range != nullptr) {
    if (request.end > capacity_) {
      return Status::invalid_argument(
          "a search with device-side counts may reach token " + std::to_string(request.end) +
          ", past the " + std::to_string(capacity_) + " tokens reserved; reserve() first");
    }
    PQKV_RETURN_IF_ERROR(
        gpu::expect_device_pointer(request.device_range, device_.index, "device search range"));
  }
  return ok_status();
}

Status LayerIndexCuda::search(const SearchRequest& request, int32_t* out_indices, Stream stream,
                              SearchTimings* /*timings: knowing them would need a host sync*/) {
  PQKV_RETURN_IF_ERROR(validate_request(request, out_indices));
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  PQKV_ASSIGN_OR_RETURN(cudaStream_t caller, caller_stream(stream));
  PQKV_RETURN_IF_ERROR(install_refit(caller));
  const int64_t k = std::clamp<int64_t>(request.k, 0, request.end - request.begin);
  if (k == 0) return ok_status();
  PQKV_RETURN_IF_ERROR(wait_ready(caller));
  if (rerank_ != nullptr) return search_two_stage(request, k, out_indices, caller);
  PQKV_ASSIGN_OR_RETURN(const float share, search_share(request.sm_share, caller));
  const cuda::SelectRequest select{request.begin,       request.end, k,
                                   request.aggregation, out_indices, request.device_range};
  return search_codes(request, select, share, caller);
}

Status LayerIndexCuda::search_codes(const SearchRequest& request, const cuda::SelectRequest& select,
                                    float share, cudaStream_t caller) {
  const cuda::SearchShape shape{static_cast<int>(request.queries.dim(0)), kv_heads_,
                                shape_.head_dim, shape_.m, is_pq() ? shape_.ksub() : 1};
  if (!is_pq()) {
    cuda::SqSearchArgs sq;
    sq.shape = shape;
    sq.bits = sq_bits();
    sq.queries = request.queries.data;
    sq.query_dtype = request.queries.dtype;
    sq.scale = scale_.get();
    sq.offset = offset_.get();
    sq.codes = codes_.get();
    sq.head_stride = capacity_ * code_size_;
    sq.tables = tables_.get();
    sq.request = select;
    sq.fused = share > 0.0f;
    return cuda::launch_sq_search(sq, shared_view(workspace_.view(), share), caller);
  }
  cuda::PqSearchArgs args;
  args.shape = shape;
  args.queries = request.queries.data;
  args.query_dtype = request.queries.dtype;
  args.centroids = centroids_.get();
  args.codes = codes_.get();
  args.head_stride = capacity_ * shape_.m;
  args.request = select;
  args.fused = share > 0.0f;
  return cuda::launch_pq_search(args, shared_view(workspace_.view(), share), caller);
}

Status LayerIndexCuda::search_two_stage(const SearchRequest& request, int64_t k, int32_t* out,
                                        cudaStream_t caller) {
  const int64_t count = request.end - request.begin;
  const int64_t pool = std::min(count, std::max(k, k * selection_.candidates));
  const DeviceSearchRange* first_range = nullptr;
  const DeviceSearchRange* rerank_range = nullptr;
  if (request.device_range != nullptr) {
    PQKV_RETURN_IF_ERROR(cuda::launch_pool_ranges(request.device_range, selection_.candidates,
                                                  pool_ranges_.get(), caller));
    first_range = pool_ranges_.get();
    rerank_range = pool_ranges_.get() + 1;
  }
  const int q_heads = static_cast<int>(request.queries.dim(0));
  // The first stage: the one-stage search (persistent where it covers the
  // shape, at the share a one-stage search would take; both leave each
  // head's log-sum-exp in the workspace for the rerank), keeping `pool`
  // candidates.
  PQKV_ASSIGN_OR_RETURN(const float share, search_share(request.sm_share, caller));
  const cuda::SelectRequest select{request.begin,       request.end,       pool,
                                   request.aggregation, candidates_.get(), first_range};
  PQKV_RETURN_IF_ERROR(search_codes(request, select, share, caller));
  const LayerIndexCuda& second = *rerank_;
  cuda::RerankArgs r;
  r.shape = {q_heads, kv_heads_, shape_.head_dim, second.shape_.m,
             second.is_pq() ? second.shape_.ksub() : 1};
  r.queries = request.queries.data;
  r.query_dtype = request.queries.dtype;
  if (second.is_pq()) {
    r.centroids = second.centroids_.get();
  } else {
    r.bits = second.sq_bits();
    r.scale = second.scale_.get();
    r.offset = second.offset_.get();
    r.tables = second.tables_.get();
  }
  r.codes = second.codes_.get();
  r.head_stride = second.capacity_ * second.code_size_;
  r.candidates = candidates_.get();
  r.pool = pool;
  r.k = k;
  r.aggregation = request.aggregation;
  r.out = out;
  r.range = rerank_range;
  return cuda::launch_rerank(r, workspace_.view(), caller);
}

}  // namespace pqkv::index
