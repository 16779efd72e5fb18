// The exact baseline of a layer's search on the GPU: q.k for every key with
// cuBLAS (bf16 in, fp32 out), then the PQ search's own softmax, GQA
// aggregation and top-k (launch_dense_select). It is the oracle selection that
// PQ approximates, and the reference point of the benchmarks.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "core/cuda_handles.h"
#include "index/cuda/pq_search.cuh"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

class ExactSearchCuda {
 public:
  // For searches of up to `max_tokens` tokens; allocates on `stream`, which
  // must outlive the object.
  static Result<std::unique_ptr<ExactSearchCuda>> create(int q_heads, int kv_heads, int head_dim,
                                                         int64_t max_tokens, cudaStream_t stream);

  // queries: bf16 [q_heads][head_dim]; keys: bf16 [tokens][kv_heads][head_dim],
  // both device memory. Writes [kv_heads][k] positions of tokens [begin, end)
  // (k clamped to end - begin) to `out` (device), in increasing position.
  Status search(const void* queries, const void* keys, int64_t begin, int64_t end, int64_t k,
                GqaAggregation aggregation, int32_t* out, cudaStream_t stream);

 private:
  struct HandleDestroy {
    void operator()(cublasHandle_t h) const;  // in the library, which links cuBLAS
  };
  ExactSearchCuda() = default;

  SearchShape shape_;
  int64_t max_tokens_ = 0;
  std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, HandleDestroy> blas_;
  gpu::DeviceArray<float> raw_;  // [q_heads][max_tokens]
  SearchWorkspace workspace_;
};

}  // namespace pqkv::index::cuda
