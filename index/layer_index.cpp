#include "index/layer_index.h"

#include <algorithm>
#include <string>

#include "index/cpu/layer_index_cpu.h"
#if PQKV_HAVE_CUDA
#include "index/cuda/layer_index_cuda.h"
#endif

namespace pqkv::index {
namespace {

// Appended piece by piece: GCC 12 warns falsely (-Wrestrict) on "[" + string.
std::string range_string(int64_t begin, int64_t end) {
  std::string s = "[";
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  s += ")";
  return s;
}

}  // namespace

Status check_search_request(const LayerIndex& index, const SearchRequest& request,
                            const int32_t* out_indices) {
  if (!index.trained()) {
    return Status::failed_precondition(
        "search needs a trained index: call train or set_codebook, then add keys");
  }
  const TensorView& q = request.queries;
  const int kv_heads = index.num_kv_heads();
  PQKV_RETURN_IF_ERROR(q.expect_shape("queries", {-1, index.shape().head_dim}));
  if (q.dim(0) < 1 || q.dim(0) % kv_heads != 0) {
    return Status::invalid_argument("queries have " + std::to_string(q.dim(0)) +
                                    " heads; GQA needs a positive multiple of the " +
                                    std::to_string(kv_heads) + " KV heads");
  }
  // With device-side counts, end bounds the codes reserved, checked by the backend.
  const bool end_known = request.device_range == nullptr;
  if (request.begin < 0 || request.begin > request.end ||
      (end_known && request.end > index.num_tokens())) {
    return Status::invalid_argument("search range " + range_string(request.begin, request.end) +
                                    " is not within the index's tokens " +
                                    range_string(0, index.num_tokens()));
  }
  if (request.k < 0) {
    return Status::invalid_argument("search k must be >= 0, got " + std::to_string(request.k));
  }
  // Written so that NaN fails too.
  if (!(request.sm_share >= 0.0f && request.sm_share <= 1.0f)) {
    return Status::invalid_argument("search sm_share must be within [0, 1], got " +
                                    std::to_string(request.sm_share));
  }
  if (out_indices == nullptr && std::min(request.k, request.end - request.begin) > 0) {
    return Status::invalid_argument("search needs an output buffer for its positions, got null");
  }
  return ok_status();
}

Status check_copy_codes(const LayerIndex& index, int kv_head, int64_t begin, int64_t end,
                        const uint8_t* out) {
  if (kv_head < 0 || kv_head >= index.num_kv_heads()) {
    return Status::invalid_argument("KV head " + std::to_string(kv_head) + " is not one of the " +
                                    std::to_string(index.num_kv_heads()) + " heads of this index");
  }
  if (begin < 0 || begin > end || end > index.num_tokens()) {
    return Status::invalid_argument("code range " + range_string(begin, end) +
                                    " is not within the index's tokens " +
                                    range_string(0, index.num_tokens()));
  }
  if (end > begin && out == nullptr) {
    return Status::invalid_argument("copy_codes needs an output buffer, got null");
  }
  return ok_status();
}

Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, const PqShape& shape,
                                                     int kv_heads) {
  if (device.is_cuda()) {
#if PQKV_HAVE_CUDA
    PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCuda> index,
                          LayerIndexCuda::create(device, shape, kv_heads));
    return std::unique_ptr<LayerIndex>(std::move(index));
#else
    return Status::unavailable("pqkv was built without CUDA; rebuild with nvcc present or use cpu");
#endif
  }
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCpu> index,
                        LayerIndexCpu::create(shape, kv_heads));
  return std::unique_ptr<LayerIndex>(std::move(index));
}

Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, int head_dim,
                                                     int kv_heads, const PqConfig& pq,
                                                     const SelectionConfig& selection) {
  PQKV_RETURN_IF_ERROR(selection.validate());
  if (selection.code == KeyCode::kPq && !selection.two_stage()) {
    PQKV_RETURN_IF_ERROR(pq.validate(head_dim));
    return make_layer_index(device, PqShape::from_config(head_dim, pq), kv_heads);
  }
  if (device.is_cuda()) {
#if PQKV_HAVE_CUDA
    PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCuda> index,
                          LayerIndexCuda::create(device, head_dim, kv_heads, pq, selection));
    return std::unique_ptr<LayerIndex>(std::move(index));
#else
    return Status::unavailable("pqkv was built without CUDA; rebuild with nvcc present or use cpu");
#endif
  }
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCpu> index,
                        LayerIndexCpu::create(head_dim, kv_heads, pq, selection));
  return std::unique_ptr<LayerIndex>(std::move(index));
}

}  // namespace pqkv::index
