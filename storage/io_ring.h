// Batched page I/O through io_uring (liburing): the NVMe tier's only path to
// the disk. Requests are submitted in batches of up to the ring's queue depth
// and completions are reaped as they arrive, so a fetch plan's page reads run
// at a useful queue depth instead of one pread at a time.
//
// Thread safety: an IoRing is driven by one thread at a time (a ring is not
// shared between threads without a lock; the Store gives each I/O thread its
// own ring).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "pqkv/status.h"

namespace pqkv::storage {

// One read of whole pages into host memory. With O_DIRECT files, `buffer`,
// `offset` and `bytes` must be multiples of kPageBytes.
struct IoRead {
  int fd = -1;
  int64_t offset = 0;           // bytes into the file
  std::byte* buffer = nullptr;  // host memory; registered when buffer_index >= 0
  uint32_t bytes = 0;
  int buffer_index = -1;  // index into the ring's registered buffers, or -1
};

// One write of whole pages from host memory; the same alignment rules.
struct IoWrite {
  int fd = -1;
  int64_t offset = 0;
  const std::byte* buffer = nullptr;
  uint32_t bytes = 0;
  int buffer_index = -1;
};

class IoRing {
 public:
  static constexpr int kMaxQueueDepth = 4096;

  // A ring of `queue_depth` entries (1..kMaxQueueDepth). Unavailable when the
  // kernel or a sandbox refuses io_uring (the message says so and what to do).
  static Result<std::unique_ptr<IoRing>> create(int queue_depth);
  ~IoRing();
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;

  int queue_depth() const { return queue_depth_; }

  // Registers host buffers (pinned by the kernel for the ring's life) so that
  // requests naming them skip the per-request page mapping. Replaces any
  // earlier registration. The buffers must outlive the registration.
  Status register_buffers(std::span<const iovec> buffers);
  void unregister_buffers();

  // Reads (or writes) every request and returns once all have completed. A
  // failed or short transfer gives IoError naming `what`, the offset and the
  // errno text; requests after a failure still complete before it returns.
  Status read(std::span<const IoRead> requests, const std::string& what);
  Status write(std::span<const IoWrite> requests, const std::string& what);

 private:
  struct Ring;
  IoRing(std::unique_ptr<Ring> ring, int queue_depth);
  template <class Request>
  Status run(std::span<const Request> requests, const std::string& what);

  std::unique_ptr<Ring> ring_;
  int queue_depth_ = 0;
  bool buffers_registered_ = false;
};

}  // namespace pqkv::storage
