#include "storage/memory_budget.h"

#include <string>

namespace pqkv::storage {
namespace {

// Bytes in MiB, or KiB below one MiB, so small requests do not read as 0.
std::string mib(int64_t bytes) {
  if (bytes < (int64_t{1} << 20)) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

Status MemoryBudget::reserve(int64_t bytes, const char* what) {
  int64_t current = used_.load(std::memory_order_relaxed);
  do {
    if (limit_ > 0 && current + bytes > limit_) {
      return Status::resource_exhausted(std::string(what) + " needs " + mib(bytes) + " more " +
                                        memory_ + ", but " + mib(current) + " of the store's " +
                                        budget_ + " budget of " + mib(limit_) +
                                        " is in use; raise " + option_ + " or drop sequences");
    }
  } while (!used_.compare_exchange_weak(current, current + bytes, std::memory_order_relaxed));
  return ok_status();
}

}  // namespace pqkv::storage
