#include "core/host_memory.h"

#include <unistd.h>

#include <cstdint>
#include <limits>
#include <string>

namespace pqkv {

double host_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<double>(pages) * static_cast<double>(page_size);
}

Status check_fits_host_memory(double bytes, std::string_view what) {
  const double machine = host_memory_bytes();
  if (bytes > static_cast<double>(std::numeric_limits<int64_t>::max())) {
    return Status::resource_exhausted(std::string(what) + ": " + std::to_string(bytes) +
                                      " bytes is past what a size can hold");
  }
  if (machine > 0 && bytes > machine) {
    return Status::resource_exhausted(
        std::string(what) + ": " + std::to_string(static_cast<int64_t>(bytes)) +
        " bytes are more than this machine's " + std::to_string(static_cast<int64_t>(machine)) +
        " bytes of memory");
  }
  return ok_status();
}

}  // namespace pqkv
