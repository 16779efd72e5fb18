#include "storage/page_buffer.h"

#include <cstring>
#include <string>

namespace pqkv::storage {

Result<PageBuffer> PageBuffer::allocate(int64_t pages) {
  PageBuffer b;
  if (pages <= 0) return b;
  void* p = nullptr;
  if (posix_memalign(&p, static_cast<size_t>(kPageBytes),
                     static_cast<size_t>(pages * kPageBytes)) != 0) {
    return Status::resource_exhausted("no memory for " + std::to_string(pages) +
                                      " pages of I/O buffer");
  }
  std::memset(p, 0, static_cast<size_t>(pages * kPageBytes));
  b.data_.reset(static_cast<std::byte*>(p));
  b.pages_ = pages;
  return b;
}

}  // namespace pqkv::storage
