// Micro-benchmarks of the disk tier's page reads, run by `pqkv micro`.
//
// A 256 MiB segment file (in $PQKV_IO_DIR, default the system's temporary
// directory) of 4 KiB pages, opened with O_DIRECT so the page cache does not
// answer for the disk. Each iteration reads 1024 pages at random offsets.
//
//   BM_IoUringRandomRead/QD  io_uring (liburing) at queue depth QD, registered
//                            buffers, batched submissions.
//   BM_PreadRandomRead       the baseline: one pread per page from one thread.
// Counters: IOPS and MB/s (4 KiB pages).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "storage/io_ring.h"
#include "storage/page_buffer.h"
#include "storage/segment_file.h"

namespace pqkv::tools {
namespace {

using storage::kPageBytes;

constexpr int64_t kFilePages = (256LL << 20) / kPageBytes;
constexpr int kReadsPerIteration = 1024;

// The benchmark file, written once per process and removed at exit.
class IoBenchFile {
 public:
  static IoBenchFile& get() {
    static IoBenchFile file;
    return file;
  }
  const std::string& error() const { return error_; }
  int fd() const { return fd_; }

 private:
  IoBenchFile() {
    const char* env = std::getenv("PQKV_IO_DIR");
    dir_ = env != nullptr ? env : "/tmp";
    name_ = "pqkv-io-bench-" + std::to_string(::getpid()) + ".seg";
    auto ring = storage::IoRing::create(32);
    if (!ring.ok()) {
      error_ = ring.status().to_string();
      return;
    }
    auto writer = storage::SegmentWriter::create(dir_, name_, ring->get());
    auto chunk = storage::PageBuffer::allocate(256);
    if (!writer.ok() || !chunk.ok()) {
      error_ = !writer.ok() ? writer.status().to_string() : chunk.status().to_string();
      return;
    }
    std::mt19937 rng(7);
    for (int64_t i = 0; i < chunk->bytes(); ++i)
      chunk->data()[i] = static_cast<std::byte>(rng());
    for (int64_t p = 0; p < kFilePages; p += chunk->pages()) {
      Status s = (*writer)->append({chunk->data(), static_cast<size_t>(chunk->bytes())});
      if (!s.ok()) {
        error_ = s.to_string();
        return;
      }
    }
    auto manifest = (*writer)->finish();
    if (!manifest.ok()) {
      error_ = manifest.status().to_string();
      return;
    }
    const std::string path = dir_ + "/" + name_;
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT);
    if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) error_ = "cannot reopen " + path;
  }
  ~IoBenchFile() {
    if (fd_ >= 0) ::close(fd_);
    ::unlink((dir_ + "/" + name_).c_str());
  }
  std::string dir_;
  std::string name_;
  std::string error_;
  int fd_ = -1;
};

std::vector<int64_t> random_pages(uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> pages(kReadsPerIteration);
  for (auto& p : pages)
    p = static_cast<int64_t>(rng() % kFilePages);
  return pages;
}

void set_counters(benchmark::State& state) {
  const double reads = static_cast<double>(state.iterations()) * kReadsPerIteration;
  state.counters["IOPS"] = benchmark::Counter(reads, benchmark::Counter::kIsRate);
  state.counters["MB/s"] =
      benchmark::Counter(reads * kPageBytes / 1e6, benchmark::Counter::kIsRate);
}

void BM_IoUringRandomRead(benchmark::State& state) {
  const IoBenchFile& file = IoBenchFile::get();
  if (!file.error().empty()) {
    state.SkipWithError(file.error().c_str());
    return;
  }
  const int depth = static_cast<int>(state.range(0));
  auto ring = storage::IoRing::create(depth);
  auto buffer = storage::PageBuffer::allocate(kReadsPerIteration);
  if (!ring.ok() || !buffer.ok()) {
    state.SkipWithError("cannot set up the ring or its buffers");
    return;
  }
  const iovec iov{buffer->data(), static_cast<size_t>(buffer->bytes())};
  if (!(*ring)->register_buffers({&iov, 1}).ok()) {
    state.SkipWithError("cannot register buffers");
    return;
  }
  std::vector<storage::IoRead> reads(kReadsPerIteration);
  uint32_t seed = 1;
  for (auto _ : state) {
    const std::vector<int64_t> pages = random_pages(seed++);
    for (int i = 0; i < kReadsPerIteration; ++i) {
      reads[i] = {file.fd(), pages[i] * kPageBytes, buffer->page(i).data(),
                  static_cast<uint32_t>(kPageBytes), 0};
    }
    Status s = (*ring)->read(reads, "benchmark file");
    if (!s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      return;
    }
  }
  set_counters(state);
}
BENCHMARK(BM_IoUringRandomRead)->RangeMultiplier(2)->Range(1, 128)->UseRealTime();

void BM_PreadRandomRead(benchmark::State& state) {
  const IoBenchFile& file = IoBenchFile::get();
  if (!file.error().empty()) {
    state.SkipWithError(file.error().c_str());
    return;
  }
  auto buffer = storage::PageBuffer::allocate(kReadsPerIteration);
  if (!buffer.ok()) {
    state.SkipWithError("cannot allocate buffers");
    return;
  }
  uint32_t seed = 1;
  for (auto _ : state) {
    const std::vector<int64_t> pages = random_pages(seed++);
    for (int i = 0; i < kReadsPerIteration; ++i) {
      if (::pread(file.fd(), buffer->page(i).data(), kPageBytes, pages[i] * kPageBytes) !=
          kPageBytes) {
        state.SkipWithError("pread failed");
        return;
      }
    }
  }
  set_counters(state);
}
BENCHMARK(BM_PreadRandomRead)->UseRealTime();

}  // namespace
}  // namespace pqkv::tools
