// Page-aligned host memory for the disk tier: O_DIRECT transfers need buffers
// aligned to the device's logical block, and pqkv pages are 4 KiB.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>

#include "pqkv/status.h"

namespace pqkv::storage {

inline constexpr int64_t kPageBytes = 4096;

// Bytes rounded up to whole pages.
constexpr int64_t round_up_to_pages(int64_t bytes) {
  return (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
}

// An owned, zero-filled, page-aligned host buffer of whole pages.
class PageBuffer {
 public:
  PageBuffer() = default;
  // ResourceExhausted when the allocation fails.
  static Result<PageBuffer> allocate(int64_t pages);

  std::byte* data() const { return data_.get(); }
  int64_t pages() const { return pages_; }
  int64_t bytes() const { return pages_ * kPageBytes; }
  std::span<std::byte> page(int64_t i) const {
    return {data_.get() + i * kPageBytes, static_cast<size_t>(kPageBytes)};
  }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte[], Free> data_;
  int64_t pages_ = 0;
};

}  // namespace pqkv::storage
