// The end-to-end benchmark behind `pqkv bench`: prefill a sequence with the
// synthetic workload, decode a few steps through Sequence::attend, and measure
// selection quality against exact attention and the time of each stage.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/status.h"
#include "pqkv/store.h"

namespace pqkv::tools {

struct BenchConfig {
  ModelSpec spec;            // geometry; num_layers = layers measured
  int64_t context = 32768;   // prompt tokens
  int steps = 16;            // decode steps
  BudgetPolicy budget;       // the policy every run uses
  std::vector<PqConfig> pq;  // one run per PQ setting for each selection that uses PQ
  // One run per selection (times the PQ settings when it uses PQ). Default: int4 keys.
  std::vector<SelectionConfig> selections = {SelectionConfig{}};
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
  Device device = Device::cpu();
  uint64_t seed = 1;
  bool compare_faiss = false;  // add Faiss IndexPQ search over the same codes
  // Compare each step with exact attention. Off, only times are measured:
  // for long contexts and many layers, where the exact reference is slow.
  bool quality = true;
  int num_threads = 0;
  // CUDA: keep the sink and window in HBM (SequenceOptions::resident_sink_window).
  bool resident = true;
  // The block cache (StoreOptions::block_cache_*): bytes of slots (0 = none),
  // tokens per block and steps between agings (0 = plain LFU).
  int64_t block_cache_bytes = 0;
  int64_t block_cache_tokens = 64;
  int block_cache_aging_steps = 16;
  int block_cache_admit_steps = 1;  // StoreOptions::block_cache_admit_steps
  // --graph: each replay reads the workload's queries of its own step (one
  // copy to the device before each replay) instead of one query throughout,
  // so the picks move from step to step as in a generation (what a cache's
  // hit rate depends on).
  bool vary_queries = false;
  std::string cache_policy = "lfu-aging";  // or "pqcache", for the report
  // Share of the rows to place on disk: the store spills (StoreOptions::
  // spill_to_disk) under a DRAM budget of (1 - ssd_fraction) of the rows'
  // bytes. 0: everything in DRAM. cpu only.
  double ssd_fraction = 0;
  std::string ssd_directory;  // where the spill files go when ssd_fraction > 0
  // `--save DIR`: a store directory that every run's sequence is saved into
  // (Store::save) after its decode steps, under a name its row reports;
  // empty (the default): nothing is saved.
  std::string save_dir;
};

// Mean, minimum and the like over every (decode step, layer).
struct BenchRow {
  std::string name;                  // "pqkv m=4,b=8", "pqkv oracle", "faiss IndexPQ m=4,b=8", ...
  int64_t code_bytes_per_token = 0;  // index bytes per token and KV head
  double build_ms = 0;               // index training + encoding of the prompt, all layers
  double prefill_ms = 0;             // appending the prompt, all layers
  double recall_mean = 0;            // attention-mass recall against the oracle
  double recall_min = 0;
  double output_error_mean = 0;  // relative error of the attention output
  double output_error_max = 0;
  int needle_steps = 0;           // (step, layer) pairs that looked for a needle
  double needle_hits = 0;         // summed fraction of KV heads that attended it
  int64_t attended_per_head = 0;  // tokens attended per KV head at the last step
  double score_us = 0;            // per (step, layer), mean
  double topk_us = 0;
  double gather_us = 0;
  double attention_us = 0;
  double attend_us = 0;  // the whole attend call
  double exact_us = 0;   // Sequence::attend_exact of the same query, per (step, layer), mean
  // The fetch plan per (step, layer), mean over every KV head: rows and bytes
  // read in place from HBM (resident sink and window) and gathered from DRAM.
  double resident_rows = 0;
  double resident_bytes = 0;
  double dram_rows = 0;
  double dram_bytes = 0;
  // Rows and bytes read from block cache slots (the cache's hits).
  double cache_hits = 0;
  double cache_bytes = 0;
  // Host time of the block cache per (step, layer), mean, in us: its policy
  // (on its own thread) and its work on the step's thread
  // (FetchTrace::cache_policy_us, cache_enqueue_us).
  double cache_policy_us = 0;
  double cache_enqueue_us = 0;
  // How the index's picks recur from step to step, over every (step > 0,
  // layer, KV head): the share of a step's picks picked at the step before,
  // picked at any earlier step of the run, and picked at two or more of the
  // last 8 steps; and the picks per touched block of 16 and 64 tokens. The
  // bounds of what a cache of single rows or of blocks can serve.
  double reuse_previous = 0;
  double reuse_any = 0;
  double reuse_twice_in_8 = 0;
  double picks_per_block16 = 0;
  double picks_per_block64 = 0;
  // Rows read back from spill files (--ssd-fraction), the bytes and 4 KiB
  // pages read for them, rows served by a page read for another row, and
  // the wall time of the reads.
  double ssd_rows = 0;
  double ssd_bytes = 0;
  double ssd_pages = 0;
  double ssd_hits = 0;
  double ssd_us = 0;
  // --save: the name the sequence was saved under, the time of Store::save,
  // and of close_sequence + open_sequence of the saved sequence (its rows
  // read back and its index restored, not rebuilt), in ms.
  std::string saved_as;
  double save_ms = 0;
  double reopen_ms = 0;
  // A baseline measured for its search time (score_us) and quality only: its
  // build, top-K, gather, attention, step and exact times are not measured.
  bool search_only = false;
};

struct BenchReport {
  BenchConfig config;
  std::vector<BenchRow> rows;
};

// What every bench mode (the table, --batch, --graph) needs of `config`
// before any work: a valid geometry, budget and store options, at least one
// prompt token and one decode step, and a workload (fp32 keys and values of
// every measured layer) that fits in this machine's memory. InvalidArgument
// naming the flag to change. The device is checked when the store opens.
Status check_bench_config(const BenchConfig& config);

// `progress` shows a bar on a terminal.
Result<BenchReport> run_bench(const BenchConfig& config, bool progress);

// The options of a sequence for one run of `config`: its budget, aggregation
// and resident rows, with `pq` and `selection`. Every bench mode (the table,
// --graph, --batch) makes its sequences from this, so each honours every flag.
SequenceOptions bench_sequence_options(const BenchConfig& config, const PqConfig& pq,
                                       const SelectionConfig& selection);
// bench_sequence_options with the first --pq and --selection settings (or the
// defaults): the modes that run one setting.
SequenceOptions first_sequence_options(const BenchConfig& config);
// A store of config.spec on config.device with config.num_threads workers,
// opened on config.save_dir (with bench_model_fingerprint) when it is set.
StoreOptions bench_store_options(const BenchConfig& config);
// The model fingerprint bench's saved sequences carry: the synthetic
// workload's geometry and seed ("pqkv-bench synthetic tiny seed 1").
std::string bench_model_fingerprint(const BenchConfig& config);
// Saves `seq` into config.save_dir, then closes and reopens it: fills `row`'s
// saved_as, save_ms and reopen_ms (on a CUDA store until the restored
// indexes are on the device). Errors of Store::save and open_sequence.
Status save_and_reopen(Store& store, const std::string& name, BenchRow* row);

}  // namespace pqkv::tools
