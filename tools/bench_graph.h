// `pqkv bench --graph`: the decode step of every layer (append of the new
// token's key and value, then attend) captured once in a CUDA graph and
// replayed token after token, with no call, allocation or host sync per
// layer or per token; reports the time per generated token.
#pragma once

#include <cstdint>

#include "pqkv/status.h"
#include "tools/bench_runner.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

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

#if PQKV_HAVE_CUDA
// Launches `exec` on `stream` `warmup` times, then `replays` times between
// two timing events, and waits for the stream: the mean device time of one
// timed replay, in microseconds. Status of the first failing CUDA call.
Result<double> time_graph_replays(cudaGraphExec_t exec, cudaStream_t stream, int warmup,
                                  int replays);
#endif

}  // namespace pqkv::tools
