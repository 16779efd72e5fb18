// `pqkv bench --graph`: the decode step of every layer (append of the new
// token's key and value, then attend) captured once in a CUDA graph and
// replayed token after token, with no call, allocation or host sync per
// layer or per token; reports the time per generated token.
#pragma once

#include <cstdint>

#include "pqkv/status.h"
#include "tools/bench_runner.h"

namespace pqkv::tools {

struct GraphReport {
  BenchConfig config;
  int64_t attended_per_head = 0;  // at the last replayed step, per layer and KV head
  double capture_ms = 0;          // capturing and instantiating the graph
  double us_per_token = 0;        // one replay: every layer's step, mean over config.steps
  double us_per_layer = 0;        // us_per_token / layers
};

// Prefills one sequence of config.context tokens of the synthetic workload
// in every layer of config.spec on config.device (CUDA), reserves room for
// config.steps more, captures one step of every layer and replays it
// config.steps times (after 3 warm-up replays, which count as tokens too).
// InvalidArgument on a cpu backend.
Result<GraphReport> run_graph_bench(const BenchConfig& config, bool progress);

}  // namespace pqkv::tools
