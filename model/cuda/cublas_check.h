// The cuBLAS status check of the CUDA model backend.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "core/cuda_check.h"
#include "pqkv/status.h"

namespace pqkv::model::cuda {

inline Status cublas_status(cublasStatus_t s, const char* what, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return ok_status();
  const StatusCode code =
      s == CUBLAS_STATUS_ALLOC_FAILED ? StatusCode::kResourceExhausted : StatusCode::kInternal;
  return {code, std::string(what) + " failed: " + cublasGetStatusName(s) + " (" +
                    cublasGetStatusString(s) + ") at " + file + ":" + std::to_string(line)};
}

#define PQKV_CUBLAS_RETURN_IF_ERROR(expr) \
  PQKV_RETURN_IF_ERROR(::pqkv::model::cuda::cublas_status((expr), #expr, __FILE__, __LINE__))

}  // namespace pqkv::model::cuda
