// `pqkv bench --batch N`: N sequences of different lengths (context x 1,
// 0.75, 0.5, 0.25, then again) decoded together through Store::attend, the
// batched step, with their attended positions from Store::select, the
// selector engines consume. Reports recall per sequence and times per step
// and per sequence, beside the same sequences attended one by one.
#pragma once

#include <cstdint>
#include <vector>

#include "pqkv/status.h"
#include "tools/bench_runner.h"

namespace pqkv::tools {

struct BatchSequenceRow {
  int64_t prompt_tokens = 0;
  double recall_mean = 0;  // attention-mass recall against the oracle, mean over (step, layer)
  double recall_min = 0;
  int64_t attended_per_head = 0;  // at the last step
  // --save: as BenchRow's.
  std::string saved_as;
  double save_ms = 0;
  double reopen_ms = 0;
};

struct BatchReport {
  BenchConfig config;
  int batch = 0;
  std::vector<BatchSequenceRow> sequences;
  // Wall time of one batched Store::attend of one layer (all sequences), mean
  // over (step, layer), in microseconds; and the same divided by the batch.
  double step_us = 0;
  double per_sequence_us = 0;
  // The same layer step as `batch` Sequence::attend calls one after another.
  double one_by_one_step_us = 0;
  double select_us = 0;  // one batched Store::select of one layer
  // CUDA: one layer's batched Store::attend with device queries and outputs,
  // captured once in a CUDA graph with every layer and replayed (device time
  // per layer, mean over config.steps replays after 3 warm-up ones), with no
  // host work per sequence; 0 on a cpu backend.
  double replayed_step_us = 0;
};

// Runs the first PQ setting of `config` (quality per config.quality).
Result<BatchReport> run_batch_bench(const BenchConfig& config, int batch, bool progress);

}  // namespace pqkv::tools
