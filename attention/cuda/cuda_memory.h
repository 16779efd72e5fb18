// Owning handles for the CUDA resources the decode-step kernels, their tests
// and benchmarks use: device memory, pinned host memory, streams, events and
// instantiated graphs. Each is created through a Result and freed in its
// destructor, so no error path leaks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "core/cuda_check.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

// A move-only owner of one CUDA handle; `Free` releases it.
template <class Handle, cudaError_t (*Free)(Handle)>
class CudaHandle {
 public:
  CudaHandle() = default;
  explicit CudaHandle(Handle h) : handle_(h) {}
  ~CudaHandle() { reset(); }
  CudaHandle(CudaHandle&& other) noexcept : handle_(std::exchange(other.handle_, Handle{})) {}
  CudaHandle& operator=(CudaHandle&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, Handle{});
    }
    return *this;
  }
  CudaHandle(const CudaHandle&) = delete;
  CudaHandle& operator=(const CudaHandle&) = delete;

  Handle get() const { return handle_; }

 private:
  void reset() {
    // A failure to free cannot be reported from a destructor; the handle is gone either way.
    if (handle_ != Handle{}) static_cast<void>(Free(handle_));
    handle_ = Handle{};
  }

  Handle handle_{};
};

using CudaStream = CudaHandle<cudaStream_t, cudaStreamDestroy>;
using CudaEvent = CudaHandle<cudaEvent_t, cudaEventDestroy>;
using CudaGraph = CudaHandle<cudaGraph_t, cudaGraphDestroy>;
using CudaGraphExec = CudaHandle<cudaGraphExec_t, cudaGraphExecDestroy>;

inline Result<CudaStream> make_stream() {
  cudaStream_t s = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return CudaStream(s);
}

inline Result<CudaEvent> make_event() {
  cudaEvent_t e = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  return CudaEvent(e);
}

// Bytes of device memory (cudaMalloc) or of pinned, mapped host memory
// (cudaHostAlloc), freed with the matching call.
template <bool kPinnedHost>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  CudaBuffer& operator=(CudaBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer() { reset(); }

  static Result<CudaBuffer> allocate(size_t bytes) {
    CudaBuffer b;
    if (bytes == 0) return Result<CudaBuffer>(std::move(b));
    void* p = nullptr;
    if constexpr (kPinnedHost) {
      PQKV_CUDA_RETURN_IF_ERROR(
          cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    } else {
      PQKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    }
    b.data_ = p;
    b.bytes_ = bytes;
    return Result<CudaBuffer>(std::move(b));
  }

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void reset() {
    if (data_ == nullptr) return;
    if constexpr (kPinnedHost) {
      static_cast<void>(cudaFreeHost(data_));
    } else {
      static_cast<void>(cudaFree(data_));
    }
    data_ = nullptr;
    bytes_ = 0;
  }

  void* data_ = nullptr;
  size_t bytes_ = 0;
};

using DeviceBuffer = CudaBuffer<false>;
using PinnedBuffer = CudaBuffer<true>;

}  // namespace pqkv::attention::cuda
