// Checks every command makes on its inputs, sizes and output paths before any
// work starts; how a command reports a failure (one line, and JSON where its
// output is JSON); and the escaping of generated text written to a terminal.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "pqkv/status.h"

namespace pqkv::tools {

// `path`, named by `flag` in messages, is a readable regular file; unless
// `allow_empty`, it holds at least one byte. NotFound when it is missing,
// InvalidArgument when it is a folder, a device (/dev/zero would never end), a
// pipe or empty, IOError when unreadable.
Status check_input_file(std::string_view flag, const std::string& path, bool allow_empty = false);

// `path` can be written: not empty, not a folder, in a folder that exists and
// is writable, a new file can be made there (it is made and removed again:
// read-only and special file systems refuse it) or the existing file opened
// for writing (not truncated); a FIFO has a reader (kept
// connected until the process exits), since writing to one without would
// wait forever. "-" (stdout) passes when `allow_stdout`. InvalidArgument
// otherwise, naming the flag.
Status check_output_path(std::string_view flag, const std::string& path, bool allow_stdout);

// Writes `text` to `path` (replacing it), the output of `flag`: IoError
// naming the flag, the path and the system's reason when it cannot.
Status write_output_file(std::string_view flag, const std::string& path, const std::string& text);

// InvalidArgument naming `flag` when `path` exists and is not a regular file
// or a folder (a device, a pipe, a socket), for an output that replaces its
// file whole (written beside it, then renamed over it): the rename would put
// a regular file in place of the device. OK when it does not exist.
Status check_not_special(std::string_view flag, const std::string& path);

// `path`, named by `flag`, is a folder to write into, made (with its
// parents) when missing: not empty, not a file or device, and writable.
// InvalidArgument naming the flag otherwise, before any work starts.
Status check_output_dir(std::string_view flag, const std::string& path);

// A path a command reads or writes, named by its flag in messages.
struct FlagPath {
  std::string_view flag;
  std::string path;
};

// InvalidArgument when an output would overwrite what the command reads or
// another of its results: two `outputs` that are the same file or one inside
// the other (a --json inside the --save folder), or an output that is one of
// the `inputs` or lies inside an input folder (a model, a store). Paths
// compare after resolving symbolic links and "..", and files that exist also
// by identity (hard links). Empty paths and "-" (stdout) are skipped.
Status check_outputs_apart(std::initializer_list<FlagPath> outputs,
                           std::initializer_list<FlagPath> inputs);

// The check of a flag that names a file, a folder or a saved sequence: not
// empty (CLI11 takes `--json ''` as given, and the command would then act as
// if it were absent).
CLI::Validator non_empty();

// InvalidArgument when `bytes`, what a run would hold at once (described by
// `what`: "the workload's keys and values"), exceed this machine's physical
// memory, naming the flags to lower: such a run could only fail after its
// allocations, or be killed. Sizes come in as double: products of huge flag
// values overflow int64.
Status check_fits_in_memory(double bytes, std::string_view what, std::string_view lower);

// The check of a numeric flag: a finite number (CLI11's own range checks let
// nan and inf through, and it reads an empty value as 0) that is at least
// `min` and within float's range (a float flag would read 1e308 as
// infinity), refused in one line that says so ("--temperature: must be a
// finite number >= 0, got nan", "--drift-scale: must be at most 3.40282e+38,
// got 1e300"). Shown in --help as ">= MIN".
CLI::Validator finite_at_least(double min);

// The check of a 64-bit integer flag: decimal digits (a leading '-' only when
// `is_signed`) whose value fits int64 (or, unsigned, uint64). CLI11 reads such
// flags with strtoll/strtoull and keeps what they give: a value past the type
// became its largest (--drift-min-tokens 99999999999999999999 ran as
// 2^63 - 1) and "-1" an unsigned 2^64 - 1 (--seed -1). Refused in one line
// ("--seed: must be a whole number in 0..18446744073709551615, got -1").
// No --help label beyond the option's type: give the flag's own range with
// whole_in or finite_at_least where it has one.
CLI::Validator whole_number(bool is_signed);

// Every integer and floating-point option of `app`'s commands reads decimal
// numbers only. CLI11 reads integers with base 0 (--layers 010 was 8,
// --layers 0x10 16) and floats with strtod (0x1p3, nan, inf), and both take
// leading spaces: such values are refused in one line naming the flag
// ("--layers: must be a whole decimal number (digits, '-' for a negative
// one), got '0x10'"). Leading zeros are decimal: 010 is 10. Integers must
// also fit 64 bits, floats be finite and representable (1e999, 1e-999 are
// refused); each flag's own range is its range validator's (whole_in,
// number_in). Call once, after every command is added.
void require_decimal_numbers(CLI::App& app);

// `text` as a finite decimal number: digits with an optional '-', '.' and
// exponent (1, -2.5, .5, 3e4), no spaces, prefixes, nan or inf; nothing when
// it is not one or is out of double's range.
std::optional<double> parse_decimal(std::string_view text);

// The range check of a whole-number flag: refuses a value outside
// min..max as "must be a whole number in MIN..MAX, got V". Shown in --help
// as "in MIN..MAX".
CLI::Validator whole_in(int64_t min, int64_t max);
// The range of a flag held in an int.
inline constexpr int64_t kMinCliInt = std::numeric_limits<int32_t>::min();
inline constexpr int64_t kMaxCliInt = std::numeric_limits<int32_t>::max();
// The check of a flag held in an int whose own range a later check names
// (it depends on the store, or has a message of its own): whole_in(kMinCliInt,
// kMaxCliInt) with no --help label, as "in -2147483648..2147483647" would say
// the flag takes what it does not.
CLI::Validator fits_int();

// The range check of a floating-point flag: refuses a value outside
// min..max (or NaN) as "must be a number in MIN..MAX, got V". Shown in --help
// as "in MIN..MAX".
CLI::Validator number_in(double min, double max);

// `j` as indented JSON text for output. Bytes that are not UTF-8 in its
// strings (a path, a sequence name, a fingerprint: all arbitrary bytes) become
// U+FFFD instead of making the dump throw.
std::string json_text(const nlohmann::json& j);

// Reports a failed command: "pqkv COMMAND: <status>" as one line on stderr
// and, when `json` (the command's JSON goes to stdout), also
// {"error": {"code": "NotFound", "message": ...}} on stdout, so that a script
// that parses stdout gets JSON on failure too. Returns `exit_code`.
int report_failure(std::string_view command, const Status& status, bool json, int exit_code);

// Bytes of generated text made safe for a terminal: control characters other
// than newline and tab, DEL, and bytes that are not valid UTF-8 become \xNN.
// Fed piece by piece, so that a character whose bytes come in two tokens
// still prints as one. Not thread-safe.
class TerminalText {
 public:
  // The printable text of `bytes` appended to the stream so far; the bytes of
  // an incomplete UTF-8 character are held until the next call.
  std::string feed(std::string_view bytes);
  // Whatever an incomplete character left held, escaped.
  std::string finish();

 private:
  std::string pending_;
};

}  // namespace pqkv::tools
