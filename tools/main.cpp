// pqkv: benchmark, inspect and run the KV-cache store from the command line.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "tools/cli_checks.h"
#include "tools/commands.h"

namespace pqkv::tools {

std::map<std::string, CommandFactory>& command_registry() {
  static std::map<std::string, CommandFactory> registry;
  return registry;
}

namespace {

// Whether the command line asks for JSON on stdout: `--json` of a command
// where it is a flag (inspect, export-faiss), `--json -` or `--json=-` where it
// takes a path (bench). Read from argv, as a failed parse may not have
// reached the option.
bool json_on_stdout(CLI::App& app, int argc, char** argv) {
  if (argc < 2) return false;
  CLI::App* command = nullptr;
  try {
    command = app.get_subcommand(argv[1]);
  } catch (const CLI::Error&) {
    return false;
  }
  const CLI::Option* option = command->get_option_no_throw("--json");
  if (option == nullptr) return false;
  const bool flag = option->get_expected_min() == 0;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && (flag || (i + 1 < argc && std::string(argv[i + 1]) == "-"))) return true;
    if (arg == "--json=-") return true;
  }
  return false;
}

// A failure outside the commands' own reporting, as report_failure prints it
// for them: `line` on stderr and, when asked for, the JSON error on stdout.
int fail(bool json, const std::string& line, StatusCode code, const std::string& message,
         int exit_code) {
  std::fprintf(stderr, "%s\n", line.c_str());
  if (json) {
    const nlohmann::json error = {
        {"error", {{"code", status_code_name(code)}, {"message", message}}}};
    std::printf("%s\n", json_text(error).c_str());
  }
  return exit_code;
}

}  // namespace
}  // namespace pqkv::tools

int main(int argc, char** argv) {
  CLI::App app{
      "pqkv: a KV-cache store for long-context LLM inference; a compact index of the keys\n"
      "(int4 by default, product quantization as an option) picks the tokens each decode\n"
      "step attends to.\n"
      "Run `pqkv <command> --help` for the options of each command.\n"
      "Exit status: 0 when the work succeeded, 1 when it failed, 2 for a usage error."};
  app.set_version_flag("--version", "pqkv " PQKV_VERSION);
  app.require_subcommand(1);
  int exit_code = 0;
  for (auto& [name, factory] : pqkv::tools::command_registry())
    factory(app, &exit_code);
  pqkv::tools::require_decimal_numbers(app);
  // The commands run inside parse (their callbacks). Nothing they throw may
  // end the process with an abort: an allocation past memory (a huge size
  // flag) or any other exception becomes one line and exit status 1.
  const auto command = [&app] {
    const auto parsed = app.get_subcommands();
    return parsed.empty() ? std::string("pqkv") : "pqkv " + parsed.front()->get_name();
  };
  const bool json = pqkv::tools::json_on_stdout(app, argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version end the parse with a success code.
    if (e.get_exit_code() == 0) return app.exit(e);
    // Every other parse error is a usage error, in one line as the commands'
    // own errors are.
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    return pqkv::tools::fail(json, command() + ": " + what + "; see `" + command() + " --help`",
                             pqkv::StatusCode::kInvalidArgument, what, 2);
  } catch (const std::bad_alloc&) {
    const std::string what =
        "out of memory; ask for less (a shorter context, fewer layers or tokens)";
    return pqkv::tools::fail(json, command() + ": ResourceExhausted: " + what,
                             pqkv::StatusCode::kResourceExhausted, what, 1);
  } catch (const std::exception& e) {
    const std::string what = std::string("unexpected error: ") + e.what();
    return pqkv::tools::fail(json, command() + ": Internal: " + what, pqkv::StatusCode::kInternal,
                             what, 1);
  }
  return exit_code;
}
