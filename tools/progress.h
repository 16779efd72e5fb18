// A one-line progress bar on stderr for long runs; silent when stderr is not a
// terminal, so logs stay clean.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace pqkv::tools {

class Progress {
 public:
  Progress(std::string label, int64_t total)
      : label_(std::move(label)),
        total_(total),
        start_(std::chrono::steady_clock::now()),
        enabled_(isatty(STDERR_FILENO) != 0) {}
  ~Progress() { finish(); }

  void tick(int64_t n = 1) {
    done_ += n;
    if (!enabled_) return;
    const double secs = elapsed();
    const int width = 30;
    const int filled = total_ > 0 ? static_cast<int>(width * done_ / total_) : width;
    std::fprintf(stderr, "\r%-24s [%s%s] %lld/%lld  %.1fs", label_.c_str(),
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 static_cast<long long>(done_), static_cast<long long>(total_), secs);
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_ && !finished_) std::fprintf(stderr, "\n");
    finished_ = true;
  }
  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::string label_;
  int64_t total_;
  int64_t done_ = 0;
  std::chrono::steady_clock::time_point start_;
  bool enabled_;
  bool finished_ = false;
};

}  // namespace pqkv::tools
