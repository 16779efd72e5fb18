// RAII owners of CUDA resources used by the CUDA index: device memory, streams,
// events, and a guard that makes a device current for the length of a call.
// Destruction never fails loudly: a CUDA error at teardown is ignored because
// there is nobody left to report it to.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "core/cuda_check.h"
#include "pqkv/device.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// Owned device memory of `count` elements of T (uninitialised), allocated and
// freed in stream order (cudaMallocAsync / cudaFreeAsync on the stream given at
// allocation), so that growing or dropping a buffer never blocks the host: the
// free runs once the work queued before it on that stream is done. The stream
// must outlive the array.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;

  static Result<DeviceArray> allocate(int64_t count, cudaStream_t stream) {
    DeviceArray a;
    if (count <= 0) return Result<DeviceArray>(std::move(a));
    void* p = nullptr;
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMallocAsync(&p, static_cast<size_t>(count) * sizeof(T), stream));
    a.ptr_ = std::unique_ptr<void, StreamFree>(p, StreamFree{stream});
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

struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using StreamHandle = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;

struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using EventHandle = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;

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

// Timing is off: these events only order work between streams.
inline Result<EventHandle> make_event() {
  cudaEvent_t e = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return EventHandle(e);
}

// Makes `device` current and restores the caller's device on scope exit, so
// that the index never changes which device a caller's thread works on.
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
                                    cudaGetErrorName(err) + "); pass cuda:" +
                                    std::to_string(ordinal) + " device memory");
  }
  if (attr.type == cudaMemoryTypeManaged) return ok_status();
  if (attr.type != cudaMemoryTypeDevice) {
    return Status::invalid_argument(std::string(what) + " points to host memory; the CUDA index " +
                                    "reads only cuda:" + std::to_string(ordinal) +
                                    " device memory");
  }
  if (attr.device != ordinal) {
    return Status::invalid_argument(std::string(what) + " lives on cuda:" +
                                    std::to_string(attr.device) + ", not on the index's cuda:" +
                                    std::to_string(ordinal));
  }
  return ok_status();
}

}  // namespace pqkv::index::cuda
