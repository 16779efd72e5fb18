// `pqkv micro`: runs the registered Google Benchmark micro-benchmarks
// (micro_*.cpp), passing every --benchmark_* flag through, e.g.
//   pqkv micro --benchmark_filter=PqSearch --benchmark_format=json --benchmark_out=out.json
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "tools/commands.h"

namespace pqkv::tools {
namespace {

void add_micro_command(CLI::App& app, int* exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "micro",
      "Run the micro-benchmarks (Google Benchmark). Flags such as --benchmark_filter=REGEX, "
      "--benchmark_format=json, --benchmark_out=FILE, --benchmark_list_tests pass through.");
  cmd->allow_extras();
  cmd->callback([cmd, exit_code] {
    std::vector<std::string> args = cmd->remaining();
    std::string name = "pqkv micro";
    std::vector<char*> argv{name.data()};
    for (auto& a : args)
      argv.push_back(a.data());
    int argc = static_cast<int>(argv.size());
    benchmark::Initialize(&argc, argv.data());
    if (benchmark::ReportUnrecognizedArguments(argc, argv.data())) {
      *exit_code = 2;
      return;
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    *exit_code = 0;
  });
}

}  // namespace

PQKV_REGISTER_COMMAND(micro, add_micro_command);

}  // namespace pqkv::tools
