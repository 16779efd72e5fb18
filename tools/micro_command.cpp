// `pqkv micro`: runs the registered Google Benchmark micro-benchmarks
// (micro_*.cpp), passing every --benchmark_* flag through, e.g.
//   pqkv micro --benchmark_filter=PqSearch --benchmark_format=json --benchmark_out=out.json
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <string>
#include <vector>

#include "tools/commands.h"

namespace pqkv::tools {
namespace {

// Passes every report on to the display reporter and counts the runs that
// measured something, so that the exit status can say whether any did.
class CountingReporter final : public benchmark::BenchmarkReporter {
 public:
  explicit CountingReporter(benchmark::BenchmarkReporter* display) : display_(display) {}

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred) {
        ++failed_;
      } else {
        ++measured_;
      }
    }
    display_->ReportRuns(runs);
  }
  void Finalize() override { display_->Finalize(); }

  int measured() const { return measured_; }
  int failed() const { return failed_; }

 private:
  benchmark::BenchmarkReporter* display_;
  int measured_ = 0;
  int failed_ = 0;
};

bool lists_only(const std::vector<std::string>& args) {
  for (const std::string& a : args) {
    if (a == "--benchmark_list_tests" || a == "--benchmark_list_tests=true") return true;
  }
  return false;
}

void add_micro_command(CLI::App& app, int* exit_code) {
  CLI::App* cmd = app.add_subcommand(
      "micro",
      "Run the micro-benchmarks (Google Benchmark). Flags such as --benchmark_filter=REGEX, "
      "--benchmark_format=json, --benchmark_out=FILE, --benchmark_list_tests pass through.");
  cmd->footer(
      "Exit status: 0 when at least one benchmark was measured; 1 when none was (every one "
      "failed, or was skipped for want of a GPU, or the filter matched none); 2 for an "
      "unrecognized flag.");
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
    CountingReporter reporter(benchmark::CreateDefaultDisplayReporter());
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
    if (lists_only(args)) {
      *exit_code = 0;
      return;
    }
    if (reporter.measured() == 0) {
      fmt::print(stderr, "pqkv micro: no benchmark was measured ({} failed or skipped)\n",
                 reporter.failed());
      *exit_code = 1;
      return;
    }
    if (reporter.failed() > 0) {
      fmt::print(stderr, "pqkv micro: {} benchmark(s) measured, {} failed or skipped\n",
                 reporter.measured(), reporter.failed());
    }
    *exit_code = 0;
  });
}

}  // namespace

PQKV_REGISTER_COMMAND(micro, add_micro_command);

}  // namespace pqkv::tools
