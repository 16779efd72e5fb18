#include "tools/cli_checks.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <system_error>

#include "core/host_memory.h"

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

// Opening a FIFO for writing waits for a reader: with none, a command would
// hang after its whole run. A non-blocking open answers at once (ENXIO: no
// reader). The descriptor stays open until the process exits, so the reader
// sees no end of file before the output is written.
Status check_fifo_reader(std::string_view flag, const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd >= 0) return ok_status();
  if (errno == ENXIO) {
    return Status::invalid_argument(
        fmt::format("{} {} is a FIFO that no process reads: start its reader first (e.g. cat {})",
                    flag, path, path));
  }
  return Status::invalid_argument(
      fmt::format("{} {}: cannot open the FIFO: {}", flag, path, std::strerror(errno)));
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
  if (fs::is_fifo(p, ec)) return check_fifo_reader(flag, path);
  // Permissions are not the whole story (root on /proc, a read-only mount):
  // try it, without truncating or leaving anything behind.
  const bool existed = fs::exists(p, ec);
  const int fd =
      ::open(path.c_str(), O_WRONLY | O_CLOEXEC | (existed ? 0 : O_CREAT | O_EXCL), 0644);
  if (fd < 0) {
    return Status::invalid_argument(
        fmt::format("{} {}: cannot be written ({})", flag, path, std::strerror(errno)));
  }
  ::close(fd);
  if (!existed) ::unlink(path.c_str());
  return ok_status();
}

Status write_output_file(std::string_view flag, const std::string& path, const std::string& text) {
  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (out) return ok_status();
  const int err = errno;
  return Status::io_error(fmt::format("cannot write {} {}: {}", flag, path,
                                      err != 0 ? std::strerror(err) : "the write failed"));
}

Status check_not_special(std::string_view flag, const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st) || fs::is_regular_file(st) || fs::is_directory(st)) {
    return ok_status();
  }
  return Status::invalid_argument(fmt::format(
      "{} {} is a device, a pipe or a socket, not a regular file: the output replaces its file "
      "whole, so give the path of a file",
      flag, path));
}

Status check_output_dir(std::string_view flag, const std::string& path) {
  if (path.empty()) {
    return Status::invalid_argument(fmt::format("{} is empty: give a folder to write into", flag));
  }
  std::error_code ec;
  if (fs::exists(path, ec) && !fs::is_directory(path, ec)) {
    return Status::invalid_argument(fmt::format(
        "{} {} exists and is not a directory: give a folder to write into", flag, path));
  }
  fs::create_directories(path, ec);
  if (ec) {
    return Status::invalid_argument(
        fmt::format("{} {}: cannot create the folder: {}", flag, path, ec.message()));
  }
  if (::access(path.c_str(), W_OK | X_OK) != 0) {
    return Status::invalid_argument(fmt::format("{} {}: the folder is not writable", flag, path));
  }
  return ok_status();
}

namespace {

// `path` made absolute, its links and ".." resolved as far as it exists.
fs::path resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) p = fs::absolute(path, ec).lexically_normal();
  return p;
}

// True when `inner` is `outer` or lies inside it (whole components).
bool same_or_inside(const fs::path& inner, const fs::path& outer) {
  auto o = outer.begin();
  auto i = inner.begin();
  for (; o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // a trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  return fs::exists(a, ec) && fs::exists(b, ec) && fs::equivalent(a, b, ec) && !ec;
}

bool skipped(const FlagPath& p) {
  return p.path.empty() || p.path == "-";
}

}  // namespace

Status check_outputs_apart(std::initializer_list<FlagPath> outputs,
                           std::initializer_list<FlagPath> inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    if (skipped(*out)) continue;
    const fs::path o = resolved(out->path);
    for (const FlagPath& in : inputs) {
      if (skipped(in)) continue;
      if (same_or_inside(o, resolved(in.path)) || same_file(out->path, in.path)) {
        return Status::invalid_argument(
            fmt::format("{} {} would overwrite what {} {} reads: write it somewhere else",
                        out->flag, out->path, in.flag, in.path));
      }
    }
    for (auto other = outputs.begin(); other != out; ++other) {
      if (skipped(*other)) continue;
      const fs::path p = resolved(other->path);
      if (same_or_inside(o, p) || same_or_inside(p, o) || same_file(out->path, other->path)) {
        return Status::invalid_argument(
            fmt::format("{} {} and {} {} would write over each other: give them apart paths",
                        other->flag, other->path, out->flag, out->path));
      }
    }
  }
  return ok_status();
}

CLI::Validator non_empty() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        return text.empty() ? std::string("is empty: give a value or leave the flag out")
                            : std::string();
      },
      "");
}

Status check_fits_in_memory(double bytes, std::string_view what, std::string_view lower) {
  const double machine = host_memory_bytes();
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
        // Past float's range a float flag would hold infinity; no flag needs more.
        if (std::fabs(v) > std::numeric_limits<float>::max()) {
          return fmt::format("must be at most {:g}, got {}", std::numeric_limits<float>::max(),
                             text);
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
      // No label of its own: the option's type (INT, UINT) says it, and a
      // label "INT" showed in --help as "INT:INT".
      "");
}

namespace {

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The transform require_decimal_numbers puts first on an integer option:
// refuses what is not decimal, and writes leading zeros away so that CLI11's
// base-0 conversion reads the decimal value.
std::string decimal_integer(std::string& text) {
  const bool negative = !text.empty() && text[0] == '-';
  std::string digits = text.substr(negative ? 1 : 0);
  if (!all_digits(digits)) {
    return fmt::format(
        "must be a whole decimal number (digits, '-' for a negative one; no 0x, 0b or exponent), "
        "got '{}'",
        text);
  }
  digits.erase(0, std::min(digits.find_first_not_of('0'), digits.size() - 1));
  std::string normal = (negative && digits != "0" ? "-" : "") + digits;
  int64_t s = 0;
  uint64_t u = 0;
  const char* end = normal.data() + normal.size();
  const bool fits = negative ? std::from_chars(normal.data(), end, s).ec == std::errc()
                             : std::from_chars(normal.data(), end, u).ec == std::errc();
  if (!fits) {
    return fmt::format("must be a whole number in {}..{}, got {}",
                       std::numeric_limits<int64_t>::min(), std::numeric_limits<uint64_t>::max(),
                       text);
  }
  text = std::move(normal);
  return std::string();
}

std::string decimal_float(std::string& text) {
  if (!parse_decimal(text)) {
    return fmt::format(
        "must be a finite decimal number (such as 2, 0.5, -1.5 or 1e-3; no nan, inf, 0x or "
        "spaces) within double's range, got '{}'",
        text);
  }
  return std::string();
}

void harden(CLI::App& app) {
  for (CLI::Option* option : app.get_options()) {
    const std::string type = option->get_type_name();
    const std::string base = type.substr(0, type.find(':'));
    if (base == "INT" || base == "UINT") {
      option->transform(CLI::Validator(decimal_integer, ""));
    } else if (base == "FLOAT") {
      option->transform(CLI::Validator(decimal_float, ""));
    }
  }
  for (CLI::App* sub : app.get_subcommands({}))
    harden(*sub);
}

}  // namespace

void require_decimal_numbers(CLI::App& app) {
  harden(app);
}

std::optional<double> parse_decimal(std::string_view text) {
  std::string_view s = text;
  if (!s.empty() && s[0] == '-') s.remove_prefix(1);
  const size_t e = s.find_first_of("eE");
  std::string_view mantissa = s.substr(0, e);
  if (e != std::string_view::npos) {
    std::string_view exponent = s.substr(e + 1);
    if (!exponent.empty() && (exponent[0] == '+' || exponent[0] == '-')) exponent.remove_prefix(1);
    if (!all_digits(exponent)) return std::nullopt;
  }
  const size_t dot = mantissa.find('.');
  const std::string_view whole = mantissa.substr(0, dot);
  const std::string_view fraction =
      dot == std::string_view::npos ? std::string_view() : mantissa.substr(dot + 1);
  if ((whole.empty() && fraction.empty()) || (!whole.empty() && !all_digits(whole)) ||
      (!fraction.empty() && !all_digits(fraction))) {
    return std::nullopt;
  }
  const std::string owned(text);
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(owned.c_str(), &end);
  if (end != owned.c_str() + owned.size() || errno == ERANGE || !std::isfinite(v)) {
    return std::nullopt;
  }
  return v;
}

CLI::Validator whole_in(int64_t min, int64_t max) {
  const std::string range = fmt::format("{}..{}", min, max);
  return CLI::Validator(
      [min, max, range](std::string& text) -> std::string {
        int64_t v = 0;
        const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
        if (text.empty() || r.ec != std::errc() || r.ptr != text.data() + text.size() || v < min ||
            v > max) {
          return fmt::format("must be a whole number in {}, got {}", range, text);
        }
        return std::string();
      },
      "in " + range);
}

CLI::Validator fits_int() {
  CLI::Validator v = whole_in(kMinCliInt, kMaxCliInt);
  v.description("");
  return v;
}

CLI::Validator number_in(double min, double max) {
  const std::string range = fmt::format("{}..{}", min, max);
  return CLI::Validator(
      [min, max, range](std::string& text) -> std::string {
        const std::optional<double> v = parse_decimal(text);
        if (!v || !(*v >= min && *v <= max)) {
          return fmt::format("must be a number in {}, got {}", range, text);
        }
        return std::string();
      },
      "in " + range);
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
