// Where memory lives and where work runs: the host CPU or a CUDA device.
#pragma once

#include <string>
#include <string_view>

#include "pqkv/export.h"
#include "pqkv/status.h"

namespace pqkv {

enum class DeviceType : uint8_t { kCpu = 0, kCuda = 1 };

struct PQKV_API Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static Device cpu() { return {DeviceType::kCpu, 0}; }
  static Device cuda(int ordinal = 0) { return {DeviceType::kCuda, ordinal}; }
  bool is_cpu() const { return type == DeviceType::kCpu; }
  bool is_cuda() const { return type == DeviceType::kCuda; }
  bool operator==(const Device&) const = default;
  std::string to_string() const;  // "cpu", "cuda:0"
};

// Parses "cpu", "cuda", "cuda:N".
PQKV_API Result<Device> parse_device(std::string_view text);

// Number of CUDA devices this process can use: 0 when pqkv was built without
// CUDA, when no driver is loaded, or when no GPU is present.
PQKV_API int cuda_device_count();
// OK when `device` can run work in this process; otherwise says why not.
PQKV_API Status check_device_usable(const Device& device);

// Where the memory at `ptr` lives, as CUDA reports it (cudaPointerGetAttributes):
// cuda:N for device memory of GPU N and for managed memory (kernels read it),
// cpu for host memory (pageable, pinned or mapped) and for every pointer in a
// build without CUDA or on a machine without a GPU. Never dereferences `ptr`.
// Thread-safe.
PQKV_API Device memory_device_of(const void* ptr);

// A CUDA stream (cudaStream_t) passed through the C++ API without including
// CUDA headers. pqkv enqueues on it and never synchronizes the device for the
// caller. Host-only work takes Stream::host(), which is also what a
// default-constructed Stream means: CUDA's legacy default stream is never
// picked implicitly, only by Stream::cuda(nullptr).
struct PQKV_API Stream {
  void* handle = nullptr;  // cudaStream_t when !host_only
  bool host_only = true;

  static Stream host() { return {nullptr, true}; }
  static Stream cuda(void* cuda_stream) { return {cuda_stream, false}; }
};

}  // namespace pqkv
