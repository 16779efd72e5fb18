// Saving and restoring a CUDA index (LayerIndex::snapshot / restore) in the
// CPU index's format: the codec state is written and read by the host codecs
// themselves (cpu/key_codecs_cpu.h), and the codes of each KV head are the
// same [token][code_size] bytes on both backends, so a sequence saved from
// either backend reopens on the other.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/cuda_check.h"
#include "index/cpu/key_codecs_cpu.h"
#include "index/cuda/layer_index_cuda.h"

namespace pqkv::index {
namespace {

// The host codec whose state encoding this index's code uses.
std::unique_ptr<KeyCodec> host_codec(KeyCode code, const PqShape& shape, int kv_heads) {
  switch (code) {
    case KeyCode::kPq:
      return std::make_unique<cpu::PqCodecCpu>(shape, kv_heads);
    case KeyCode::kInt8:
      return std::make_unique<cpu::ScalarCodecCpu>(8, shape.head_dim, kv_heads);
    case KeyCode::kInt4:
      return std::make_unique<cpu::ScalarCodecCpu>(4, shape.head_dim, kv_heads);
    case KeyCode::kExact:
      break;
  }
  return std::make_unique<cpu::ExactCodecCpu>(shape.head_dim, kv_heads);
}

std::vector<float> to_host(const gpu::DeviceArray<float>& a, Status* status) {
  std::vector<float> out(static_cast<size_t>(a.size()));
  const cudaError_t e = cudaMemcpy(out.data(), a.get(), a.bytes(), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    *status = Status::internal(std::string("copying the CUDA index's scales to the host: ") +
                               cudaGetErrorString(e));
  }
  return out;
}

Status upload(const std::vector<float>& host, gpu::DeviceArray<float>* out, cudaStream_t s) {
  PQKV_ASSIGN_OR_RETURN(*out, gpu::DeviceArray<float>::allocate(int64_t(host.size()), s));
  // A pageable source: staged by the time the call returns.
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out->get(), host.data(), out->bytes(), cudaMemcpyHostToDevice, s));
  return ok_status();
}

}  // namespace

Result<IndexSnapshot> LayerIndexCuda::snapshot() const {
  if (!trained()) return Status::failed_precondition("an untrained index has nothing to save");
  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  IndexSnapshot snap;
  snap.num_tokens = num_tokens_;
  for (const LayerIndexCuda* s :
       std::initializer_list<const LayerIndexCuda*>{this, rerank_.get()}) {
    if (s == nullptr) continue;
    PQKV_ASSIGN_OR_RETURN(IndexSnapshot::Stage stage, s->snapshot_stage());
    snap.stages.push_back(std::move(stage));
  }
  return snap;
}

Result<IndexSnapshot::Stage> LayerIndexCuda::snapshot_stage() const {
  // A build still running on the build stream (train, a large add) first.
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ready_.get()));
  std::unique_ptr<KeyCodec> codec = host_codec(selection_.code, shape_, kv_heads_);
  if (is_pq()) {
    PQKV_ASSIGN_OR_RETURN(LayerCodebook book, codebook());
    static_cast<cpu::PqCodecCpu&>(*codec).set_codebook(std::move(book));
  } else if (selection_.code != KeyCode::kExact) {
    Status copied = ok_status();
    std::vector<float> scale = to_host(scale_, &copied);
    std::vector<float> offset = to_host(offset_, &copied);
    PQKV_RETURN_IF_ERROR(copied);
    static_cast<cpu::ScalarCodecCpu&>(*codec).set_scales(std::move(scale), std::move(offset));
  }
  IndexSnapshot::Stage stage;
  stage.code = selection_.code;
  stage.code_size = code_size_;
  PQKV_RETURN_IF_ERROR(codec->write_state(&stage.codec_state));
  const size_t bytes = static_cast<size_t>(num_tokens_) * code_size_;
  stage.codes.resize(static_cast<size_t>(kv_heads_));
  for (int h = 0; h < kv_heads_; ++h) {
    stage.codes[h].resize(bytes);
    if (bytes == 0) continue;
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(stage.codes[h].data(),
                                         codes_.get() + int64_t{h} * capacity_ * code_size_, bytes,
                                         cudaMemcpyDeviceToHost));
  }
  return stage;
}

Result<std::unique_ptr<KeyCodec>> LayerIndexCuda::check_snapshot_stage(
    const IndexSnapshot& snapshot, int stage) const {
  const IndexSnapshot::Stage& in = snapshot.stages[stage];
  const std::string which = "saved index stage " + std::to_string(stage);
  if (in.code != selection_.code) {
    return Status::corruption(which + " holds '" + key_code_name(in.code) +
                              "' codes where this index scores with '" +
                              key_code_name(selection_.code) + "'");
  }
  if (in.code_size != code_size_ || static_cast<int>(in.codes.size()) != kv_heads_) {
    return Status::corruption(which + " has codes of another size or head count");
  }
  const size_t bytes = static_cast<size_t>(snapshot.num_tokens) * code_size_;
  for (const auto& head : in.codes) {
    if (head.size() != bytes) {
      return Status::corruption(
          which + " holds " + std::to_string(head.size()) + " code bytes for a head where " +
          std::to_string(snapshot.num_tokens) + " tokens need " + std::to_string(bytes));
    }
  }
  std::unique_ptr<KeyCodec> codec = host_codec(selection_.code, shape_, kv_heads_);
  PQKV_RETURN_IF_ERROR(codec->read_state(in.codec_state));
  for (const auto& head : in.codes)
    PQKV_RETURN_IF_ERROR(codec->check_codes(head.data(), snapshot.num_tokens));
  return codec;
}

Status LayerIndexCuda::restore(const IndexSnapshot& snapshot, Stream stream) {
  // Every check and the codec states' decoding first, so that a snapshot that
  // does not fit leaves the index as it was.
  const size_t stages = rerank_ != nullptr ? 2 : 1;
  if (snapshot.stages.size() != stages) {
    return Status::corruption("a saved index of " + std::to_string(snapshot.stages.size()) +
                              " stages cannot be restored into '" + selection_.to_string() +
                              "', which has " + std::to_string(stages));
  }
  if (snapshot.num_tokens < 0 || (snapshot.num_tokens > 0 && snapshot.num_tokens - 1 > INT32_MAX)) {
    return Status::corruption("a saved index of " + std::to_string(snapshot.num_tokens) +
                              " tokens cannot be restored: positions are int32");
  }
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<KeyCodec> codec, check_snapshot_stage(snapshot, 0));
  std::unique_ptr<KeyCodec> rerank_codec;
  if (rerank_ != nullptr) {
    PQKV_ASSIGN_OR_RETURN(rerank_codec, rerank_->check_snapshot_stage(snapshot, 1));
  }

  gpu::ScopedDevice guard;
  PQKV_RETURN_IF_ERROR(guard.enter(device_));
  // A host stream: the upload runs on the build stream and the call waits.
  const cudaStream_t caller =
      stream.host_only ? build_stream_ : static_cast<cudaStream_t>(stream.handle);
  PQKV_RETURN_IF_ERROR(restore_stage(*codec, snapshot.stages[0], snapshot.num_tokens, caller));
  if (rerank_ != nullptr) {
    PQKV_RETURN_IF_ERROR(
        rerank_->restore_stage(*rerank_codec, snapshot.stages[1], snapshot.num_tokens, caller));
  }
  if (stream.host_only) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ready_.get()));
    if (rerank_ != nullptr) PQKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(rerank_->ready_.get()));
  }
  return ok_status();
}

Status LayerIndexCuda::restore_stage(const KeyCodec& codec, const IndexSnapshot::Stage& in,
                                     int64_t num_tokens, cudaStream_t caller) {
  // The fit's keys are not saved: nothing to measure drift against.
  stop_drift();
  PQKV_RETURN_IF_ERROR(build_after(caller));
  cudaStream_t s = build_stream_;
  gpu::DeviceArray<float> centroids, scale, offset;
  if (is_pq()) {
    PQKV_RETURN_IF_ERROR(
        upload(static_cast<const cpu::PqCodecCpu&>(codec).codebook().centroids, &centroids, s));
  } else if (selection_.code != KeyCode::kExact) {
    const auto& sq = static_cast<const cpu::ScalarCodecCpu&>(codec);
    PQKV_RETURN_IF_ERROR(upload(sq.scale(), &scale, s));
    PQKV_RETURN_IF_ERROR(upload(sq.offset(), &offset, s));
  }
  const size_t bytes = static_cast<size_t>(num_tokens) * code_size_;
  const int64_t capacity = std::max<int64_t>(
      kCapacityChunk, (num_tokens + kCapacityChunk - 1) / kCapacityChunk * kCapacityChunk);
  PQKV_ASSIGN_OR_RETURN(auto codes, gpu::DeviceArray<uint8_t>::allocate(
                                        int64_t{kv_heads_} * capacity * code_size_, s));
  for (int h = 0; h < kv_heads_; ++h) {
    if (bytes == 0) break;
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(codes.get() + int64_t{h} * capacity * code_size_,
                                              in.codes[h].data(), bytes, cudaMemcpyHostToDevice,
                                              s));
  }
  PQKV_ASSIGN_OR_RETURN(auto workspace, make_workspace(capacity, s));
  gpu::DeviceArray<int32_t> candidates;
  if (rerank_ != nullptr) {
    PQKV_ASSIGN_OR_RETURN(candidates,
                          gpu::DeviceArray<int32_t>::allocate(int64_t{kv_heads_} * capacity, s));
  }
  if (is_pq()) {
    centroids_ = std::move(centroids);
    // The objective is not saved: zeros, as the CPU index restores it.
    set_objective_.assign(static_cast<size_t>(kv_heads_) * shape_.m, 0.0);
    objective_from_training_ = false;
  } else if (selection_.code != KeyCode::kExact) {
    scale_ = std::move(scale);
    offset_ = std::move(offset);
  }
  codes_ = std::move(codes);
  workspace_ = std::move(workspace);
  candidates_ = std::move(candidates);
  capacity_ = capacity;
  num_tokens_ = num_tokens;
  trained_ = true;
  PQKV_RETURN_IF_ERROR(record_ready(s));
  return note_build();
}

}  // namespace pqkv::index
