#include "storage/io_ring.h"

#include <liburing.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

namespace pqkv::storage {

struct IoRing::Ring {
  io_uring ring{};
};

namespace {

std::string errno_text(int err) {
  return std::strerror(err < 0 ? -err : err);
}

}  // namespace

IoRing::IoRing(std::unique_ptr<Ring> ring, int queue_depth)
    : ring_(std::move(ring)), queue_depth_(queue_depth) {}

IoRing::~IoRing() {
  io_uring_queue_exit(&ring_->ring);
}

Result<std::unique_ptr<IoRing>> IoRing::create(int queue_depth) {
  if (queue_depth < 1 || queue_depth > kMaxQueueDepth) {
    return Status::invalid_argument("io_uring queue depth must be 1.." +
                                    std::to_string(kMaxQueueDepth) + ", got " +
                                    std::to_string(queue_depth));
  }
  auto ring = std::unique_ptr<Ring>(new (std::nothrow) Ring);
  if (ring == nullptr) return Status::resource_exhausted("no memory for an io_uring");
  const int rc = io_uring_queue_init(static_cast<unsigned>(queue_depth), &ring->ring, 0);
  if (rc < 0) {
    return Status::unavailable("io_uring_queue_init failed: " + errno_text(rc) +
                               "; the kernel or a sandbox (seccomp) refuses io_uring, which the "
                               "disk tier needs: run where io_uring is allowed");
  }
  return std::unique_ptr<IoRing>(new IoRing(std::move(ring), queue_depth));
}

Status IoRing::register_buffers(std::span<const iovec> buffers) {
  unregister_buffers();
  if (buffers.empty()) return ok_status();
  const int rc = io_uring_register_buffers(&ring_->ring, buffers.data(),
                                           static_cast<unsigned>(buffers.size()));
  if (rc < 0) {
    return Status::resource_exhausted("io_uring_register_buffers of " +
                                      std::to_string(buffers.size()) +
                                      " buffers failed: " + errno_text(rc) +
                                      " (the locked-memory limit, ulimit -l, may be too low)");
  }
  buffers_registered_ = true;
  return ok_status();
}

void IoRing::unregister_buffers() {
  if (buffers_registered_) io_uring_unregister_buffers(&ring_->ring);
  buffers_registered_ = false;
}

Status IoRing::read(std::span<const IoRead> requests, const std::string& what) {
  return run(requests, what);
}

Status IoRing::write(std::span<const IoWrite> requests, const std::string& what) {
  return run(requests, what);
}

template <class Request>
Status IoRing::run(std::span<const Request> requests, const std::string& what) {
  constexpr bool write = std::is_same_v<Request, IoWrite>;
  io_uring* ring = &ring_->ring;
  const size_t n = requests.size();
  size_t next = 0;
  size_t done = 0;
  size_t in_flight = 0;
  Status first_error;
  while (done < n) {
    while (next < n && in_flight < static_cast<size_t>(queue_depth_)) {
      io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (sqe == nullptr) break;
      const Request& r = requests[next];
      const auto offset = static_cast<uint64_t>(r.offset);
      if constexpr (write) {
        if (r.buffer_index >= 0) {
          io_uring_prep_write_fixed(sqe, r.fd, r.buffer, r.bytes, offset, r.buffer_index);
        } else {
          io_uring_prep_write(sqe, r.fd, r.buffer, r.bytes, offset);
        }
      } else {
        if (r.buffer_index >= 0) {
          io_uring_prep_read_fixed(sqe, r.fd, r.buffer, r.bytes, offset, r.buffer_index);
        } else {
          io_uring_prep_read(sqe, r.fd, r.buffer, r.bytes, offset);
        }
      }
      io_uring_sqe_set_data64(sqe, next);
      ++next;
      ++in_flight;
    }
    const int rc = io_uring_submit_and_wait(ring, 1);
    if (rc < 0 && rc != -EINTR) {
      return Status::io_error("io_uring submit for " + what + " failed: " + errno_text(rc));
    }
    unsigned head = 0;
    unsigned seen = 0;
    io_uring_cqe* cqe = nullptr;
    io_uring_for_each_cqe(ring, head, cqe) {
      const Request& r = requests[io_uring_cqe_get_data64(cqe)];
      if (first_error.ok() && cqe->res != static_cast<int>(r.bytes)) {
        const std::string op = write ? "write" : "read";
        first_error = Status::io_error(
            what + ": " + op + " of " + std::to_string(r.bytes) + " bytes at offset " +
            std::to_string(r.offset) + " " +
            (cqe->res < 0 ? "failed: " + errno_text(cqe->res)
                          : "was short (" + std::to_string(cqe->res) +
                                " bytes): the file is shorter than its manifest says"));
      }
      ++seen;
    }
    io_uring_cq_advance(ring, seen);
    done += seen;
    in_flight -= seen;
  }
  return first_error;
}

}  // namespace pqkv::storage
