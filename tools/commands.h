// Subcommands of the `pqkv` tool. Each lives in its own <name>_command.cpp and
// registers itself with PQKV_REGISTER_COMMAND; main.cpp adds every registered
// command to the app in name order.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <map>
#include <string>

namespace pqkv::tools {

// Adds the subcommand to `app`; its callback stores the process exit code in
// *exit_code (0 when the work succeeded, 1 when it failed, 2 on bad usage:
// a flag's value that does not parse or a missing or unreadable input).
using CommandFactory = std::function<void(CLI::App& app, int* exit_code)>;

std::map<std::string, CommandFactory>& command_registry();

struct CommandRegistration {
  CommandRegistration(const std::string& name, CommandFactory factory) {
    command_registry()[name] = std::move(factory);
  }
};

}  // namespace pqkv::tools

#define PQKV_REGISTER_COMMAND(name, factory) \
  static ::pqkv::tools::CommandRegistration pqkv_command_registration_##name(#name, factory)
