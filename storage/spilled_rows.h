// Row blocks of one sequence that left DRAM for segment files: the SSD tier's
// data (StoreOptions::spill_to_disk). When the Store's DRAM budget is
// reached, the row store writes cold blocks here and gives their memory back
// to the arena; a decode step reads the rows it selects back in 4 KiB page
// batches through io_uring into page-aligned staging.
//
// Layout: each spill writes one segment file (storage/segment_file.h: whole
// pages, O_DIRECT where allowed, one XXH3-64 checksum per page kept in
// memory) of whole blocks. A block of tokens_per_block rows takes
// pages_per_block() pages; a page holds rows_per_page() whole rows (a row
// never straddles two pages, so one row is one page read), padded with
// zeros. The files are private to the sequence: nothing names them in the
// catalog, and they are removed with the SpilledRows (when the sequence
// goes) or, after a crash, when the Store next opens the directory.
//
// Thread safety: one thread at a time (the thread that drives the sequence).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "pqkv/status.h"
#include "storage/io_ring.h"
#include "storage/page_buffer.h"
#include "storage/segment_file.h"

namespace pqkv::storage {

// What one read of spilled rows did.
struct SpillReadStats {
  int64_t rows = 0;    // rows asked for
  int64_t pages = 0;   // distinct 4 KiB pages read
  int64_t hits = 0;    // rows served from a page read for another row of the same read
  double read_us = 0;  // wall time of the page reads and their checksums
};

class SpilledRows {
 public:
  // Queue depth of the ring: page reads in flight at once.
  static constexpr int kQueueDepth = 64;

  // Spill files of one sequence in `directory` (which must exist), named
  // `file_prefix`-N.seg. Rows are `row_bytes` (<= kPageBytes; InvalidArgument
  // otherwise) in blocks of `tokens_per_block`. Unavailable when io_uring is
  // refused.
  static Result<std::unique_ptr<SpilledRows>> create(const std::string& directory,
                                                     const std::string& file_prefix,
                                                     int64_t row_bytes, int64_t tokens_per_block);
  // Closes and removes every file this object wrote.
  ~SpilledRows();
  SpilledRows(const SpilledRows&) = delete;
  SpilledRows& operator=(const SpilledRows&) = delete;

  int64_t rows_per_page() const { return rows_per_page_; }
  int64_t pages_per_block() const { return pages_per_block_; }

  // One block to write: rows [tokens_per_block][row_bytes] in host memory,
  // named by (layer, entry), entry being its index in the layer's row table
  // (RowTableView::block_index).
  struct BlockWrite {
    int layer = 0;
    int64_t entry = 0;
    const std::byte* rows = nullptr;
  };
  // Writes every block to one new segment file and makes it durable. All or
  // nothing: on IoError (or ResourceExhausted for the staging) no block is
  // recorded and the file is gone.
  [[nodiscard]] Status write(std::span<const BlockWrite> blocks);

  // True when (layer, entry) was written here.
  bool holds(int layer, int64_t entry) const;
  // Forgets block (layer, entry), which went back to DRAM; its pages stay
  // in their file until the SpilledRows goes.
  void forget(int layer, int64_t entry);
  // Blocks held and the bytes of their files.
  int64_t blocks() const { return blocks_; }
  int64_t file_bytes() const { return file_pages_ * kPageBytes; }
  // Paths of the files, in the order they were written.
  std::vector<std::string> file_paths() const;

  // One row to read: row `row` (0..tokens_per_block-1) of block (layer, entry).
  struct RowRead {
    int layer = 0;
    int64_t entry = 0;
    int64_t row = 0;
  };
  // Reads the distinct pages holding `rows` (each block held, asserted) in
  // batches at the ring's queue depth into staging registered with the
  // ring, checks every page's checksum, and sets out[i] to row i's bytes in
  // staging: valid until the next read or read_block. Corruption naming the
  // file and page on a checksum mismatch, IoError on a failed read,
  // ResourceExhausted when staging cannot grow. `stats` may be null.
  [[nodiscard]] Status read(std::span<const RowRead> rows, const std::byte** out,
                            SpillReadStats* stats);
  // Reads block (layer, entry) whole into `out` ([tokens_per_block][row_bytes],
  // host memory). The errors of read.
  [[nodiscard]] Status read_block(int layer, int64_t entry, std::byte* out);

 private:
  struct Location {
    int32_t segment = -1;  // index into segments_; -1: not here
    int32_t page = 0;      // the block's first page in it
  };
  SpilledRows(std::string directory, std::string file_prefix, std::unique_ptr<IoRing> ring,
              int64_t row_bytes, int64_t tokens_per_block);
  const Location* find(int layer, int64_t entry) const;
  // Makes staging hold `pages` pages (registered with the ring when the
  // kernel allows; unregistered reads otherwise).
  Status reserve_staging(int64_t pages);

  std::string directory_;
  std::string file_prefix_;
  std::unique_ptr<IoRing> ring_;
  int64_t row_bytes_;
  int64_t tokens_per_block_;
  int64_t rows_per_page_;
  int64_t pages_per_block_;
  std::vector<std::unique_ptr<SegmentReader>> segments_;
  std::vector<std::vector<Location>> locations_;  // [layer][entry]
  int64_t blocks_ = 0;
  int64_t file_pages_ = 0;
  PageBuffer staging_;
  int staging_index_ = -1;  // registered buffer index of staging_, or -1
  // Scratch of read(), reused.
  std::vector<uint64_t> keys_;   // [rows] (segment, page) of each row
  std::vector<uint64_t> pages_;  // distinct keys_, sorted
  std::vector<SegmentReader::PageRead> page_reads_;
};

}  // namespace pqkv::storage
