// Turns CUDA runtime errors into Status. Every CUDA call in pqkv goes through
// one of these; a launch is followed by PQKV_CUDA_CHECK_LAUNCH().
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "pqkv/status.h"

namespace pqkv {

inline Status cuda_status(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return ok_status();
  // The runtime also keeps a non-sticky error as its last error: reported
  // here, it must not resurface in the next launch check.
  (void)cudaGetLastError();
  const StatusCode code = err == cudaErrorMemoryAllocation ? StatusCode::kResourceExhausted
                          : (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
                              ? StatusCode::kUnavailable
                              : StatusCode::kInternal;
  return {code, std::string(what) + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line)};
}

}  // namespace pqkv

#define PQKV_CUDA_RETURN_IF_ERROR(expr) \
  PQKV_RETURN_IF_ERROR(::pqkv::cuda_status((expr), #expr, __FILE__, __LINE__))
#define PQKV_CUDA_CHECK_LAUNCH() \
  PQKV_RETURN_IF_ERROR(::pqkv::cuda_status(cudaGetLastError(), "kernel launch", __FILE__, __LINE__))
