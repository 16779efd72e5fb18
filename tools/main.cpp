// pqkv: benchmark, inspect and run the KV-cache store from the command line.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "tools/commands.h"

namespace pqkv::tools {

std::map<std::string, CommandFactory>& command_registry() {
  static std::map<std::string, CommandFactory> registry;
  return registry;
}

}  // namespace pqkv::tools

int main(int argc, char** argv) {
  CLI::App app{
      "pqkv: a product-quantized KV-cache store for long-context LLM inference.\n"
      "Run `pqkv <command> --help` for the options of each command.\n"
      "Exit status: 0 when the work succeeded, 1 when it failed, 2 for a usage error."};
  app.set_version_flag("--version", "pqkv " PQKV_VERSION);
  app.require_subcommand(1);
  int exit_code = 0;
  for (auto& [name, factory] : pqkv::tools::command_registry())
    factory(app, &exit_code);
  // The commands run inside parse (their callbacks). Nothing they throw may
  // end the process with an abort: an allocation past memory (a huge size
  // flag) or any other exception becomes one line and exit status 1.
  const auto command = [&app] {
    const auto parsed = app.get_subcommands();
    return parsed.empty() ? std::string("pqkv") : "pqkv " + parsed.front()->get_name();
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version end the parse with a success code.
    if (e.get_exit_code() == 0) return app.exit(e);
    // Every other parse error is a usage error, in one line as the commands'
    // own errors are.
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::fprintf(stderr, "%s: %s; see `%s --help`\n", command().c_str(), what.c_str(),
                 command().c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "%s: ResourceExhausted: out of memory; ask for less (a shorter context, fewer "
                 "layers or tokens)\n",
                 command().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: Internal: unexpected error: %s\n", command().c_str(), e.what());
    return 1;
  }
  return exit_code;
}
