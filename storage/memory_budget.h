// A byte budget shared by every sequence of a Store: reservations fail with a
// clear ResourceExhausted instead of the process running out of memory.
#pragma once

#include <atomic>
#include <cstdint>

#include "pqkv/status.h"

namespace pqkv::storage {

class MemoryBudget {
 public:
  // `memory` names what is budgeted ("host memory"), `budget` the budget
  // ("DRAM") and `option` the option that sets it, for the error messages.
  explicit MemoryBudget(int64_t limit_bytes, const char* memory = "host memory",
                        const char* budget = "DRAM",
                        const char* option = "StoreOptions::dram_budget_bytes")
      : limit_(limit_bytes), memory_(memory), budget_(budget), option_(option) {}

  // Reserves `bytes` or, when that would pass the limit, reserves nothing and
  // says how much was asked for, used and allowed. `what` names the request.
  [[nodiscard]] Status reserve(int64_t bytes, const char* what);
  void release(int64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

  int64_t used() const { return used_.load(std::memory_order_relaxed); }
  int64_t limit() const { return limit_; }  // 0 = unlimited

 private:
  const int64_t limit_;
  const char* memory_;
  const char* budget_;
  const char* option_;
  std::atomic<int64_t> used_{0};
};

}  // namespace pqkv::storage
