// `pqkv bench --drift N`: a long generation whose keys drift away from the
// prompt's. A sequence is prefilled with config.context tokens of the
// synthetic workload, then N generated tokens are appended whose keys'
// distribution shifts (WorkloadOptions::drift_*: the unstructured part's
// scale, an offset on every channel, growing outlier channels); at evenly
// spaced steps the selection is compared with exact top-K. Each selection
// runs twice: without refits, and with SequenceOptions::refit_threshold.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "pqkv/status.h"
#include "tools/bench_runner.h"

namespace pqkv::tools {

struct DriftBenchConfig {
  int64_t generated = 8192;        // tokens generated after the prompt (and drifting)
  double refit_threshold = 2.0;    // SequenceOptions::refit_threshold of the runs with refits
  int64_t refit_min_tokens = 512;  // SequenceOptions::refit_min_tokens of those runs
  int samples = 64;                // decode steps compared with exact top-K, evenly spaced
  // The drift's full size (WorkloadOptions::drift_*), reached at the last
  // generated token.
  float scale = 1.0f;
  float offset = 2.0f;
  float outlier_growth = 1.0f;
  // cuda: run the decode steps on a stream at the device's greatest priority
  // (above the build streams that refits run on) instead of the Store's own
  // (Stream::host(), at the build streams' priority). Default false.
  bool high_priority_stream = false;
};

struct DriftRow {
  std::string selection;  // "int4", "int8", "pq m=16,b=8", ...
  bool refit = false;     // whether refits were on
  // Attention-mass recall against exact top-K, mean over the sampled steps
  // and layers of each quarter of the generated tokens.
  std::array<double, 4> recall_quarter{};
  double recall_mean = 0;
  double recall_min = 0;
  int refits = 0;              // refits swapped in, all layers
  double refit_ms = 0;         // wall time of their builds (fit + re-encoding), summed
  double end_error_ratio = 0;  // largest DriftStats::max_error_ratio of any layer at the end
  double append_us = 0;        // mean wall time of one layer's append of a generated token
  double append_max_us = 0;    // the slowest of those appends
  // Mean wall time of a whole decode step (every layer's append, then its
  // attention; the sampled steps, which also trace, left out): [0] while no
  // refit is being built, [1] while one is (the step that starts it and the
  // one that swaps it in included; 0 when none ran), and how many steps ran
  // while one was; the slowest step.
  std::array<double, 2> step_us{};
  int64_t refit_steps = 0;
  double step_max_us = 0;
};

struct DriftReport {
  BenchConfig config;
  DriftBenchConfig drift;
  std::vector<DriftRow> rows;
};

// Runs every selection of config (times its PQ settings when it uses PQ)
// without and with refits, on config.device (cpu or cuda).
Result<DriftReport> run_drift_bench(const BenchConfig& config, const DriftBenchConfig& drift,
                                    bool progress);

}  // namespace pqkv::tools
