// RAII device memory and the cuBLAS status check of the CUDA model backend.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

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

// Owns `bytes` of device memory; freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  // Makes room for at least `bytes`; the contents are lost when it grows.
  Status reserve(size_t bytes) {
    if (bytes <= bytes_) return ok_status();
    release();
    PQKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, bytes));
    bytes_ = bytes;
    return ok_status();
  }

  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    // A failed free at teardown leaves nothing to recover; the error stays with CUDA.
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace pqkv::model::cuda
