#include "storage/segment_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace pqkv::storage {
namespace {

constexpr uint32_t kManifestMagic = 0x5047534d;  // "PGSM"
constexpr uint32_t kManifestVersion = 1;
// One write request moves at most this many bytes (whole pages).
constexpr int64_t kMaxWriteBytes = 1 << 20;

std::string join(const std::string& dir, const std::string& file) {
  return dir.empty() ? file : dir + "/" + file;
}

// Opens with O_DIRECT, or buffered where the file system refuses O_DIRECT (tmpfs).
int open_direct(const std::string& path, int flags, mode_t mode) {
  int fd = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, mode);
  if (fd < 0 && errno == EINVAL) fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  return fd;
}

template <class T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(v));
}

template <class T>
bool get(std::string_view& in, T* v) {
  if (in.size() < sizeof(T)) return false;
  std::memcpy(v, in.data(), sizeof(T));
  in.remove_prefix(sizeof(T));
  return true;
}

}  // namespace

uint64_t page_checksum(std::span<const std::byte> page) {
  return XXH3_64bits(page.data(), page.size());
}

std::string SegmentManifest::encode() const {
  std::string out;
  put(out, kManifestMagic);
  put(out, kManifestVersion);
  put(out, static_cast<uint32_t>(file.size()));
  out += file;
  put(out, pages);
  for (uint64_t c : checksums)
    put(out, c);
  return out;
}

Result<SegmentManifest> SegmentManifest::decode(std::string_view bytes) {
  uint32_t magic = 0;
  uint32_t version = 0;
  uint32_t name_size = 0;
  SegmentManifest m;
  if (!get(bytes, &magic) || magic != kManifestMagic || !get(bytes, &version)) {
    return Status::corruption("a segment manifest in the catalog is not one (bad magic)");
  }
  if (version != kManifestVersion) {
    return Status::corruption("segment manifest format " + std::to_string(version) +
                              " is not the supported " + std::to_string(kManifestVersion));
  }
  if (!get(bytes, &name_size) || bytes.size() < name_size) {
    return Status::corruption("a segment manifest is truncated (file name)");
  }
  m.file.assign(bytes.substr(0, name_size));
  bytes.remove_prefix(name_size);
  // The name is joined to the store's directory to read and delete the file:
  // one with a '/' (or "..") would reach outside it.
  if (m.file.empty() || m.file == "." || m.file == ".." ||
      m.file.find_first_of(std::string_view("/\0", 2)) != std::string::npos) {
    return Status::corruption("a segment manifest names the file '" + m.file +
                              "', which is not a file name inside the store directory");
  }
  // Compared as a division: pages * 8 of a damaged count can wrap around.
  if (!get(bytes, &m.pages) || m.pages < 0 || bytes.size() % sizeof(uint64_t) != 0 ||
      static_cast<uint64_t>(m.pages) != bytes.size() / sizeof(uint64_t)) {
    return Status::corruption("the manifest of segment '" + m.file +
                              "' is truncated or has a bad page count");
  }
  m.checksums.resize(static_cast<size_t>(m.pages));
  std::memcpy(m.checksums.data(), bytes.data(), bytes.size());
  return m;
}

SegmentWriter::SegmentWriter(std::string path, int fd, IoRing* ring, std::string file)
    : path_(std::move(path)), fd_(fd), ring_(ring) {
  manifest_.file = std::move(file);
}

SegmentWriter::~SegmentWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) ::unlink(path_.c_str());
}

Result<std::unique_ptr<SegmentWriter>> SegmentWriter::create(const std::string& dir,
                                                             const std::string& file,
                                                             IoRing* ring) {
  const std::string path = join(dir, file);
  const int fd = open_direct(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd < 0) {
    const int err = errno;
    if (err == EEXIST) {
      return Status::already_exists("segment file " + path + " exists already");
    }
    return Status::io_error("cannot create segment file " + path + ": " + std::strerror(err));
  }
  return std::unique_ptr<SegmentWriter>(new SegmentWriter(path, fd, ring, file));
}

Status SegmentWriter::append(std::span<const std::byte> pages) {
  if (finished_) return Status::failed_precondition("segment " + path_ + " is finished");
  if (pages.size() % kPageBytes != 0 ||
      reinterpret_cast<uintptr_t>(pages.data()) % kPageBytes != 0) {
    return Status::invalid_argument("segment writes take page-aligned whole 4 KiB pages, got " +
                                    std::to_string(pages.size()) + " bytes");
  }
  const int64_t n = static_cast<int64_t>(pages.size()) / kPageBytes;
  std::vector<IoWrite> requests;
  for (int64_t off = 0; off < static_cast<int64_t>(pages.size()); off += kMaxWriteBytes) {
    IoWrite r;
    r.fd = fd_;
    r.offset = manifest_.pages * kPageBytes + off;
    r.buffer = pages.data() + off;
    r.bytes = static_cast<uint32_t>(std::min<int64_t>(kMaxWriteBytes, pages.size() - off));
    requests.push_back(r);
  }
  PQKV_RETURN_IF_ERROR(ring_->write(requests, "segment " + path_));
  for (int64_t i = 0; i < n; ++i)
    manifest_.checksums.push_back(page_checksum(pages.subspan(i * kPageBytes, kPageBytes)));
  manifest_.pages += n;
  return ok_status();
}

Result<SegmentManifest> SegmentWriter::finish() {
  if (finished_) return Status::failed_precondition("segment " + path_ + " is finished");
  if (::fdatasync(fd_) != 0) {
    return Status::io_error("fdatasync of segment " + path_ + " failed: " + std::strerror(errno));
  }
  ::close(fd_);
  fd_ = -1;
  finished_ = true;
  return manifest_;
}

SegmentReader::SegmentReader(std::string path, int fd, IoRing* ring, SegmentManifest manifest)
    : path_(std::move(path)), fd_(fd), ring_(ring), manifest_(std::move(manifest)) {}

SegmentReader::~SegmentReader() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<SegmentReader>> SegmentReader::open(const std::string& dir,
                                                           SegmentManifest manifest, IoRing* ring) {
  const std::string path = join(dir, manifest.file);
  // O_NONBLOCK: a FIFO put in the file's place would block the open until
  // some process wrote to it; regular files ignore it.
  const int fd = open_direct(path, O_RDONLY | O_NONBLOCK, 0);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) {
      return Status::not_found("segment file " + path +
                               " is missing; the store's catalog names it");
    }
    return Status::io_error("cannot open segment file " + path + ": " + std::strerror(err));
  }
  struct stat st {};
  const bool stated = ::fstat(fd, &st) == 0;
  if (stated && !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::corruption("segment file " + path +
                              " is not a regular file (a folder, a device or a pipe stands in "
                              "its place); the store's catalog names it");
  }
  if (!stated || st.st_size < manifest.pages * kPageBytes) {
    ::close(fd);
    return Status::corruption(
        "segment file " + path + " is truncated: " + std::to_string(st.st_size) +
        " bytes, its manifest says " + std::to_string(manifest.pages * kPageBytes));
  }
  return std::unique_ptr<SegmentReader>(new SegmentReader(path, fd, ring, std::move(manifest)));
}

Status SegmentReader::read(std::span<const PageRead> reads) {
  requests_.clear();
  for (const PageRead& r : reads) {
    if (r.page < 0 || r.page >= manifest_.pages) {
      return Status::out_of_range("page " + std::to_string(r.page) + " of segment " + path_ +
                                  ", which has " + std::to_string(manifest_.pages));
    }
    IoRead io;
    io.fd = fd_;
    io.offset = r.page * kPageBytes;
    io.buffer = r.out;
    io.bytes = static_cast<uint32_t>(kPageBytes);
    io.buffer_index = r.buffer_index;
    requests_.push_back(io);
  }
  PQKV_RETURN_IF_ERROR(ring_->read(requests_, "segment " + path_));
  for (const PageRead& r : reads) {
    const uint64_t sum = page_checksum({r.out, static_cast<size_t>(kPageBytes)});
    if (sum != manifest_.checksums[static_cast<size_t>(r.page)]) {
      return Status::corruption("segment file " + path_ + ": page " + std::to_string(r.page) +
                                " fails its checksum; the file was altered or torn");
    }
  }
  return ok_status();
}

}  // namespace pqkv::storage
