// Helpers shared by the test suites.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "pqkv/device.h"
#include "pqkv/status.h"

namespace pqkv::testing {

// Size and modification time of every regular file under `dir`, by path:
// equal before and after a call that must write nothing there.
inline std::map<std::string, std::pair<uintmax_t, std::filesystem::file_time_type>> file_listing(
    const std::filesystem::path& dir) {
  std::map<std::string, std::pair<uintmax_t, std::filesystem::file_time_type>> files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) files[e.path().string()] = {e.file_size(), e.last_write_time()};
  }
  return files;
}

// The Status of a Status or of a Result<T>, for the macros below.
inline const Status& status_of(const Status& s) {
  return s;
}
template <class T>
const Status& status_of(const Result<T>& r) {
  return r.status();
}

// Assert (fatal) or expect that the expression, a Status or a Result, is OK;
// on failure the test prints the expression and the Status message. The
// expression is evaluated once; it may hold unparenthesised commas
// (`f(x, {1, 2})`).
#define PQKV_ASSERT_OK(...)                                                                       \
  do {                                                                                            \
    const ::pqkv::Status pqkv_test_status_ = ::pqkv::testing::status_of((__VA_ARGS__));           \
    ASSERT_TRUE(pqkv_test_status_.ok()) << #__VA_ARGS__ << ": " << pqkv_test_status_.to_string(); \
  } while (0)
#define PQKV_EXPECT_OK(...)                                                                       \
  do {                                                                                            \
    const ::pqkv::Status pqkv_test_status_ = ::pqkv::testing::status_of((__VA_ARGS__));           \
    EXPECT_TRUE(pqkv_test_status_.ok()) << #__VA_ARGS__ << ": " << pqkv_test_status_.to_string(); \
  } while (0)

// Skips the current test, with the reason, where no CUDA device is usable.
#define PQKV_SKIP_IF_NO_GPU()                                                        \
  do {                                                                               \
    if (::pqkv::cuda_device_count() == 0) {                                          \
      GTEST_SKIP() << "no CUDA device found (or pqkv built without CUDA): GPU test " \
                      "skipped; run this suite on a machine with a GPU";             \
    }                                                                                \
  } while (0)

// Normal(0, 1) floats from a fixed seed.
inline std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v)
    x = dist(rng);
  return v;
}

// ||a - b|| / ||b||.
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0;
  double den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// The shared fixtures (models, haystack texts) beside the checkout; empty when absent.
inline std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("PQKV_SHARED_DIR")) return env;
  return PQKV_SHARED_DIR;
}

}  // namespace pqkv::testing
