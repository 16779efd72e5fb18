// Status and Result<T>: how every fallible pqkv call reports what went wrong.
// A non-OK Status carries a code and a message that says what was wrong and
// what to do about it. No pqkv API throws. Both are [[nodiscard]]: a result
// that is dropped is a warning.
#pragma once

#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "pqkv/export.h"

namespace pqkv {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument = 1,     // the caller passed something malformed
  kFailedPrecondition = 2,  // the call is valid, but not in the object's current state
  kNotFound = 3,
  kAlreadyExists = 4,
  kOutOfRange = 5,
  kResourceExhausted = 6,  // a memory budget or device memory ran out
  kUnimplemented = 7,
  kUnavailable = 8,  // e.g. no CUDA device
  kIoError = 9,
  kCorruption = 10,
  kInternal = 11,  // a bug in pqkv; please report
};

PQKV_API const char* status_code_name(StatusCode code);

class [[nodiscard]] PQKV_API Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return {}; }
  static Status invalid_argument(std::string m) {
    return {StatusCode::kInvalidArgument, std::move(m)};
  }
  static Status failed_precondition(std::string m) {
    return {StatusCode::kFailedPrecondition, std::move(m)};
  }
  static Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status already_exists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
  static Status resource_exhausted(std::string m) {
    return {StatusCode::kResourceExhausted, std::move(m)};
  }
  static Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
  static Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status io_error(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
  static Status corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "InvalidArgument: keys must be [tokens, kv_heads, head_dim], got [3, 4]".
  std::string to_string() const;

  // Prefixes the message with where it happened, keeping the code.
  Status with_context(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status ok_status() {
  return {};
}

// Either a value or the Status that explains why there is none. Check ok()
// before value(): value() (and *, ->) on an error prints the Status to stderr
// and aborts the process, in every build type.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}         // NOLINT(google-explicit-constructor)
  Result(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    assert(!status_.ok() && "a Result built from a Status must carry an error");
  }

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & {
    check_has_value();
    return *value_;
  }
  const T& value() const& {
    check_has_value();
    return *value_;
  }
  T&& value() && {
    check_has_value();
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

 private:
  void check_has_value() const {
    if (!value_.has_value()) {
      std::fprintf(stderr, "pqkv: Result::value() called on an error: %s\n",
                   status_.to_string().c_str());
      std::abort();
    }
  }

  Status status_;
  std::optional<T> value_;
};

}  // namespace pqkv

#define PQKV_CONCAT_INNER_(a, b) a##b
#define PQKV_CONCAT_(a, b) PQKV_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define PQKV_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::pqkv::Status pqkv_status_ = (expr);        \
    if (!pqkv_status_.ok()) return pqkv_status_; \
  } while (0)

// `PQKV_ASSIGN_OR_RETURN(auto x, make_x());` binds the value or returns the error.
// It expands to several statements: inside an `if` or a loop, use braces.
#define PQKV_ASSIGN_OR_RETURN(lhs, expr) \
  PQKV_ASSIGN_OR_RETURN_IMPL_(PQKV_CONCAT_(pqkv_result_, __LINE__), lhs, expr)
#define PQKV_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
