#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "storage/io_ring.h"
#include "storage/page_buffer.h"
#include "storage/segment_file.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system's temporary directory, removed afterwards.
class SegmentFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("pqkv-segment-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto ring = IoRing::create(32);
    PQKV_ASSERT_OK(ring);
    ring_ = std::move(ring).value();
  }
  void TearDown() override { fs::remove_all(dir_); }

  // `pages` pages of random bytes drawn with `seed`.
  static PageBuffer random_pages(int64_t pages, uint32_t seed) {
    auto b = PageBuffer::allocate(pages);
    PQKV_EXPECT_OK(b);
    PageBuffer buf = std::move(b).value();
    std::mt19937 rng(seed);
    for (int64_t i = 0; i < buf.bytes(); ++i)
      buf.data()[i] = static_cast<std::byte>(rng());
    return buf;
  }

  // Writes `data` as segment `file` and returns its manifest.
  SegmentManifest write_segment(const std::string& file, const PageBuffer& data) {
    auto w = SegmentWriter::create(dir_.string(), file, ring_.get());
    PQKV_EXPECT_OK(w);
    // Two appends of uneven size must equal one.
    const int64_t first = data.pages() / 3;
    Status s = (*w)->append({data.data(), static_cast<size_t>(first * kPageBytes)});
    PQKV_EXPECT_OK(s);
    s = (*w)->append({data.data() + first * kPageBytes,
                      static_cast<size_t>((data.pages() - first) * kPageBytes)});
    PQKV_EXPECT_OK(s);
    auto m = (*w)->finish();
    PQKV_EXPECT_OK(m);
    return std::move(m).value();
  }

  fs::path dir_;
  std::unique_ptr<IoRing> ring_;
};

TEST_F(SegmentFileTest, PagesReadBackInAnyOrderAcrossBatches) {
  const uint32_t seed = 17;
  SCOPED_TRACE("seed " + std::to_string(seed));
  // 300 pages (1.2 MB: more than one write request) read at queue depth 32.
  PageBuffer data = random_pages(300, seed);
  const SegmentManifest m = write_segment("seg-0.pqkv", data);
  EXPECT_EQ(m.pages, 300);
  EXPECT_EQ(fs::file_size(dir_ / "seg-0.pqkv"), 300u * kPageBytes);

  auto r = SegmentReader::open(dir_.string(), m, ring_.get());
  PQKV_ASSERT_OK(r);
  PageBuffer back = std::move(PageBuffer::allocate(97)).value();
  std::vector<SegmentReader::PageRead> reads;
  std::mt19937 rng(seed);
  std::vector<int64_t> pages;
  for (int i = 0; i < 97; ++i) {
    pages.push_back(static_cast<int64_t>(rng() % 300));
    reads.push_back({pages.back(), back.page(i).data()});
  }
  Status s = (*r)->read(reads);
  PQKV_ASSERT_OK(s);
  for (int i = 0; i < 97; ++i) {
    ASSERT_EQ(0, std::memcmp(back.page(i).data(), data.page(pages[i]).data(), kPageBytes))
        << "page " << pages[i];
  }
}

TEST_F(SegmentFileTest, ManifestRoundTripsAndRefusesGarbage) {
  PageBuffer data = random_pages(5, 3);
  const SegmentManifest m = write_segment("seg-1.pqkv", data);
  auto back = SegmentManifest::decode(m.encode());
  PQKV_ASSERT_OK(back);
  EXPECT_EQ(back->file, "seg-1.pqkv");
  EXPECT_EQ(back->pages, 5);
  EXPECT_EQ(back->checksums, m.checksums);
  std::string bytes = m.encode();
  for (size_t cut : {size_t{0}, size_t{3}, size_t{9}, bytes.size() - 1}) {
    auto bad = SegmentManifest::decode(std::string_view(bytes).substr(0, cut));
    EXPECT_EQ(bad.status().code(), StatusCode::kCorruption) << "cut at " << cut;
  }
}

// A manifest read from a damaged catalog: a page count whose byte size wraps
// around 2^64 once matched an empty checksum list (and then allocated 2^61
// checksums), and a file name with a '/' led reads and deletes outside the
// store directory.
TEST_F(SegmentFileTest, ManifestRefusesWrappingPageCountsAndNamesOutsideTheStore) {
  SegmentManifest m;
  m.file = "seg-1.pqkv";
  m.pages = 0;
  std::string bytes = m.encode();
  const int64_t wrapping = int64_t{1} << 61;  // * 8 bytes = 2^64, 0 after the wrap
  std::memcpy(bytes.data() + bytes.size() - sizeof(int64_t), &wrapping, sizeof(wrapping));
  auto wrapped = SegmentManifest::decode(bytes);
  EXPECT_EQ(wrapped.status().code(), StatusCode::kCorruption) << wrapped.status().to_string();
  for (const std::string& name : std::vector<std::string>{
           "../seg-1.pqkv", "/etc/passwd", "a/b", "..", ".", "", std::string("seg\0x", 5)}) {
    SegmentManifest outside;
    outside.file = name;
    auto bad = SegmentManifest::decode(outside.encode());
    EXPECT_EQ(bad.status().code(), StatusCode::kCorruption) << "'" << name << "'";
  }
}

TEST_F(SegmentFileTest, FlippedBitIsCorruptionNamingFileAndPage) {
  PageBuffer data = random_pages(8, 5);
  const SegmentManifest m = write_segment("seg-2.pqkv", data);
  {
    const int fd = ::open((dir_ / "seg-2.pqkv").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char c = 0;
    ASSERT_EQ(::pread(fd, &c, 1, 6 * kPageBytes + 100), 1);
    c ^= 0x10;
    ASSERT_EQ(::pwrite(fd, &c, 1, 6 * kPageBytes + 100), 1);
    ::close(fd);
  }
  auto r = SegmentReader::open(dir_.string(), m, ring_.get());
  PQKV_ASSERT_OK(r);
  PageBuffer back = std::move(PageBuffer::allocate(2)).value();
  const SegmentReader::PageRead intact[] = {{5, back.page(0).data()}};
  Status s = (*r)->read(intact);
  PQKV_EXPECT_OK(s);  // the rest of the file stays readable
  const SegmentReader::PageRead torn[] = {{6, back.page(1).data()}};
  s = (*r)->read(torn);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("seg-2.pqkv"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("page 6"), std::string::npos) << s.message();
}

TEST_F(SegmentFileTest, TruncatedAndMissingFilesAreClearErrors) {
  PageBuffer data = random_pages(4, 7);
  const SegmentManifest m = write_segment("seg-3.pqkv", data);
  fs::resize_file(dir_ / "seg-3.pqkv", 3 * kPageBytes + 10);
  auto r = SegmentReader::open(dir_.string(), m, ring_.get());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_NE(r.status().message().find("truncated"), std::string::npos) << r.status().message();
  fs::remove(dir_ / "seg-3.pqkv");
  r = SegmentReader::open(dir_.string(), m, ring_.get());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("seg-3.pqkv"), std::string::npos) << r.status().message();
}

TEST_F(SegmentFileTest, UnfinishedSegmentLeavesNoFileAndNamesAreNotReused) {
  PageBuffer data = random_pages(2, 9);
  {
    auto w = SegmentWriter::create(dir_.string(), "seg-4.pqkv", ring_.get());
    PQKV_ASSERT_OK(w);
    Status s = (*w)->append({data.data(), static_cast<size_t>(data.bytes())});
    PQKV_ASSERT_OK(s);
    // Unaligned or partial pages are refused.
    s = (*w)->append({data.data() + 1, static_cast<size_t>(kPageBytes)});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  }
  EXPECT_FALSE(fs::exists(dir_ / "seg-4.pqkv"));
  write_segment("seg-5.pqkv", data);
  auto again = SegmentWriter::create(dir_.string(), "seg-5.pqkv", ring_.get());
  EXPECT_EQ(again.status().code(), StatusCode::kAlreadyExists);
}

TEST_F(SegmentFileTest, RegisteredBuffersReadLikePlainOnes) {
  PageBuffer data = random_pages(16, 11);
  const SegmentManifest m = write_segment("seg-6.pqkv", data);
  auto r = SegmentReader::open(dir_.string(), m, ring_.get());
  PQKV_ASSERT_OK(r);
  PageBuffer back = std::move(PageBuffer::allocate(16)).value();
  const iovec iov{back.data(), static_cast<size_t>(back.bytes())};
  Status s = ring_->register_buffers({&iov, 1});
  PQKV_ASSERT_OK(s);
  const int fd = ::open((dir_ / "seg-6.pqkv").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<IoRead> reads;
  for (int i = 0; i < 16; ++i) {
    reads.push_back(
        {fd, (15 - i) * kPageBytes, back.page(i).data(), static_cast<uint32_t>(kPageBytes), 0});
  }
  s = ring_->read(reads, "seg-6");
  ::close(fd);
  PQKV_ASSERT_OK(s);
  for (int i = 0; i < 16; ++i)
    EXPECT_EQ(0, std::memcmp(back.page(i).data(), data.page(15 - i).data(), kPageBytes)) << i;
  ring_->unregister_buffers();
}

TEST(IoRingTest, RefusesBadQueueDepths) {
  EXPECT_EQ(IoRing::create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(IoRing::create(IoRing::kMaxQueueDepth + 1).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv::storage
