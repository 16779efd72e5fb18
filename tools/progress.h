// A one-line progress bar on stderr for long runs; silent when stderr is not a
// terminal, so logs stay clean.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "pqkv/sequence.h"

namespace pqkv::tools {

class Progress {
 public:
  Progress(std::string label, int64_t total)
      : label_(std::move(label)),
        total_(total),
        start_(std::chrono::steady_clock::now()),
        enabled_(total > 0 && isatty(STDERR_FILENO) != 0) {}
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

// A callback for Sequence::finish_prefill that shows the index build as one
// line on stderr ("building indexes [#####.....] 12/32 layers 3.1s"), on a
// terminal only and once the build has run for a second, so that short builds
// print nothing; the line is erased when the build ends. Empty (no output)
// when `enabled` is false.
inline BuildProgressCallback build_progress_line(bool enabled) {
  if (!enabled || isatty(STDERR_FILENO) == 0) return {};
  return [shown = false](const BuildProgress& p) mutable {
    const bool done = p.layers_done >= p.num_layers;
    if (!shown && (p.elapsed_s < 1.0 || done)) return;
    shown = true;
    if (done) {
      std::fprintf(stderr, "\r\033[K");
    } else {
      const int width = 30;
      const int filled = p.num_layers > 0 ? width * p.layers_done / p.num_layers : width;
      std::fprintf(stderr, "\rbuilding indexes [%s%s] %d/%d layers, %lld tokens  %.1fs",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                   p.layers_done, p.num_layers, static_cast<long long>(p.tokens), p.elapsed_s);
    }
    std::fflush(stderr);
  };
}

}  // namespace pqkv::tools
