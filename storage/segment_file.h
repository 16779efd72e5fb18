// Segment files: the NVMe tier's data. A segment is one file of whole 4 KiB
// pages (K/V rows or codes), written once through io_uring, made durable, then
// only read. Its manifest (page count and one XXH3-64 checksum per page) is
// kept in the catalog, apart from the file, so a torn, truncated or altered
// file is detected when it is read, never served.
//
// Files are opened with O_DIRECT where the file system supports it (page
// cache bypassed, as the tier manages its own DRAM), buffered otherwise.
// Thread safety: a writer or reader is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pqkv/status.h"
#include "storage/io_ring.h"
#include "storage/page_buffer.h"

namespace pqkv::storage {

// XXH3-64 of one page.
uint64_t page_checksum(std::span<const std::byte> page);

struct SegmentManifest {
  std::string file;  // file name inside the store directory
  int64_t pages = 0;
  std::vector<uint64_t> checksums;  // [pages]

  // A versioned binary encoding for the catalog (docs/formats.md).
  std::string encode() const;
  // Corruption when `bytes` is not a manifest of this format version.
  static Result<SegmentManifest> decode(std::string_view bytes);
};

class SegmentWriter {
 public:
  // Creates `dir`/`file`, which must not exist (AlreadyExists otherwise).
  // `ring` must outlive the writer.
  static Result<std::unique_ptr<SegmentWriter>> create(const std::string& dir,
                                                       const std::string& file, IoRing* ring);
  // Removes the file unless finish() succeeded: a segment is whole or absent.
  ~SegmentWriter();
  SegmentWriter(const SegmentWriter&) = delete;
  SegmentWriter& operator=(const SegmentWriter&) = delete;

  // Appends whole pages: `pages` is page-aligned host memory whose size is a
  // multiple of kPageBytes (InvalidArgument otherwise). IoError on a failed write.
  Status append(std::span<const std::byte> pages);
  // Makes the file durable (fdatasync) and returns its manifest; the writer
  // takes no more pages after it.
  Result<SegmentManifest> finish();

 private:
  SegmentWriter(std::string path, int fd, IoRing* ring, std::string file);
  std::string path_;
  int fd_ = -1;
  IoRing* ring_;
  SegmentManifest manifest_;
  bool finished_ = false;
};

class SegmentReader {
 public:
  // Opens `dir`/`manifest.file`: NotFound when it is missing, Corruption when
  // it is shorter than its manifest. `ring` must outlive the reader.
  static Result<std::unique_ptr<SegmentReader>> open(const std::string& dir,
                                                     SegmentManifest manifest, IoRing* ring);
  ~SegmentReader();
  SegmentReader(const SegmentReader&) = delete;
  SegmentReader& operator=(const SegmentReader&) = delete;

  const SegmentManifest& manifest() const { return manifest_; }

  struct PageRead {
    int64_t page = 0;          // page index in the segment
    std::byte* out = nullptr;  // page-aligned host memory of kPageBytes
    int buffer_index = -1;     // the ring's registered buffer holding `out`, or -1
  };
  // Reads every page in batches at the ring's queue depth and checks each
  // checksum: OutOfRange for a page past the end, IoError for a failed read,
  // Corruption naming the file and page for a checksum mismatch.
  Status read(std::span<const PageRead> reads);

 private:
  SegmentReader(std::string path, int fd, IoRing* ring, SegmentManifest manifest);
  std::string path_;
  int fd_ = -1;
  IoRing* ring_;
  SegmentManifest manifest_;
  std::vector<IoRead> requests_;  // reused across reads
};

}  // namespace pqkv::storage
