// pqkv: benchmark, inspect and run the KV-cache store from the command line.
#include <CLI/CLI.hpp>

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
      "Run `pqkv <command> --help` for the options of each command."};
  app.require_subcommand(1);
  int exit_code = 0;
  for (auto& [name, factory] : pqkv::tools::command_registry())
    factory(app, &exit_code);
  CLI11_PARSE(app, argc, argv);
  return exit_code;
}
