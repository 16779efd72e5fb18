#include "tools/cli_checks.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <system_error>

namespace pqkv::tools {
namespace {

namespace fs = std::filesystem;

// The length of the UTF-8 character that starts with `lead`; 0 when `lead`
// cannot start one.
size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

bool is_continuation(unsigned char c) {
  return (c & 0xC0) == 0x80;
}

void append_escaped(std::string* out, unsigned char c) {
  *out += fmt::format("\\x{:02x}", c);
}

}  // namespace

Status check_input_file(std::string_view flag, const std::string& path, bool allow_empty) {
  std::error_code ec;
  if (path.empty()) return Status::invalid_argument(fmt::format("{} is empty: give a file", flag));
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    return Status::not_found(fmt::format("{} {}: no such file", flag, path));
  }
  if (fs::is_directory(st)) {
    return Status::invalid_argument(fmt::format("{} {} is a folder: give a file", flag, path));
  }
  // A device such as /dev/zero never ends, and the checks below would eat
  // the first bytes of a pipe (and opening one waits for its writer).
  if (!fs::is_regular_file(st)) {
    return Status::invalid_argument(fmt::format(
        "{} {} is a device or a pipe, not a regular file: give a file (save a pipe's output "
        "to one first)",
        flag, path));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::io_error(fmt::format("{} {}: cannot open it for reading", flag, path));
  if (!allow_empty && in.peek() == std::ifstream::traits_type::eof()) {
    return Status::invalid_argument(fmt::format("{} {} is empty", flag, path));
  }
  return ok_status();
}

Status check_output_path(std::string_view flag, const std::string& path, bool allow_stdout) {
  if (path.empty()) {
    return Status::invalid_argument(fmt::format("{} is empty: give a file to write", flag));
  }
  if (path == "-") {
    if (allow_stdout) return ok_status();
    return Status::invalid_argument(fmt::format("{} cannot be '-': give a file to write", flag));
  }
  std::error_code ec;
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    return Status::invalid_argument(
        fmt::format("{} {} is a folder: give a file name inside it", flag, path));
  }
  const fs::path parent = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(parent, ec)) {
    return Status::invalid_argument(
        fmt::format("{} {}: the folder {} does not exist", flag, path, parent.string()));
  }
  if (fs::exists(p, ec) ? ::access(path.c_str(), W_OK) != 0
                        : ::access(parent.c_str(), W_OK | X_OK) != 0) {
    return Status::invalid_argument(fmt::format("{} {}: not writable", flag, path));
  }
  return ok_status();
}

Status check_fits_in_memory(double bytes, std::string_view what, std::string_view lower) {
  const double machine =
      static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (machine <= 0 || bytes <= machine) return ok_status();
  constexpr double kGiB = double(1 << 30);
  return Status::invalid_argument(fmt::format(
      "{} would take {:.1f} GiB, more than this machine's {:.1f} GiB of memory: lower {}", what,
      bytes / kGiB, machine / kGiB, lower));
}

CLI::Validator finite_at_least(double min) {
  const std::string bound = fmt::format(">= {}", min);
  return CLI::Validator(
      [min, bound](std::string& text) -> std::string {
        // CLI11 reads an empty value as 0.
        if (text.empty()) return fmt::format("must be a finite number {}, got ''", bound);
        errno = 0;
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        // What is not a number at all is left to the conversion's own error.
        if (end == text.c_str() || *end != '\0') return std::string();
        if (!std::isfinite(v) || errno == ERANGE || v < min) {
          return fmt::format("must be a finite number {}, got {}", bound, text);
        }
        return std::string();
      },
      bound);
}

CLI::Validator whole_number(bool is_signed) {
  const std::string range = is_signed ? fmt::format("{}..{}", std::numeric_limits<int64_t>::min(),
                                                    std::numeric_limits<int64_t>::max())
                                      : fmt::format("0..{}", std::numeric_limits<uint64_t>::max());
  return CLI::Validator(
      [is_signed, range](std::string& text) -> std::string {
        const char* begin = text.data();
        const char* end = text.data() + text.size();
        std::from_chars_result r{};
        if (is_signed) {
          int64_t v = 0;
          r = std::from_chars(begin, end, v);
        } else {
          uint64_t v = 0;
          r = std::from_chars(begin, end, v);  // refuses a '-'
        }
        if (text.empty() || r.ec != std::errc() || r.ptr != end) {
          return fmt::format("must be a whole number in {}, got '{}'", range, text);
        }
        return std::string();
      },
      "INT");
}

std::string json_text(const nlohmann::json& j) {
  return j.dump(2, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

int report_failure(std::string_view command, const Status& status, bool json, int exit_code) {
  fmt::print(stderr, "pqkv {}: {}\n", command, status.to_string());
  if (json) {
    const nlohmann::json error = {
        {"error", {{"code", status_code_name(status.code())}, {"message", status.message()}}}};
    fmt::print("{}\n", json_text(error));
  }
  return exit_code;
}

std::string TerminalText::feed(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const auto c = static_cast<unsigned char>(pending_[i]);
    if (c < 0x80) {
      if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
        append_escaped(&out, c);
      } else {
        out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    const size_t n = utf8_length(c);
    if (n == 0) {
      append_escaped(&out, c);
      ++i;
      continue;
    }
    size_t have = 1;
    while (have < n && i + have < pending_.size() &&
           is_continuation(static_cast<unsigned char>(pending_[i + have]))) {
      ++have;
    }
    if (have == n) {
      out.append(pending_, i, n);
      i += n;
    } else if (i + have == pending_.size()) {
      break;  // the rest of the character may come with the next piece
    } else {
      append_escaped(&out, c);
      ++i;
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string TerminalText::finish() {
  std::string out;
  for (char c : pending_)
    append_escaped(&out, static_cast<unsigned char>(c));
  pending_.clear();
  return out;
}

}  // namespace pqkv::tools
