#include "core/host_memory.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
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
  // 2^63 and up (INT64_MAX itself rounds to 2^63 as a double) is past int64.
  if (!(bytes < 0x1p63)) {
    char text[32];
    std::snprintf(text, sizeof(text), "%.4g", bytes);
    return Status::resource_exhausted(std::string(what) + ": " + text +
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
