// RAII owners of CUDA resources: device memory (plain and stream-ordered),
// pinned host memory, streams, events and graphs, plus a guard that makes a
// device current and a check of where a pointer lives. Destruction never fails
// loudly: a CUDA error at teardown has nobody left to report to.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "core/cuda_check.h"
#include "pqkv/device.h"
#include "pqkv/status.h"

namespace pqkv::gpu {

// `count` elements of T in device memory (uninitialised), allocated and freed
// in stream order (cudaMallocAsync / cudaFreeAsync on the stream given at
// allocation): growing or dropping a buffer never blocks the host, and the
// free runs once the work queued before it on that stream is done. The stream
// must outlive the array.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;

  static Result<DeviceArray> allocate(int64_t count, cudaStream_t stream) {
    return allocate(count, stream, stream);
  }
  // Allocated in order on `stream`, freed in order on `free_stream`: for a
  // buffer used on one stream and dropped on another, which its owner makes
  // wait for the last use before the array is destroyed.
  static Result<DeviceArray> allocate(int64_t count, cudaStream_t stream,
                                      cudaStream_t free_stream) {
    DeviceArray a;
    if (count <= 0) return Result<DeviceArray>(std::move(a));
    void* p = nullptr;
    PQKV_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&p, static_cast<size_t>(count) * sizeof(T), stream));
    a.ptr_ = std::unique_ptr<void, StreamFree>(p, StreamFree{free_stream});
    a.count_ = count;
    return Result<DeviceArray>(std::move(a));
  }

  T* get() const { return static_cast<T*>(ptr_.get()); }
  int64_t size() const { return count_; }
  int64_t bytes() const { return count_ * static_cast<int64_t>(sizeof(T)); }

 private:
  struct StreamFree {
    cudaStream_t stream = nullptr;
    void operator()(void* p) const { cudaFreeAsync(p, stream); }
  };
  std::unique_ptr<void, StreamFree> ptr_{nullptr, StreamFree{}};
  int64_t count_ = 0;
};

// Bytes of device memory (cudaMalloc) or of pinned, mapped host memory
// (cudaHostAlloc), freed with the matching call. Freeing device memory waits
// for the kernels that may still read it.
template <bool kPinnedHost>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  CudaBuffer& operator=(CudaBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer() { release(); }

  static Result<CudaBuffer> allocate(size_t bytes) {
    CudaBuffer b;
    PQKV_RETURN_IF_ERROR(b.reserve(bytes));
    return Result<CudaBuffer>(std::move(b));
  }

  // Makes room for at least `bytes`; the contents are lost when it grows.
  Status reserve(size_t bytes) {
    if (bytes <= bytes_) return ok_status();
    release();
    void* p = nullptr;
    if constexpr (kPinnedHost) {
      PQKV_CUDA_RETURN_IF_ERROR(
          cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    } else {
      PQKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    }
    data_ = p;
    bytes_ = bytes;
    return ok_status();
  }

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
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

struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct GraphDestroy {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
struct GraphExecDestroy {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
using StreamHandle = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;
using EventHandle = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;
using GraphHandle = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDestroy>;
using GraphExecHandle = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDestroy>;

// A non-blocking stream: it does not wait for the legacy default stream.
inline Result<StreamHandle> make_stream() {
  cudaStream_t s = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return StreamHandle(s);
}

// A non-blocking stream at the lowest priority the device offers: index builds
// yield the SMs to the decode path's kernels.
inline Result<StreamHandle> make_low_priority_stream() {
  int least = 0;
  int greatest = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cudaStream_t s = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, least));
  return StreamHandle(s);
}

// A non-blocking stream whose priority falls with `rank` (0: the device's
// greatest) over `ranks` streams, spread over the device's priority levels.
inline Result<StreamHandle> make_ranked_stream(size_t rank, size_t ranks) {
  int least = 0;
  int greatest = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  const int levels = least - greatest + 1;
  const int level = ranks <= 1 ? 0 : static_cast<int>(rank * levels / ranks);
  cudaStream_t s = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest + level));
  return StreamHandle(s);
}

// An event that only orders work between streams (timing off, cheaper).
inline Result<EventHandle> make_event() {
  cudaEvent_t e = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return EventHandle(e);
}

// An event that cudaEventElapsedTime can read.
inline Result<EventHandle> make_timing_event() {
  cudaEvent_t e = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  return EventHandle(e);
}

// Makes `device` current and restores the caller's device on scope exit, so
// pqkv never changes which device a caller's thread works on.
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (previous_ >= 0 && previous_ != current_) cudaSetDevice(previous_);
  }

  Status enter(const Device& device) {
    PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&previous_));
    current_ = device.index;
    if (current_ != previous_) PQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(current_));
    return ok_status();
  }

 private:
  int previous_ = -1;
  int current_ = -1;
};

// OK when `ptr` is memory that kernels on CUDA device `ordinal` can read:
// device memory of that ordinal or managed memory. Host memory (pageable or
// pinned) and other devices' memory are refused with a message naming `what`.
inline Status expect_device_pointer(const void* ptr, int ordinal, const char* what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();  // an unknown pointer is an answer here, not a sticky error
    return Status::invalid_argument(std::string(what) + " is not memory CUDA knows (" +
                                    cudaGetErrorName(err) +
                                    "); pass cuda:" + std::to_string(ordinal) + " device memory");
  }
  if (attr.type == cudaMemoryTypeManaged) return ok_status();
  if (attr.type != cudaMemoryTypeDevice) {
    return Status::invalid_argument(std::string(what) +
                                    " points to host memory; this call reads only cuda:" +
                                    std::to_string(ordinal) + " device memory");
  }
  if (attr.device != ordinal) {
    return Status::invalid_argument(std::string(what) +
                                    " lives on cuda:" + std::to_string(attr.device) +
                                    ", not on cuda:" + std::to_string(ordinal));
  }
  return ok_status();
}

}  // namespace pqkv::gpu
