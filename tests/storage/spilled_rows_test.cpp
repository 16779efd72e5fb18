// SpilledRows: blocks written to spill files read back byte for byte, by row
// (page batches, shared pages counted as hits) and whole; a damaged page is
// a Corruption naming the file and page; the files go with the object.
#include "storage/spilled_rows.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace pqkv::storage {
namespace {

namespace fs = std::filesystem;

class SpilledRowsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("pqkv-spilled-rows-test-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

constexpr int64_t kTokens = 128;

// Blocks of random bytes: [n][kTokens][row_bytes].
std::vector<std::byte> random_blocks(int64_t n, int64_t row_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> b(static_cast<size_t>(n * kTokens * row_bytes));
  for (auto& x : b)
    x = static_cast<std::byte>(rng());
  return b;
}

TEST_F(SpilledRowsTest, RowsReadBackAsWritten) {
  for (const int64_t row_bytes : {int64_t{128}, int64_t{384}, int64_t{512}}) {
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE("row_bytes " + std::to_string(row_bytes) + ", seed " + std::to_string(seed));
    auto spilled =
        SpilledRows::create(dir_.string(), "t" + std::to_string(row_bytes), row_bytes, kTokens);
    if (spilled.status().code() == StatusCode::kUnavailable) {
      GTEST_SKIP() << spilled.status().to_string();
    }
    PQKV_ASSERT_OK(spilled);
    const int64_t n = 5;
    const auto data = random_blocks(n, row_bytes, seed);
    std::vector<SpilledRows::BlockWrite> writes;
    for (int64_t b = 0; b < n; ++b)
      writes.push_back({static_cast<int>(b % 2), 10 + b, data.data() + b * kTokens * row_bytes});
    PQKV_ASSERT_OK((*spilled)->write(writes));
    EXPECT_EQ((*spilled)->blocks(), n);
    EXPECT_TRUE((*spilled)->holds(1, 11));
    EXPECT_FALSE((*spilled)->holds(1, 10));

    std::mt19937_64 rng(seed);
    std::vector<SpilledRows::RowRead> reads;
    std::vector<int64_t> block_of;
    for (int i = 0; i < 97; ++i) {
      const int64_t b = static_cast<int64_t>(rng() % n);
      reads.push_back({static_cast<int>(b % 2), 10 + b, static_cast<int64_t>(rng() % kTokens)});
      block_of.push_back(b);
    }
    std::vector<const std::byte*> out(reads.size());
    SpillReadStats stats;
    PQKV_ASSERT_OK((*spilled)->read(reads, out.data(), &stats));
    EXPECT_EQ(stats.rows, 97);
    EXPECT_EQ(stats.hits, stats.rows - stats.pages);
    for (size_t i = 0; i < reads.size(); ++i) {
      const std::byte* want = data.data() + (block_of[i] * kTokens + reads[i].row) * row_bytes;
      EXPECT_EQ(std::memcmp(out[i], want, static_cast<size_t>(row_bytes)), 0) << "read " << i;
    }
    std::vector<std::byte> block(static_cast<size_t>(kTokens * row_bytes));
    PQKV_ASSERT_OK((*spilled)->read_block(0, 12, block.data()));
    EXPECT_EQ(std::memcmp(block.data(), data.data() + 2 * kTokens * row_bytes, block.size()), 0);

    const auto paths = (*spilled)->file_paths();
    ASSERT_EQ(paths.size(), 1u);
    EXPECT_TRUE(fs::exists(paths[0]));
    spilled->reset();
    EXPECT_FALSE(fs::exists(paths[0]));
  }
}

TEST_F(SpilledRowsTest, DamagedPageIsCorruptionNamingFileAndPage) {
  const int64_t row_bytes = 512;
  auto spilled = SpilledRows::create(dir_.string(), "bad", row_bytes, kTokens);
  if (spilled.status().code() == StatusCode::kUnavailable) {
    GTEST_SKIP() << spilled.status().to_string();
  }
  PQKV_ASSERT_OK(spilled);
  const auto data = random_blocks(2, row_bytes, 7);
  const SpilledRows::BlockWrite writes[] = {{0, 0, data.data()},
                                            {0, 1, data.data() + kTokens * row_bytes}};
  PQKV_ASSERT_OK((*spilled)->write(writes));
  const std::string path = (*spilled)->file_paths().at(0);
  {
    // Row 9 of block 1: page 16 + 9 / 8 = 17.
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(17 * kPageBytes + 3);
    f.put('\x7f');
  }
  const SpilledRows::RowRead bad[] = {{0, 1, 9}};
  const std::byte* out = nullptr;
  const Status s = (*spilled)->read(bad, &out, nullptr);
  ASSERT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
  EXPECT_NE(s.message().find(path), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("page 17"), std::string::npos) << s.to_string();
  // Other pages still read.
  const SpilledRows::RowRead good[] = {{0, 0, 9}};
  PQKV_EXPECT_OK((*spilled)->read(good, &out, nullptr));
}

}  // namespace
}  // namespace pqkv::storage
