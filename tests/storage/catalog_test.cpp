#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <string>

#include "storage/catalog.h"

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
    ASSERT_TRUE(c.ok()) << c.status().to_string();
    Catalog::Batch b;
    b.put("seq/a", "alpha");
    b.put("seq/b", "beta");
    b.put("seg/a/0", "manifest");
    Status s = (*c)->commit(b);
    ASSERT_TRUE(s.ok()) << s.to_string();
    Catalog::Batch d;
    d.remove("seq/b");
    d.put("seq/c", "gamma");
    s = (*c)->commit(d);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  auto c = Catalog::open(dir_.string(), false);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  auto a = (*c)->get("seq/a");
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  EXPECT_EQ(*a, "alpha");
  EXPECT_EQ((*c)->get("seq/b").status().code(), StatusCode::kNotFound);
  auto seqs = (*c)->scan("seq/");
  ASSERT_TRUE(seqs.ok()) << seqs.status().to_string();
  ASSERT_EQ(seqs->size(), 2u);
  EXPECT_EQ((*seqs)[0].first, "seq/a");
  EXPECT_EQ((*seqs)[1].second, "gamma");
  Status s = (*c)->compact();
  EXPECT_TRUE(s.ok()) << s.to_string();
}

TEST_F(CatalogTest, MissingStoreIsNotFoundWithoutCreating) {
  auto c = Catalog::open(dir_.string(), false);
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find(dir_.string()), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_));
}

TEST_F(CatalogTest, OtherFormatVersionIsRefused) {
  {
    auto c = Catalog::open(dir_.string(), true);
    ASSERT_TRUE(c.ok()) << c.status().to_string();
    Catalog::Batch b;
    b.put("meta/format", "999");
    Status s = (*c)->commit(b);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  auto c = Catalog::open(dir_.string(), false);
  EXPECT_EQ(c.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(c.status().message().find("999"), std::string::npos) << c.status().message();
}

}  // namespace
}  // namespace pqkv::storage
