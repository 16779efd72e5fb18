#include "index/cuda/exact_search.h"

#include <algorithm>
#include <string>

namespace pqkv::index::cuda {
namespace {

Status blas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return ok_status();
  return Status::internal(std::string(what) + " failed: " + cublasGetStatusName(s) + " (" +
                          cublasGetStatusString(s) + ")");
}

}  // namespace

void ExactSearchCuda::HandleDestroy::operator()(cublasHandle_t h) const {
  cublasDestroy(h);
}

Result<std::unique_ptr<ExactSearchCuda>> ExactSearchCuda::create(int q_heads, int kv_heads,
                                                                 int head_dim, int64_t max_tokens,
                                                                 cudaStream_t stream) {
  std::unique_ptr<ExactSearchCuda> e(new ExactSearchCuda());
  e->shape_ = {q_heads, kv_heads, head_dim, 1, 1};
  e->max_tokens_ = max_tokens;
  cublasHandle_t h = nullptr;
  PQKV_RETURN_IF_ERROR(blas_status(cublasCreate(&h), "cublasCreate"));
  e->blas_.reset(h);
  PQKV_ASSIGN_OR_RETURN(e->raw_,
                        gpu::DeviceArray<float>::allocate(int64_t{q_heads} * max_tokens, stream));
  PQKV_ASSIGN_OR_RETURN(e->workspace_,
                        SearchWorkspace::allocate(kv_heads, 1, 1, max_tokens, stream));
  return std::move(e);
}

Status ExactSearchCuda::search(const void* queries, const void* keys, int64_t begin, int64_t end,
                               int64_t k, GqaAggregation aggregation, int32_t* out,
                               cudaStream_t stream) {
  if (begin < 0 || end < begin || end - begin > max_tokens_) {
    return Status::invalid_argument("exact search of [" + std::to_string(begin) + ", " +
                                    std::to_string(end) + ") exceeds its " +
                                    std::to_string(max_tokens_) + " tokens");
  }
  const int64_t count = end - begin;
  k = std::clamp<int64_t>(k, 0, count);
  if (k == 0) return ok_status();
  const int group = shape_.q_heads / shape_.kv_heads;
  const int d = shape_.head_dim;
  PQKV_RETURN_IF_ERROR(blas_status(cublasSetStream(blas_.get(), stream), "cublasSetStream"));
  // Column-major view, one batch per KV head: raw[g][t] = sum_d keys[t][d] * q[g][d],
  // i.e. C (count x group) = K^T (count x d) * Q (d x group).
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const auto* k0 = static_cast<const uint16_t*>(keys) + begin * shape_.kv_heads * d;
  PQKV_RETURN_IF_ERROR(blas_status(
      cublasGemmStridedBatchedEx(blas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(count),
                                 group, d, &alpha, k0, CUDA_R_16BF, shape_.kv_heads * d, d, queries,
                                 CUDA_R_16BF, d, int64_t{group} * d, &beta, raw_.get(), CUDA_R_32F,
                                 static_cast<int>(count), int64_t{group} * count, shape_.kv_heads,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmStridedBatchedEx"));
  return launch_dense_select(shape_, raw_.get(), {begin, end, k, aggregation, out},
                             workspace_.view(), stream);
}

}  // namespace pqkv::index::cuda
