// Runs the built `pqkv` command as a user runs it, for the tools suite:
// exit code, stdout and stderr apart, and a temporary folder per test.
#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

namespace pqkv::tools {

namespace fs = std::filesystem;

struct CliRun {
  int code = -1;
  std::string out;
  std::string err;
};

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A fresh temporary folder, removed with the object.
class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("pqkv_cli_" + std::to_string(std::random_device{}()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// The `pqkv` under test: PQKV_CLI in the environment (a build run on another
// machine), else the one built with these tests.
inline const char* cli_path() {
  const char* env = std::getenv("PQKV_CLI");
  return env != nullptr && *env != '\0' ? env : PQKV_CLI;
}

// Runs `pqkv ARGS` through the shell (ARGS quoted by the caller), stdout and
// stderr captured apart.
inline CliRun pqkv(const std::string& args) {
  static TempDir logs;
  const fs::path out = logs.path() / "out";
  const fs::path err = logs.path() / "err";
  const std::string cmd = std::string("'") + cli_path() + "' " + args + " >'" + out.string() +
                          "' 2>'" + err.string() + "' </dev/null";
  const int status = std::system(cmd.c_str());
  CliRun r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  r.out = read_file(out);
  r.err = read_file(err);
  return r;
}

inline std::string describe(const CliRun& r) {
  return "exit " + std::to_string(r.code) + "\n--- stdout:\n" + r.out + "\n--- stderr:\n" + r.err;
}

}  // namespace pqkv::tools
