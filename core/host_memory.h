// The machine's memory, for refusing a size that cannot fit before allocating
// it: a failed allocation of terabytes costs seconds of paging (or aborts a
// sanitizer build) where one comparison answers at once.
#pragma once

#include <string_view>

#include "pqkv/status.h"

namespace pqkv {

// Bytes of physical memory of this machine (sysconf's pages times page size);
// 0 when the system does not say. Thread-safe.
double host_memory_bytes();

// ResourceExhausted when `bytes` (a double: a product of counts may pass
// int64) is more than this machine's memory or INT64_MAX, naming `what` and
// the sizes; OK otherwise, and always when the machine's size is unknown.
// Thread-safe.
Status check_fits_host_memory(double bytes, std::string_view what);

}  // namespace pqkv
