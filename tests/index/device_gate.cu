#include "device_gate.h"

#include "core/cuda_check.h"

namespace pqkv::testing {
namespace {

__device__ uint64_t global_ns() {
  uint64_t ns = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

__global__ void gate_kernel(volatile uint32_t* flags, uint64_t timeout_ns) {
  const uint64_t start = global_ns();
  while (flags[0] == 0) {
    if (global_ns() - start > timeout_ns) {
      flags[1] = 2;
      return;
    }
    __nanosleep(1000);
  }
  flags[1] = 1;
}

}  // namespace

DeviceGate::~DeviceGate() {
  if (flags_ == nullptr) return;
  open();
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  cudaFreeHost(const_cast<uint32_t*>(flags_));
}

Status DeviceGate::init() {
  void* p = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, 2 * sizeof(uint32_t), cudaHostAllocMapped));
  flags_ = static_cast<volatile uint32_t*>(p);
  flags_[0] = 0;
  flags_[1] = 0;
  return ok_status();
}

Status DeviceGate::close(cudaStream_t stream, int64_t timeout_ms) {
  if (flags_ == nullptr) return Status::failed_precondition("DeviceGate::init first");
  void* device = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&device, const_cast<uint32_t*>(flags_), 0));
  gate_kernel<<<1, 1, 0, stream>>>(static_cast<volatile uint32_t*>(device),
                                   static_cast<uint64_t>(timeout_ms) * 1000000u);
  PQKV_CUDA_CHECK_LAUNCH();
  stream_ = stream;
  return ok_status();
}

void DeviceGate::open() {
  flags_[0] = 1;
}

bool DeviceGate::opened_in_time() const {
  return flags_[1] == 1;
}

}  // namespace pqkv::testing
