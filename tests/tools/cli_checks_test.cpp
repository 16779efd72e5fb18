// The input and output checks the commands share, and terminal escaping.
#include "tools/cli_checks.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

namespace pqkv::tools {
namespace {

namespace fs = std::filesystem;

TEST(TerminalTextTest, EscapesControlBytesAndInvalidUtf8) {
  TerminalText t;
  EXPECT_EQ(t.feed("a\tb\nc"), "a\tb\nc");
  EXPECT_EQ(t.feed("\x1b[31m"), "\\x1b[31m");
  EXPECT_EQ(t.feed(std::string("\x00\x7f", 2)), "\\x00\\x7f");
  EXPECT_EQ(t.feed("\xff\xc0"), "\\xff\\xc0");
  EXPECT_EQ(t.feed("caf\xc3\xa9"), "caf\xc3\xa9");
  EXPECT_EQ(t.finish(), "");
}

TEST(TerminalTextTest, HoldsACharacterSplitAcrossPieces) {
  TerminalText t;
  EXPECT_EQ(t.feed("x\xe2\x82"), "x");  // the first two bytes of the euro sign
  EXPECT_EQ(t.feed("\xac!"), "\xe2\x82\xac!");
  EXPECT_EQ(t.feed("\xe2"), "");
  EXPECT_EQ(t.feed("a"), "\\xe2a");  // a lead byte without its continuation
  EXPECT_EQ(t.feed("\xf0\x9f"), "");
  EXPECT_EQ(t.finish(), "\\xf0\\x9f");
}

TEST(FiniteAtLeastTest, RefusesNanInfAndValuesBelowTheBound) {
  const CLI::Validator v = finite_at_least(1);
  for (std::string ok : {"1", "2.5", "1e3", "64"})
    EXPECT_EQ(v(ok), "") << ok;
  for (std::string bad : {"0", "-1", "nan", "NaN", "inf", "-inf", "1e999", "0.5", ""}) {
    const std::string message = v(bad);
    EXPECT_NE(message.find("must be a finite number >= 1, got " + (bad.empty() ? "''" : bad)),
              std::string::npos)
        << bad << ": " << message;
  }
  std::string word = "many";  // not a number: left to the flag's conversion error
  EXPECT_EQ(v(word), "");
}

class PathCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("pqkv_paths_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(PathCheckTest, OutputPaths) {
  PQKV_EXPECT_OK(check_output_path("--json", (dir_ / "a.json").string(), false));
  PQKV_EXPECT_OK(check_output_path("--json", "-", true));
  EXPECT_EQ(check_output_path("--plot", "-", false).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_output_path("--json", "", true).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_output_path("--json", dir_.string(), true).code(), StatusCode::kInvalidArgument);
  const Status missing = check_output_path("--json", (dir_ / "no" / "a.json").string(), true);
  EXPECT_EQ(missing.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(missing.message().find("--json"), std::string::npos) << missing.to_string();
  EXPECT_FALSE(fs::exists(dir_ / "a.json"));  // checking writes nothing
}

TEST_F(PathCheckTest, InputFiles) {
  const fs::path empty = dir_ / "empty.txt";
  std::ofstream(empty).close();
  const fs::path text = dir_ / "text.txt";
  std::ofstream(text) << "hello";
  PQKV_EXPECT_OK(check_input_file("--prompt-file", text.string()));
  PQKV_EXPECT_OK(check_input_file("--prompt-file", empty.string(), /*allow_empty=*/true));
  EXPECT_EQ(check_input_file("--prompt-file", empty.string()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_input_file("--prompt-file", dir_.string()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_input_file("--prompt-file", (dir_ / "missing").string()).code(),
            StatusCode::kNotFound);
  // Reading /dev/zero never ended; checking a pipe waited for its writer.
  const Status device = check_input_file("--prompt-file", "/dev/zero");
  EXPECT_EQ(device.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(device.message().find("not a regular file"), std::string::npos) << device.to_string();
  EXPECT_EQ(check_input_file("--prompt-file", "/dev/null", true).code(),
            StatusCode::kInvalidArgument);
  const fs::path fifo = dir_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(check_input_file("--prompt-file", fifo.string()).code(), StatusCode::kInvalidArgument);
}

// Writing JSON to a FIFO nobody reads waited forever after the whole run:
// refused at once; with a reader, the path is fine.
TEST_F(PathCheckTest, AnOutputFifoNeedsAReader) {
  const fs::path fifo = dir_ / "out.fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const Status none = check_output_path("--json", fifo.string(), true);
  EXPECT_EQ(none.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(none.message().find("no process reads"), std::string::npos) << none.to_string();
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK);
  ASSERT_GE(reader, 0) << std::strerror(errno);
  PQKV_EXPECT_OK(check_output_path("--json", fifo.string(), true));
  ::close(reader);
}

}  // namespace
}  // namespace pqkv::tools
