#include "pqkv/device.h"

#include <charconv>
#include <string>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace pqkv {

std::string Device::to_string() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Result<Device> parse_device(std::string_view text) {
  if (text == "cpu") return Device::cpu();
  if (text == "cuda" || text == "gpu") return Device::cuda(0);
  if (text.substr(0, 5) == "cuda:") {
    int ordinal = -1;
    const auto digits = text.substr(5);
    auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), ordinal);
    if (ec == std::errc() && ptr == digits.data() + digits.size() && ordinal >= 0) {
      return Device::cuda(ordinal);
    }
  }
  return Status::invalid_argument("unknown device '" + std::string(text) +
                                  "': use cpu, cuda or cuda:N");
}

int cuda_device_count() {
#if PQKV_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error for later calls
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

Status check_device_usable(const Device& device) {
  if (device.is_cpu()) return ok_status();
#if PQKV_HAVE_CUDA
  const int n = cuda_device_count();
  if (n == 0) {
    return Status::unavailable("no CUDA device found; run on a machine with a GPU or use cpu");
  }
  if (device.index >= n) {
    return Status::invalid_argument("device " + device.to_string() + " does not exist: " +
                                    std::to_string(n) + " CUDA device(s) visible");
  }
  return ok_status();
#else
  return Status::unavailable("pqkv was built without CUDA; rebuild with nvcc present or use cpu");
#endif
}

Device memory_device_of(const void* ptr) {
#if PQKV_HAVE_CUDA
  if (ptr == nullptr || cuda_device_count() == 0) return Device::cpu();
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();  // memory CUDA does not know is plain host memory
    return Device::cpu();
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    return Device::cuda(attr.device);
  }
  return Device::cpu();
#else
  static_cast<void>(ptr);
  return Device::cpu();
#endif
}

}  // namespace pqkv
