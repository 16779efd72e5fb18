#include "storage/spilled_rows.h"

#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
#include <new>

namespace pqkv::storage {
namespace {

uint64_t page_key(int64_t segment, int64_t page) {
  return (static_cast<uint64_t>(segment) << 32) | static_cast<uint64_t>(page);
}

// A spill page that fails its checksum says what it means for the caller:
// those rows left DRAM and exist nowhere else.
Status with_spill_advice(Status s) {
  if (s.code() != StatusCode::kCorruption) return s;
  return Status::corruption(s.message() +
                            "; these rows were spilled from DRAM and exist only in that file: drop "
                            "the sequence and prefill it again, and check the disk");
}

}  // namespace

SpilledRows::SpilledRows(std::string directory, std::string file_prefix,
                         std::unique_ptr<IoRing> ring, int64_t row_bytes, int64_t tokens_per_block)
    : directory_(std::move(directory)),
      file_prefix_(std::move(file_prefix)),
      ring_(std::move(ring)),
      row_bytes_(row_bytes),
      tokens_per_block_(tokens_per_block),
      rows_per_page_(kPageBytes / row_bytes),
      pages_per_block_((tokens_per_block + rows_per_page_ - 1) / rows_per_page_) {}

SpilledRows::~SpilledRows() {
  ring_->unregister_buffers();
  const std::vector<std::string> paths = file_paths();
  segments_.clear();
  for (const std::string& path : paths)
    ::unlink(path.c_str());
}

Result<std::unique_ptr<SpilledRows>> SpilledRows::create(const std::string& directory,
                                                         const std::string& file_prefix,
                                                         int64_t row_bytes,
                                                         int64_t tokens_per_block) {
  if (row_bytes <= 0 || row_bytes > kPageBytes) {
    return Status::invalid_argument("spilling to disk needs rows of 1.." +
                                    std::to_string(kPageBytes) + " bytes, got " +
                                    std::to_string(row_bytes));
  }
  PQKV_ASSIGN_OR_RETURN(auto ring, IoRing::create(kQueueDepth));
  return std::unique_ptr<SpilledRows>(
      new SpilledRows(directory, file_prefix, std::move(ring), row_bytes, tokens_per_block));
}

std::vector<std::string> SpilledRows::file_paths() const {
  std::vector<std::string> paths;
  for (const auto& s : segments_)
    paths.push_back(directory_ + "/" + s->manifest().file);
  return paths;
}

const SpilledRows::Location* SpilledRows::find(int layer, int64_t entry) const {
  if (layer < 0 || layer >= static_cast<int>(locations_.size())) return nullptr;
  const auto& list = locations_[static_cast<size_t>(layer)];
  if (entry < 0 || entry >= static_cast<int64_t>(list.size())) return nullptr;
  const Location& loc = list[static_cast<size_t>(entry)];
  return loc.segment >= 0 ? &loc : nullptr;
}

bool SpilledRows::holds(int layer, int64_t entry) const {
  return find(layer, entry) != nullptr;
}

void SpilledRows::forget(int layer, int64_t entry) {
  if (find(layer, entry) == nullptr) return;
  locations_[static_cast<size_t>(layer)][static_cast<size_t>(entry)].segment = -1;
  --blocks_;
}

Status SpilledRows::write(std::span<const BlockWrite> blocks) {
  if (blocks.empty()) return ok_status();
  const int64_t pages = static_cast<int64_t>(blocks.size()) * pages_per_block_;
  PQKV_ASSIGN_OR_RETURN(PageBuffer buffer, PageBuffer::allocate(pages));
  for (size_t b = 0; b < blocks.size(); ++b) {
    std::byte* base = buffer.data() + static_cast<int64_t>(b) * pages_per_block_ * kPageBytes;
    for (int64_t r = 0; r < tokens_per_block_; ++r) {
      std::memcpy(base + (r / rows_per_page_) * kPageBytes + (r % rows_per_page_) * row_bytes_,
                  blocks[b].rows + r * row_bytes_, static_cast<size_t>(row_bytes_));
    }
  }
  const std::string file = file_prefix_ + "-" + std::to_string(segments_.size()) + ".seg";
  const std::string what =
      "spilling " + std::to_string(blocks.size()) + " row blocks to " + directory_ + "/" + file;
  try {
    segments_.reserve(segments_.size() + 1);
    for (const BlockWrite& b : blocks) {
      if (static_cast<int>(locations_.size()) <= b.layer) locations_.resize(b.layer + 1);
      auto& list = locations_[static_cast<size_t>(b.layer)];
      if (static_cast<int64_t>(list.size()) <= b.entry) list.resize(b.entry + 1);
    }
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the spill table; " + what);
  }
  auto writer = SegmentWriter::create(directory_, file, ring_.get());
  if (!writer.ok()) return writer.status().with_context(what);
  Status s = (*writer)->append({buffer.data(), static_cast<size_t>(buffer.bytes())});
  if (!s.ok()) return s.with_context(what);
  auto manifest = (*writer)->finish();
  if (!manifest.ok()) return manifest.status().with_context(what);
  auto reader = SegmentReader::open(directory_, std::move(manifest).value(), ring_.get());
  if (!reader.ok()) {
    ::unlink((directory_ + "/" + file).c_str());
    return reader.status().with_context(what);
  }
  const auto segment = static_cast<int32_t>(segments_.size());
  segments_.push_back(std::move(reader).value());
  for (size_t b = 0; b < blocks.size(); ++b) {
    Location& loc =
        locations_[static_cast<size_t>(blocks[b].layer)][static_cast<size_t>(blocks[b].entry)];
    loc.segment = segment;
    loc.page = static_cast<int32_t>(static_cast<int64_t>(b) * pages_per_block_);
  }
  blocks_ += static_cast<int64_t>(blocks.size());
  file_pages_ += pages;
  return ok_status();
}

Status SpilledRows::reserve_staging(int64_t pages) {
  if (staging_.pages() >= pages) return ok_status();
  ring_->unregister_buffers();
  staging_index_ = -1;
  // Grown by half again, so a run of slightly larger steps registers rarely.
  PQKV_ASSIGN_OR_RETURN(staging_, PageBuffer::allocate(std::max(pages, staging_.pages() * 3 / 2)));
  const iovec iov{staging_.data(), static_cast<size_t>(staging_.bytes())};
  // Registration saves the kernel a page mapping per read; where the
  // locked-memory limit refuses it, unregistered reads still work.
  if (ring_->register_buffers({&iov, 1}).ok()) staging_index_ = 0;
  return ok_status();
}

Status SpilledRows::read(std::span<const RowRead> rows, const std::byte** out,
                         SpillReadStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    keys_.resize(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      const Location* loc = find(rows[i].layer, rows[i].entry);
      assert(loc != nullptr);
      keys_[i] = page_key(loc->segment, loc->page + rows[i].row / rows_per_page_);
    }
    // Distinct pages in (segment, page) order: each file is read in one
    // batch in offset order.
    pages_ = keys_;
    std::sort(pages_.begin(), pages_.end());
    pages_.erase(std::unique(pages_.begin(), pages_.end()), pages_.end());
    page_reads_.reserve(pages_.size());
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("out of host memory for the spilled rows' read list");
  }
  const std::vector<uint64_t>& pages = pages_;
  PQKV_RETURN_IF_ERROR(reserve_staging(static_cast<int64_t>(pages.size())));
  size_t first = 0;
  while (first < pages.size()) {
    const uint64_t segment = pages[first] >> 32;
    page_reads_.clear();
    size_t p = first;
    for (; p < pages.size() && (pages[p] >> 32) == segment; ++p) {
      SegmentReader::PageRead r;
      r.page = static_cast<int64_t>(pages[p] & 0xffffffffu);
      r.out = staging_.data() + static_cast<int64_t>(p) * kPageBytes;
      r.buffer_index = staging_index_;
      page_reads_.push_back(r);
    }
    PQKV_RETURN_IF_ERROR(with_spill_advice(segments_[segment]->read(page_reads_)));
    first = p;
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto slot = std::lower_bound(pages.begin(), pages.end(), keys_[i]) - pages.begin();
    out[i] = staging_.data() + slot * kPageBytes + (rows[i].row % rows_per_page_) * row_bytes_;
  }
  if (stats != nullptr) {
    stats->rows = static_cast<int64_t>(rows.size());
    stats->pages = static_cast<int64_t>(pages.size());
    stats->hits = stats->rows - stats->pages;
    stats->read_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  return ok_status();
}

Status SpilledRows::read_block(int layer, int64_t entry, std::byte* out) {
  const Location* loc = find(layer, entry);
  assert(loc != nullptr);
  PQKV_RETURN_IF_ERROR(reserve_staging(pages_per_block_));
  page_reads_.clear();
  for (int64_t p = 0; p < pages_per_block_; ++p) {
    SegmentReader::PageRead r;
    r.page = loc->page + p;
    r.out = staging_.data() + p * kPageBytes;
    r.buffer_index = staging_index_;
    page_reads_.push_back(r);
  }
  PQKV_RETURN_IF_ERROR(
      with_spill_advice(segments_[static_cast<size_t>(loc->segment)]->read(page_reads_)));
  for (int64_t r = 0; r < tokens_per_block_; ++r) {
    std::memcpy(
        out + r * row_bytes_,
        staging_.data() + (r / rows_per_page_) * kPageBytes + (r % rows_per_page_) * row_bytes_,
        static_cast<size_t>(row_bytes_));
  }
  return ok_status();
}

}  // namespace pqkv::storage
