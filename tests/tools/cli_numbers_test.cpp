// Every numeric flag of every `pqkv` command reads decimal numbers only.
// CLI11 reads integers in base 0 (--layers 010 ran 8 layers, --layers 0x10
// 16) and floats with strtod (0x1p3, nan, inf, leading spaces). The flags are
// found in each command's --help, so a flag added later is covered too.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tools/cli_checks.h"
#include "tools/cli_run.h"

namespace pqkv::tools {
namespace {

struct NumericFlag {
  std::string command;
  std::string flag;
  bool integer = false;
  std::string range;  // "MIN..MAX" of its whole_in / number_in check, or empty
};

// The INT, UINT and FLOAT options of `command`'s --help.
std::vector<NumericFlag> numeric_flags(const std::string& command) {
  const CliRun help = pqkv(command + " --help");
  EXPECT_EQ(help.code, 0) << describe(help);
  std::vector<NumericFlag> out;
  const std::regex line(R"(^\s+(--[a-z0-9-]+) (INT|UINT|FLOAT)(\S*))");
  const std::regex range(R"(in (-?[0-9.e+]+\.\.-?[0-9.e+]+))");
  std::istringstream in(help.out);
  for (std::string l; std::getline(in, l);) {
    std::smatch m;
    if (!std::regex_search(l, m, line)) continue;
    NumericFlag f{command, m[1], m[2] != "FLOAT", ""};
    std::smatch r;
    const std::string rest = m[3];
    if (std::regex_search(rest, r, range)) f.range = r[1];
    out.push_back(f);
  }
  return out;
}

TEST(CliNumbersTest, EveryNumericFlagRefusesWhatIsNotDecimal) {
  TempDir dir;
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(hay) << "text";
  const std::string d = "'" + dir.path().string() + "'";
  // Arguments that let each command parse; a flag under test is left out of
  // them. --no-such-flag makes a parse that accepted the value fail before
  // any work.
  const std::map<std::string, std::vector<std::pair<std::string, std::string>>> base = {
      {"bench", {}},
      {"generate", {{"--model", d}, {"--prompt-ids", "1"}}},
      {"needle", {{"--model", d}, {"--haystack", "'" + hay.string() + "'"}}},
      {"inspect", {{"", d}}},
      {"export-faiss",
       {{"", d}, {"--sequence", "a"}, {"--layer", "0"}, {"--head", "0"}, {"--out", "x"}}},
      {"random-model", {{"--out", d}}},
      {"tokenize", {{"--model", d}}}};
  const std::vector<std::string> not_numbers = {"0x10", "0b1", "' 5'", "'5 '",  "5k",   "''",
                                                "+5",   "nan", "inf",  "1e999", "0x1p3"};
  const std::vector<std::string> not_integers = {"1e3", "1.5", "99999999999999999999"};
  int flags = 0;
  for (const auto& [command, args] : base) {
    for (const NumericFlag& f : numeric_flags(command)) {
      ++flags;
      std::string given;
      for (const auto& [flag, value] : args)
        if (flag != f.flag) given += " " + flag + " " + value;
      std::vector<std::string> all = not_numbers;
      if (f.integer) all.insert(all.end(), not_integers.begin(), not_integers.end());
      // Three values per flag, taken in turn, so that each value meets
      // integer and float flags of several commands (a pqkv start takes
      // tens of milliseconds).
      std::vector<std::string> values;
      for (int j = 0; j < 3; ++j)
        values.push_back(all[(static_cast<size_t>(flags) * 3 + j) % all.size()]);
      for (const std::string& v : values) {
        SCOPED_TRACE(command + " " + f.flag + " " + v);
        const CliRun r = pqkv(command + given + " " + f.flag + " " + v + " --no-such-flag");
        EXPECT_EQ(r.code, 2) << describe(r);
        EXPECT_NE(r.err.find(f.flag + ": must be a "), std::string::npos) << describe(r);
      }
      // Past either end of its range: the message names the range.
      if (f.integer && !f.range.empty()) {
        const std::string lo = f.range.substr(0, f.range.find(".."));
        const std::string hi = f.range.substr(f.range.find("..") + 2);
        for (const std::string& v : {flags % 2 == 0 ? std::to_string(std::stoll(lo) - 1)
                                                    : std::to_string(std::stoll(hi)) + "0"}) {
          SCOPED_TRACE(command + " " + f.flag + " " + v);
          const CliRun r = pqkv(command + given + " " + f.flag + " " + v + " --no-such-flag");
          EXPECT_EQ(r.code, 2) << describe(r);
          EXPECT_NE(r.err.find(f.flag + ": must be a "), std::string::npos) << describe(r);
        }
      }
    }
  }
  EXPECT_GT(flags, 30);
}

TEST(CliNumbersTest, LeadingZerosAreDecimal) {
  // Base 0 read --layers 010 as 8 layers.
  TempDir dir;
  const CliRun r = pqkv("random-model --out '" + dir.path().string() +
                        "' --layers 010 --hidden 0064 --heads 02 --kv-heads 01 --intermediate 08");
  ASSERT_EQ(r.code, 0) << describe(r);
  const nlohmann::json config = nlohmann::json::parse(read_file(dir.path() / "config.json"));
  EXPECT_EQ(config.at("num_hidden_layers"), 10);
  EXPECT_EQ(config.at("hidden_size"), 64);
  EXPECT_EQ(config.at("intermediate_size"), 8);
}

TEST(CliNumbersTest, BlockCacheTakesDecimalBytesOrAPercentageOnly) {
  // std::stod read 0x10 as 16 bytes and " 5%" as 5%; infG was cast to int64
  // (undefined).
  for (const std::string v :
       {"0x10", "infG", "inf", "nan%", "' 5%'", "1e30G", "5%%", "-1M", "G", "5T", "101%"}) {
    SCOPED_TRACE(v);
    const CliRun r =
        pqkv("bench --model tiny --layers 1 --context 64 --steps 1 --block-cache " + v);
    EXPECT_EQ(r.code, 2) << describe(r);
    EXPECT_NE(r.err.find("--block-cache must be bytes"), std::string::npos) << describe(r);
  }
}

TEST(ParseDecimalTest, TakesDecimalNumbersOnly) {
  EXPECT_EQ(parse_decimal("2"), 2.0);
  EXPECT_EQ(parse_decimal("-1.5"), -1.5);
  EXPECT_EQ(parse_decimal(".5"), 0.5);
  EXPECT_EQ(parse_decimal("3e4"), 3e4);
  EXPECT_EQ(parse_decimal("010"), 10.0);
  EXPECT_EQ(parse_decimal("1E-3"), 1e-3);
  for (const char* bad : {"", "-", ".", "e3", "1e", "0x10", "nan", "inf", "-inf", " 1", "1 ", "+1",
                          "1e999", "1e-999", "1.2.3", "1,5", "0x1p3", "1e+"}) {
    EXPECT_FALSE(parse_decimal(bad).has_value()) << "'" << bad << "'";
  }
}

}  // namespace
}  // namespace pqkv::tools
