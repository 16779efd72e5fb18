#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "storage/catalog.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

namespace fs = std::filesystem;

class CatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("pqkv-catalog-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(CatalogTest, BatchesAreAtomicAndSurviveReopen) {
  {
    auto c = Catalog::open(dir_.string(), true);
    PQKV_ASSERT_OK(c);
    Catalog::Batch b;
    b.put("seq/a", "alpha");
    b.put("seq/b", "beta");
    b.put("seg/a/0", "manifest");
    Status s = (*c)->commit(b);
    PQKV_ASSERT_OK(s);
    Catalog::Batch d;
    d.remove("seq/b");
    d.put("seq/c", "gamma");
    s = (*c)->commit(d);
    PQKV_ASSERT_OK(s);
  }
  auto c = Catalog::open(dir_.string(), false);
  PQKV_ASSERT_OK(c);
  auto a = (*c)->get("seq/a");
  PQKV_ASSERT_OK(a);
  EXPECT_EQ(*a, "alpha");
  EXPECT_EQ((*c)->get("seq/b").status().code(), StatusCode::kNotFound);
  auto seqs = (*c)->scan("seq/");
  PQKV_ASSERT_OK(seqs);
  ASSERT_EQ(seqs->size(), 2u);
  EXPECT_EQ((*seqs)[0].first, "seq/a");
  EXPECT_EQ((*seqs)[1].second, "gamma");
  Status s = (*c)->compact();
  PQKV_EXPECT_OK(s);
}

TEST_F(CatalogTest, MissingStoreIsNotFoundWithoutCreating) {
  auto c = Catalog::open(dir_.string(), false);
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find(dir_.string()), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_));
}

// A store opened twice (two Store handles, or two processes) was an IoError
// quoting RocksDB ("lock hold by current process"), saying nothing of what
// to do.
TEST_F(CatalogTest, ACatalogOpenAlreadyIsFailedPreconditionSayingWhatToDo) {
  auto first = Catalog::open(dir_.string(), true);
  PQKV_ASSERT_OK(first);
  auto second = Catalog::open(dir_.string(), true);
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition) << second.status().to_string();
  EXPECT_NE(second.status().message().find("is open already"), std::string::npos);
  // Reading it meanwhile works.
  PQKV_EXPECT_OK(Catalog::open_read_only(dir_.string()));
  first->reset();
  PQKV_EXPECT_OK(Catalog::open(dir_.string(), false));
}

// One flipped byte in the catalog's log opened it without the entries after
// the flip (RocksDB's point-in-time recovery), silently.
TEST_F(CatalogTest, ADamagedLogIsCorruptionNotLostEntries) {
  {
    auto c = Catalog::open(dir_.string(), true);
    PQKV_ASSERT_OK(c);
    for (int i = 0; i < 8; ++i) {
      Catalog::Batch b;
      b.put(std::string("k").append(std::to_string(i)),
            std::string(200, static_cast<char>('a' + i)));
      PQKV_ASSERT_OK((*c)->commit(b));
    }
  }
  fs::path log;
  for (const auto& e : fs::directory_iterator(dir_ / "catalog"))
    if (e.path().extension() == ".log" && fs::file_size(e.path()) > 0) log = e.path();
  ASSERT_FALSE(log.empty());
  {
    std::fstream f(log, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(log) / 3));
    f.put('\x5a');
  }
  for (bool read_only : {true, false}) {
    auto c =
        read_only ? Catalog::open_read_only(dir_.string()) : Catalog::open(dir_.string(), false);
    if (c.ok()) {
      for (int i = 0; i < 8; ++i)
        EXPECT_TRUE((*c)->get(std::string("k").append(std::to_string(i))).ok()) << i;
    } else {
      EXPECT_EQ(c.status().code(), StatusCode::kCorruption) << c.status().to_string();
    }
  }
}

TEST_F(CatalogTest, OtherFormatVersionIsRefused) {
  {
    auto c = Catalog::open(dir_.string(), true);
    PQKV_ASSERT_OK(c);
    Catalog::Batch b;
    b.put("meta/format", "999");
    Status s = (*c)->commit(b);
    PQKV_ASSERT_OK(s);
  }
  auto c = Catalog::open(dir_.string(), false);
  EXPECT_EQ(c.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(c.status().message().find("999"), std::string::npos) << c.status().message();
}

TEST_F(CatalogTest, ReadOnlyReadsAnOpenCatalogAndWritesNothing) {
  EXPECT_EQ(Catalog::open_read_only(dir_.string()).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(fs::exists(dir_));
  auto writer = Catalog::open(dir_.string(), true);
  PQKV_ASSERT_OK(writer);
  Catalog::Batch b;
  b.put("seq/a", "alpha");
  PQKV_ASSERT_OK((*writer)->commit(b));
  const auto before = testing::file_listing(dir_);
  {
    // The writer still holds the catalog (and RocksDB's lock).
    auto reader = Catalog::open_read_only(dir_.string());
    PQKV_ASSERT_OK(reader);
    auto a = (*reader)->get("seq/a");
    PQKV_ASSERT_OK(a);
    EXPECT_EQ(*a, "alpha");
    Catalog::Batch c;
    c.put("seq/b", "beta");
    const Status s = (*reader)->commit(c);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
    EXPECT_NE(s.message().find("read-only"), std::string::npos) << s.to_string();
    EXPECT_EQ((*reader)->compact().code(), StatusCode::kFailedPrecondition);
  }
  EXPECT_EQ(testing::file_listing(dir_), before);
  EXPECT_EQ((*writer)->get("seq/b").status().code(), StatusCode::kNotFound);
}

// verify() reads every table file: a flipped byte in a block that no get has
// read yet is found, named by its file, on a read-only catalog too; an
// intact catalog verifies.
TEST_F(CatalogTest, VerifyFindsADamagedTableFileThatNoReadTouched) {
  {
    auto c = Catalog::open(dir_.string(), true);
    PQKV_ASSERT_OK(c);
    for (int i = 0; i < 64; ++i) {
      Catalog::Batch b;
      b.put("k" + std::to_string(i), std::string(1000, static_cast<char>('a' + i % 26)));
      PQKV_ASSERT_OK((*c)->commit(b));
    }
    PQKV_ASSERT_OK((*c)->compact());  // the entries move from the log to a table file
    PQKV_EXPECT_OK((*c)->verify());
  }
  fs::path table;
  for (const auto& e : fs::directory_iterator(dir_ / "catalog"))
    if (e.path().extension() == ".sst") table = e.path();
  ASSERT_FALSE(table.empty());
  {
    auto c = Catalog::open_read_only(dir_.string());
    PQKV_ASSERT_OK(c);
    PQKV_EXPECT_OK((*c)->verify());
  }
  {
    std::fstream f(table, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);  // inside the first data block
    f.put('\x5a');
  }
  for (bool read_only : {true, false}) {
    auto c =
        read_only ? Catalog::open_read_only(dir_.string()) : Catalog::open(dir_.string(), false);
    if (!c.ok()) {
      EXPECT_EQ(c.status().code(), StatusCode::kCorruption) << c.status().to_string();
      continue;
    }
    const Status s = (*c)->verify();
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << read_only << ": " << s.to_string();
    EXPECT_NE(s.message().find(table.filename().string()), std::string::npos) << s.to_string();
  }
}

}  // namespace
}  // namespace pqkv::storage
