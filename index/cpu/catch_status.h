// Keeps exceptions (Faiss's, std::bad_alloc) from leaving pqkv calls and TBB
// tasks: they become a Status at the boundary.
#pragma once

#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "pqkv/status.h"

namespace pqkv::index::cpu {

// Runs `fn` (returning a Status or a Result) and returns what it returns, or
// the Status of the exception it threw. `what` says which operation failed.
template <class Fn>
auto catch_as_status(const char* what, Fn&& fn) noexcept -> std::invoke_result_t<Fn> {
  using Returned = std::invoke_result_t<Fn>;
  try {
    return std::forward<Fn>(fn)();
  } catch (const std::bad_alloc&) {
    return Returned(Status::resource_exhausted(
        std::string(what) + ": out of host memory; free memory or index fewer tokens"));
  } catch (const std::exception& e) {
    return Returned(Status::internal(std::string(what) + " failed: " + e.what()));
  } catch (...) {
    return Returned(Status::internal(std::string(what) + " failed with an unknown exception"));
  }
}

// Collects the first failure of many concurrent tasks.
class TaskErrors {
 public:
  template <class Fn>
  void run(const char* what, Fn&& fn) noexcept {
    Status s = catch_as_status(what, std::forward<Fn>(fn));
    if (s.ok()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (first_.ok()) first_ = std::move(s);
  }
  Status status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return first_;
  }

 private:
  mutable std::mutex mu_;
  Status first_;
};

}  // namespace pqkv::index::cpu
