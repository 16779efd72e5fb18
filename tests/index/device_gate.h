// A gate on a CUDA stream held on the device: one kernel that spins on a flag
// in mapped pinned host memory until the host opens the gate or a timeout
// passes. Work queued behind it on that stream waits, while other streams run
// beside it (the spinning block holds one SM, not the stream's hardware
// queue, as a blocked host function can). Tests use it to force work on one
// stream to overlap work on another.
#pragma once

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/status.h"

namespace pqkv::testing {

class DeviceGate {
 public:
  DeviceGate() = default;
  // Opens the gate and waits for the kernel before freeing the flag.
  ~DeviceGate();
  DeviceGate(const DeviceGate&) = delete;
  DeviceGate& operator=(const DeviceGate&) = delete;

  // Allocates the flag (pinned, mapped) on the current device.
  Status init();
  // Enqueues the spinning kernel on `stream`: it ends once open() is called
  // or after `timeout_ms` milliseconds of device time, whichever is first.
  Status close(cudaStream_t stream, int64_t timeout_ms);
  // Lets the kernel end.
  void open();
  // After the kernel ended (its stream synchronised): true when open()
  // released it, false when it timed out.
  bool opened_in_time() const;

 private:
  // [0]: 1 once opened (written by the host); [1]: 1 released, 2 timed out
  // (written by the kernel).
  volatile uint32_t* flags_ = nullptr;
  cudaStream_t stream_ = nullptr;  // where the kernel was enqueued, or null
};

}  // namespace pqkv::testing
#endif
