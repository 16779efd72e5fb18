// `pqkv bench`: selection quality and stage timings of the decode step on the
// synthetic workload, one row per PQ setting (and Faiss's IndexPQ as a baseline).
#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/session.h"
#include "tools/bench_batch.h"
#include "tools/bench_drift.h"
#include "tools/bench_graph.h"
#include "tools/bench_runner.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"
#include "tools/model_flags.h"

namespace pqkv::tools {
namespace {

struct BenchArgs {
  std::string model = "llama-3.1-8b";
  int layers = 2;
  int64_t context = 32768;
  int steps = 16;
  std::string budget = "0.1";
  std::string sink = "32";
  std::string window;
  std::string top_k;
  bool fixed_at_prefill = false;
  std::vector<std::string> pq = {"default"};
  std::vector<std::string> selection = {"int4"};
  std::string aggregation = "softmax-sum";
  std::string backend = "cpu";
  uint64_t seed = 1;
  bool compare_faiss = false;
  bool no_quality = false;
  bool quiet = false;
  std::string json;
  int threads = 0;
  int batch = 0;
  bool no_resident = false;
  bool explain = false;
  // Tier bandwidths the plan's time is predicted from, in GB/s (measured on
  // the H200: docs/benchmarks.md).
  double dram_gbps = 50.9;
  double hbm_gbps = 4300;
  // Random 4 KiB page reads of spill files through io_uring, GB/s (measured
  // on the CPU machine's disk: docs/benchmarks.md).
  double ssd_gbps = 0.2;
  double ssd_fraction = 0;
  std::string ssd_dir;
  bool graph = false;
  bool vary_queries = false;
  std::string block_cache = "0";
  int64_t block_tokens = 64;
  int cache_admit = 1;
  std::string cache_policy = "lfu-aging";
  std::string save;
  int64_t drift = 0;
  double drift_threshold = 2.0;
  int64_t drift_min_tokens = 512;
  float drift_scale = 1.0f;
  float drift_offset = 2.0f;
  float drift_outliers = 1.0f;
  std::string drift_stream = "store";
};

// --block-cache: bytes (with an optional K, M or G suffix, powers of 1024)
// or a percentage of the run's K/V bytes (context + steps tokens, every
// measured layer and KV head).
Result<int64_t> parse_cache_bytes(const std::string& text, const ModelSpec& spec, int64_t tokens) {
  const auto bad = [&] {
    return Status::invalid_argument(
        "--block-cache must be bytes (e.g. 512M, 2G) or a percentage "
        "of the K/V bytes (e.g. 5%), got '" +
        text + "'");
  };
  // A decimal number then a suffix: stod read hex (0x10), nan and inf (an
  // int64 cast of infG is undefined) and leading spaces.
  const size_t number_end = text.find_first_of("%KkMG");
  const std::string suffix = number_end == std::string::npos ? "" : text.substr(number_end);
  const std::optional<double> parsed = parse_decimal(text.substr(0, number_end));
  if (!parsed || !(*parsed >= 0)) return bad();
  const double value = *parsed;
  const double kv_bytes = static_cast<double>(tokens) * spec.num_layers * spec.num_kv_heads *
                          static_cast<double>(spec.row_bytes());
  if (suffix == "%") {
    if (value > 100) return bad();
    return static_cast<int64_t>(kv_bytes * value / 100);
  }
  double scale = 1;
  if (suffix == "K" || suffix == "k") {
    scale = 1024.0;
  } else if (suffix == "M") {
    scale = 1024.0 * 1024;
  } else if (suffix == "G") {
    scale = 1024.0 * 1024 * 1024;
  } else if (!suffix.empty()) {
    return bad();
  }
  // Past 2^62 bytes no machine has; the cast of a larger double is undefined.
  if (value * scale > 0x1p62) return bad();
  return static_cast<int64_t>(value * scale);
}

Result<BenchConfig> to_config(const BenchArgs& a) {
  BenchConfig c;
  PQKV_ASSIGN_OR_RETURN(c.spec, ModelSpec::preset(a.model));
  if (a.layers < 1 || a.layers > c.spec.num_layers) {
    return Status::invalid_argument(
        fmt::format("--layers must be 1..{} for {}", c.spec.num_layers, c.spec.name));
  }
  c.spec.num_layers = a.layers;
  c.context = a.context;
  c.steps = a.steps;
  PQKV_ASSIGN_OR_RETURN(c.budget, model::parse_budget(a.budget, a.sink));
  if (!a.window.empty()) {
    PQKV_ASSIGN_OR_RETURN(c.budget.window, model::parse_token_count("--window", a.window));
  }
  if (!a.top_k.empty()) {
    PQKV_ASSIGN_OR_RETURN(c.budget.top_k, model::parse_token_count("--top-k", a.top_k));
  }
  c.budget.fixed_at_prefill = a.fixed_at_prefill;
  for (const auto& p : a.pq) {
    PQKV_ASSIGN_OR_RETURN(PqConfig pq, PqConfig::parse(p));
    PQKV_RETURN_IF_ERROR(pq.validate(c.spec.head_dim));
    c.pq.push_back(pq);
  }
  c.selections.clear();
  for (size_t i = 0; i < a.selection.size(); ++i) {
    PQKV_ASSIGN_OR_RETURN(SelectionConfig selection, SelectionConfig::parse(a.selection[i]));
    // Two rows of one selection would share a name (and a save).
    if (std::find(a.selection.begin(), a.selection.begin() + i, a.selection[i]) !=
        a.selection.begin() + i) {
      return Status::invalid_argument(
          fmt::format("--selection {} is given twice: give each selection once", a.selection[i]));
    }
    c.selections.push_back(selection);
  }
  PQKV_ASSIGN_OR_RETURN(c.aggregation, parse_gqa_aggregation(a.aggregation));
  PQKV_ASSIGN_OR_RETURN(c.device, parse_device(a.backend));
  c.seed = a.seed;
  c.compare_faiss = a.compare_faiss;
  c.quality = !a.no_quality;
  c.num_threads = a.threads;
  c.resident = !a.no_resident;
  if (a.cache_policy == "pqcache") {
    // PQCache's GPU cache: 32 blocks of 128 tokens per layer holding every
    // KV head, LFU without aging.
    c.block_cache_tokens = 128;
    c.block_cache_aging_steps = 0;
    c.block_cache_bytes =
        int64_t{32} * c.spec.num_layers * c.spec.num_kv_heads * 128 * c.spec.row_bytes();
  } else if (a.cache_policy == "lfu-aging") {
    PQKV_ASSIGN_OR_RETURN(c.block_cache_bytes,
                          parse_cache_bytes(a.block_cache, c.spec, a.context + a.steps));
    c.block_cache_tokens = a.block_tokens;
    c.block_cache_admit_steps = a.cache_admit;
  } else {
    return Status::invalid_argument("--cache-policy must be lfu-aging or pqcache, got '" +
                                    a.cache_policy + "'");
  }
  c.cache_policy = a.cache_policy;
  const auto bandwidth = [](double gbps) { return std::isfinite(gbps) && gbps > 0; };
  if (!bandwidth(a.dram_gbps) || !bandwidth(a.hbm_gbps) || !bandwidth(a.ssd_gbps)) {
    return Status::invalid_argument(
        "--dram-gbps, --hbm-gbps and --ssd-gbps must be positive finite numbers of GB/s");
  }
  if (!(a.ssd_fraction >= 0 && a.ssd_fraction < 1)) {
    return Status::invalid_argument("--ssd-fraction must be in [0, 1), got " +
                                    std::to_string(a.ssd_fraction));
  }
  c.ssd_fraction = a.ssd_fraction;
  if (!a.ssd_dir.empty() && a.ssd_fraction == 0) {
    return Status::invalid_argument(
        "--ssd-dir is where --ssd-fraction puts its rows: add --ssd-fraction, or drop --ssd-dir");
  }
  if (a.ssd_fraction > 0) {
    if (!a.ssd_dir.empty()) PQKV_RETURN_IF_ERROR(check_output_dir("--ssd-dir", a.ssd_dir));
    c.ssd_directory = a.ssd_dir.empty() ? (std::filesystem::temp_directory_path() /
                                           ("pqkv-bench-ssd-" + std::to_string(::getpid())))
                                              .string()
                                        : a.ssd_dir;
  }
  if (a.graph && a.ssd_fraction > 0) {
    return Status::invalid_argument(
        "--graph does not combine with --ssd-fraction: a decode step with rows on disk reads its "
        "positions on the host and cannot be captured in a CUDA graph");
  }
  if (a.drift > 0 && (a.graph || a.batch > 0 || !a.save.empty() || a.ssd_fraction > 0)) {
    return Status::invalid_argument(
        "--drift is a mode of its own: it does not combine with --graph, --batch, --save or "
        "--ssd-fraction");
  }
  c.vary_queries = a.vary_queries;
  if (a.graph && !c.device.is_cuda()) {
    return Status::invalid_argument("--graph replays a CUDA graph: pass --backend cuda");
  }
  if (a.vary_queries && !a.graph) {
    return Status::invalid_argument(
        "--vary-queries applies to --graph runs (direct runs always read each step's queries)");
  }
  if (a.graph && c.block_cache_bytes > 0 && c.block_cache_tokens != 1) {
    // A replayed graph never returns to the host between steps, so the
    // policy of blocks (which runs on the host) would never admit nor evict:
    // the cache would stay as it was at capture, empty here. Single rows
    // (--block-tokens 1) run their policy on the device.
    return Status::invalid_argument(
        "--graph combines with --block-cache only for --block-tokens 1 (hot rows, whose "
        "policy runs on the device): the policy of longer blocks runs on the host between "
        "steps, which a replayed graph never does; pass --block-tokens 1 or drop --graph");
  }
  if (!a.json.empty()) PQKV_RETURN_IF_ERROR(check_output_path("--json", a.json, true));
  PQKV_RETURN_IF_ERROR(check_bench_config(c));
  if (!a.save.empty()) {
    if (a.graph) return Status::invalid_argument("--save does not apply to --graph runs");
    PQKV_RETURN_IF_ERROR(check_output_dir("--save", a.save));
    c.save_dir = a.save;
  }
  PQKV_RETURN_IF_ERROR(
      check_outputs_apart({{"--json", a.json}, {"--save", a.save}, {"--ssd-dir", a.ssd_dir}}, {}));
  return c;
}

// What each column of the table holds, with its unit; docs/benchmarks.md uses the same words.
constexpr const char* kLegend =
    "columns:\n"
    "  selection   pqkv's index with its --selection code (oracle, int8, int4, two stages\n"
    "              FIRST+RERANK:C) and PQ setting (m sub-spaces of b bits), or a baseline\n"
    "  B/tok       index bytes per token and KV head\n"
    "  build ms    index build (fitting the code: int4/int8 scales or PQ k-means, then\n"
    "              encoding the prompt's keys) in ms, all measured layers together\n"
    "              (Sequence::finish_prefill)\n"
    "  recall      attention-mass recall: exact softmax mass of the attended tokens / mass of\n"
    "              the oracle (same sink and window, exact top-K), mean over (step, layer)\n"
    "  min         the lowest recall of any (step, layer)\n"
    "  out err     relative L2 error of the attention output against exact attention, mean\n"
    "  needles     H/N: N (decode step, layer) pairs whose query looks for a planted needle;\n"
    "              H the fraction of KV heads whose attended tokens hold it, summed over them\n"
    "  score us    scoring every token with the index (int4/int8: dot products with the\n"
    "              decoded keys; PQ: distance tables + lookups)\n"
    "  topk us     picking the top-K tokens per KV head\n"
    "  gather us   gathering the attended keys and values\n"
    "  attn us     attention over the gathered tokens\n"
    "  step us     the whole Sequence::attend call (the stages above and the rest)\n"
    "  exact us    Sequence::attend_exact of the same query over every token\n"
    "  every 'us' column is the mean time in microseconds per (decode step, layer);\n"
    "  '-' marks what was not measured: quality with --no-quality, and for the Faiss\n"
    "  baseline everything but its search time (in 'score us') and its quality";

// One tier of a step's fetch plan, as EXPLAIN shows it: mean per (step,
// layer) over every KV head.
struct TierLine {
  const char* tier;
  double rows;
  double bytes;
  double hits;          // rows served without crossing PCIe (ssd: by a page read for another row)
  double predicted_us;  // bytes over the tier's bandwidth
  double pages = -1;    // ssd: 4 KiB pages read; -1 elsewhere
  double measured_us = -1;  // ssd: wall time of its reads; -1 where not measured apart
};

// The tiers of `row`: resident rows and cache hits are copied within HBM
// (read and write), DRAM rows cross PCIe once, SSD rows are read from disk in whole pages (on
// a cpu store DRAM rows are read in place).
std::vector<TierLine> tier_lines(const BenchRow& row, const BenchArgs& a) {
  std::vector<TierLine> lines = {
      {"resident", row.resident_rows, row.resident_bytes, row.resident_rows,
       2 * row.resident_bytes / (a.hbm_gbps * 1e3)},
      {"cache", row.cache_hits, row.cache_bytes, row.cache_hits,
       2 * row.cache_bytes / (a.hbm_gbps * 1e3)},
      {"dram", row.dram_rows, row.dram_bytes, 0, row.dram_bytes / (a.dram_gbps * 1e3)}};
  if (a.ssd_fraction > 0) {
    lines.push_back({"ssd", row.ssd_rows, row.ssd_bytes, row.ssd_hits,
                     row.ssd_bytes / (a.ssd_gbps * 1e3), row.ssd_pages, row.ssd_us});
  }
  return lines;
}

// Rows read without crossing PCIe, of all the step's rows.
double hit_rate(const BenchRow& row) {
  const double rows = row.resident_rows + row.cache_hits + row.dram_rows + row.ssd_rows;
  return rows > 0 ? (row.resident_rows + row.cache_hits) / rows : 0;
}

// The block cache's hits, of the rows that are not resident.
double cache_hit_rate(const BenchRow& row) {
  const double rows = row.cache_hits + row.dram_rows + row.ssd_rows;
  return rows > 0 ? row.cache_hits / rows : 0;
}

// `--explain`: the fetch plan of each measured row, as a database's EXPLAIN
// ANALYZE prints a query plan.
void print_explain(const BenchReport& r, const BenchArgs& a) {
  const BenchConfig& c = r.config;
  for (const BenchRow& row : r.rows) {
    if (row.search_only) continue;
    fmt::print(
        "\nEXPLAIN ANALYZE {}: one layer's decode step, mean over {} steps x {} layers, context "
        "{} tokens, budget {}, backend {}\n",
        row.name, c.steps, c.spec.num_layers, c.context, c.budget.to_string(),
        c.device.to_string());
    fmt::print("  {:<10} {:>10} {:>12} {:>10} {:>8} {:>13} {:>12}\n", "tier", "rows", "bytes",
               "hits", "pages", "predicted us", "measured us");
    double predicted = 0;
    for (const TierLine& t : tier_lines(row, a)) {
      const auto opt = [](double v, const char* f) {
        return v < 0 ? std::string("-") : fmt::format(fmt::runtime(f), v);
      };
      fmt::print("  {:<10} {:>10.0f} {:>12.0f} {:>10.0f} {:>8} {:>13.1f} {:>12}\n", t.tier, t.rows,
                 t.bytes, t.hits, opt(t.pages, "{:.0f}"), t.predicted_us,
                 opt(t.measured_us, "{:.1f}"));
      predicted += t.predicted_us;
    }
    fmt::print(
        "  fetch: predicted {:.1f} us (DRAM at {:.1f} GB/s, HBM at {:.0f} GB/s{}), measured "
        "{:.1f} us{}; hit rate {:.3f} (rows read without crossing PCIe)\n",
        predicted, a.dram_gbps, a.hbm_gbps,
        a.ssd_fraction > 0 ? fmt::format(", SSD at {:.2f} GB/s", a.ssd_gbps) : std::string(),
        row.gather_us + row.ssd_us,
        a.ssd_fraction > 0 ? fmt::format(" (SSD reads {:.1f} us)", row.ssd_us) : std::string(),
        hit_rate(row));
    if (c.block_cache_bytes > 0) {
      fmt::print(
          "  block cache: {} bytes, {}-token blocks, {} policy; hit rate {:.3f} (of the rows "
          "not resident){}\n",
          c.block_cache_bytes, c.block_cache_tokens, c.cache_policy, cache_hit_rate(row),
          c.device.is_cuda()
              ? fmt::format("; host time {:.1f} us on the step's thread, policy {:.1f} us on "
                            "its own thread",
                            row.cache_enqueue_us, row.cache_policy_us)
              : std::string());
    }
    if (row.picks_per_block64 > 0) {
      fmt::print(
          "  picks that recur: {:.3f} picked at the step before, {:.3f} at any earlier step, "
          "{:.3f} at 2+ of the last 8 steps; picks per touched block: {:.1f} of 16 tokens, "
          "{:.1f} of 64\n",
          row.reuse_previous, row.reuse_any, row.reuse_twice_in_8, row.picks_per_block16,
          row.picks_per_block64);
    }
    fmt::print("  then attention over {} rows per KV head: {:.1f} us; whole step {:.1f} us\n",
               row.attended_per_head, row.attention_us, row.attend_us);
  }
}

// --save: where each run's sequence went and what saving and reopening took.
template <typename Row>
void print_saved(const BenchConfig& c, const std::vector<Row>& rows) {
  if (c.save_dir.empty()) return;
  fmt::print("saved into {} (model fingerprint '{}'; pqkv inspect {} lists them):\n", c.save_dir,
             bench_model_fingerprint(c), c.save_dir);
  for (const Row& row : rows) {
    if (row.saved_as.empty()) continue;
    fmt::print("  {:<26} save {:.1f} ms, close + open_sequence {:.1f} ms\n", row.saved_as,
               row.save_ms, row.reopen_ms);
  }
}

// --save's part of a row's JSON.
template <typename Row>
void add_saved_json(const Row& row, nlohmann::json* out) {
  if (row.saved_as.empty()) return;
  (*out)["saved_as"] = row.saved_as;
  (*out)["save_ms"] = row.save_ms;
  (*out)["reopen_ms"] = row.reopen_ms;
}

void print_table(const BenchReport& r) {
  const BenchConfig& c = r.config;
  fmt::print(
      "pqkv bench: {} ({} of {} layers measured), context {} tokens, {} decode steps, "
      "budget {}, {} aggregation, backend {}\n",
      c.spec.name, c.spec.num_layers, ModelSpec::preset(c.spec.name)->num_layers, c.context,
      c.steps, c.budget.to_string(), gqa_aggregation_name(c.aggregation), c.device.to_string());
  fmt::print("{:<26} {:>5} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
             "selection", "B/tok", "build ms", "recall", "min", "out err", "needles", "score us",
             "topk us", "gather us", "attn us", "step us", "exact us");
  for (const BenchRow& row : r.rows) {
    const std::string needles = c.quality && row.needle_steps > 0
                                    ? fmt::format("{:.0f}/{}", row.needle_hits, row.needle_steps)
                                    : "-";
    const auto quality = [&](double v) { return c.quality ? fmt::format("{:.4f}", v) : "-"; };
    const auto time = [&](double v) {
      return row.search_only ? std::string("-") : fmt::format("{:.1f}", v);
    };
    fmt::print(
        "{:<26} {:>5} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9.1f} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        row.name, row.code_bytes_per_token, time(row.build_ms), quality(row.recall_mean),
        quality(row.recall_min), quality(row.output_error_mean), needles, row.score_us,
        time(row.topk_us), time(row.gather_us), time(row.attention_us), time(row.attend_us),
        time(row.exact_us));
  }
  fmt::print("{}\n", kLegend);
  print_saved(r.config, r.rows);
}

// The run's settings, which every mode's JSON starts with.
nlohmann::json config_json(const BenchConfig& c) {
  nlohmann::json j;
  j["model"] = c.spec.name;
  j["layers"] = c.spec.num_layers;
  j["context"] = c.context;
  j["steps"] = c.steps;
  j["budget"] = c.budget.to_string();
  j["aggregation"] = gqa_aggregation_name(c.aggregation);
  j["backend"] = c.device.to_string();
  j["seed"] = c.seed;
  j["resident_sink_window"] = c.resident;
  j["block_cache"] = {{"bytes", c.block_cache_bytes},
                      {"tokens_per_block", c.block_cache_tokens},
                      {"aging_steps", c.block_cache_aging_steps},
                      {"admit_steps", c.block_cache_admit_steps},
                      {"policy", c.cache_policy}};
  j["ssd_fraction"] = c.ssd_fraction;
  if (!c.save_dir.empty()) {
    j["save_dir"] = c.save_dir;
    j["model_fingerprint"] = bench_model_fingerprint(c);
  }
  return j;
}

nlohmann::json to_json(const BenchReport& r, const BenchArgs& a) {
  const BenchConfig& c = r.config;
  nlohmann::json j = config_json(c);
  j["tier_bandwidth_gbps"] = {{"dram", a.dram_gbps}, {"hbm", a.hbm_gbps}, {"ssd", a.ssd_gbps}};
  for (const BenchRow& row : r.rows) {
    // Not measured: null.
    const auto time = [&](double v) {
      return row.search_only ? nlohmann::json() : nlohmann::json(v);
    };
    const auto quality = [&](auto v) { return c.quality ? nlohmann::json(v) : nlohmann::json(); };
    j["rows"].push_back({{"selection", row.name},
                         {"code_bytes_per_token", row.code_bytes_per_token},
                         {"prefill_ms", time(row.prefill_ms)},
                         {"build_ms", time(row.build_ms)},
                         {"recall_mean", quality(row.recall_mean)},
                         {"recall_min", quality(row.recall_min)},
                         {"output_error_mean", quality(row.output_error_mean)},
                         {"output_error_max", quality(row.output_error_max)},
                         {"needle_steps", quality(row.needle_steps)},
                         {"needle_hits", quality(row.needle_hits)},
                         {"attended_per_head", row.attended_per_head},
                         {"score_us", row.score_us},
                         {"topk_us", time(row.topk_us)},
                         {"gather_us", time(row.gather_us)},
                         {"attention_us", time(row.attention_us)},
                         {"attend_us", time(row.attend_us)},
                         {"exact_us", time(row.exact_us)}});
    add_saved_json(row, &j["rows"].back());
    if (row.search_only) continue;
    nlohmann::json& out = j["rows"].back();
    double predicted = 0;
    for (const TierLine& t : tier_lines(row, a)) {
      out["fetch_tiers"].push_back({{"tier", t.tier},
                                    {"rows", t.rows},
                                    {"bytes", t.bytes},
                                    {"hits", t.hits},
                                    {"predicted_us", t.predicted_us}});
      if (t.pages >= 0) out["fetch_tiers"].back()["pages"] = t.pages;
      if (t.measured_us >= 0) out["fetch_tiers"].back()["measured_us"] = t.measured_us;
      predicted += t.predicted_us;
    }
    out["fetch_hit_rate"] = hit_rate(row);
    out["cache_tier_hits"] = row.cache_hits;
    out["cache_tier_bytes"] = row.cache_bytes;
    out["cache_tier_hit_rate"] = cache_hit_rate(row);
    out["cache_policy_us"] = row.cache_policy_us;
    out["cache_enqueue_us"] = row.cache_enqueue_us;
    out["fetch_predicted_us"] = predicted;
    out["picks_reuse_previous"] = row.reuse_previous;
    out["picks_reuse_any"] = row.reuse_any;
    out["picks_reuse_twice_in_8"] = row.reuse_twice_in_8;
    out["picks_per_block16"] = row.picks_per_block16;
    out["picks_per_block64"] = row.picks_per_block64;
  }
  return j;
}

void print_batch_table(const BatchReport& r) {
  const BenchConfig& c = r.config;
  fmt::print(
      "pqkv bench --batch {}: {} ({} layers measured), {} sequence{} of context x 1, 0.75, "
      "0.5, 0.25, ..., {} decode steps, budget {}, backend {}\n",
      r.batch, c.spec.name, c.spec.num_layers, r.batch, r.batch == 1 ? "" : "s", c.steps,
      c.budget.to_string(), c.device.to_string());
  fmt::print("{:>8} {:>12} {:>8} {:>8} {:>10}\n", "sequence", "prompt tok", "recall", "min",
             "attended");
  for (size_t i = 0; i < r.sequences.size(); ++i) {
    const BatchSequenceRow& s = r.sequences[i];
    const auto quality = [&](double v) { return c.quality ? fmt::format("{:.4f}", v) : "-"; };
    fmt::print("{:>8} {:>12} {:>8} {:>8} {:>10}\n", i, s.prompt_tokens, quality(s.recall_mean),
               quality(s.recall_min), s.attended_per_head);
  }
  fmt::print(
      "per layer step: batched attend {:.1f} us ({:.1f} us per sequence), the same sequences one "
      "by one {:.1f} us, batched select {:.1f} us\n",
      r.step_us, r.per_sequence_us, r.one_by_one_step_us, r.select_us);
  if (r.replayed_step_us > 0) {
    fmt::print(
        "replayed from one CUDA graph (device queries and outputs): {:.1f} us per layer step "
        "({:.1f} us per sequence)\n",
        r.replayed_step_us, r.replayed_step_us / r.batch);
  }
  fmt::print(
      "recall: exact softmax mass on the positions Store::select returned / mass the oracle "
      "attends, mean and minimum over steps and layers; attended: positions per KV head at the "
      "last step; times: wall time of one layer's call for the whole batch, mean over steps and "
      "layers.\n");
  print_saved(r.config, r.sequences);
}

nlohmann::json batch_to_json(const BatchReport& r) {
  nlohmann::json j = config_json(r.config);
  j["batch"] = r.batch;
  j["step_us"] = r.step_us;
  j["per_sequence_us"] = r.per_sequence_us;
  j["one_by_one_step_us"] = r.one_by_one_step_us;
  j["select_us"] = r.select_us;
  if (r.replayed_step_us > 0) j["replayed_step_us"] = r.replayed_step_us;
  for (const BatchSequenceRow& s : r.sequences) {
    nlohmann::json row = {{"prompt_tokens", s.prompt_tokens},
                          {"attended_per_head", s.attended_per_head}};
    if (r.config.quality) {
      row["recall_mean"] = s.recall_mean;
      row["recall_min"] = s.recall_min;
    }
    add_saved_json(s, &row);
    j["sequences"].push_back(row);
  }
  return j;
}

// `--batch N`: the batched step instead of the single-sequence runs.
void run_batch(const BenchConfig& config, const BenchArgs& args, int* exit_code) {
  auto report = run_batch_bench(config, args.batch, /*progress=*/!args.quiet && args.json != "-");
  if (!report.ok()) {
    *exit_code = report_failure("bench", report.status(), args.json == "-", 1);
    return;
  }
  if (args.json == "-") {
    std::cout << json_text(batch_to_json(*report)) << "\n";
    return;
  }
  print_batch_table(*report);
  if (!args.json.empty()) {
    if (Status s = write_output_file("--json", args.json, json_text(batch_to_json(*report)) + "\n");
        !s.ok()) {
      *exit_code = report_failure("bench", s, false, 1);
    }
  }
}

nlohmann::json graph_to_json(const GraphReport& r) {
  nlohmann::json j = config_json(r.config);
  j["graph_replay"] = true;
  j["vary_queries"] = r.config.vary_queries;
  j["attended_per_head"] = r.attended_per_head;
  j["capture_ms"] = r.capture_ms;
  j["us_per_token"] = r.us_per_token;
  j["us_per_layer"] = r.us_per_layer;
  return j;
}

void run_graph(const BenchConfig& config, const BenchArgs& args, int* exit_code) {
  auto report = run_graph_bench(config, /*progress=*/args.json != "-");
  if (!report.ok()) {
    *exit_code = report_failure("bench", report.status(), args.json == "-", 1);
    return;
  }
  const nlohmann::json j = graph_to_json(*report);
  if (args.json == "-") {
    std::cout << json_text(j) << "\n";
    return;
  }
  fmt::print(
      "{} layers of {}, context {}, budget {}: one CUDA graph of every layer's step "
      "(append + attend), replayed {} times\n"
      "  attended per KV head {}   capture {:.1f} ms   {:.1f} us per token   {:.1f} us per layer\n",
      config.spec.num_layers, config.spec.name, config.context, config.budget.to_string(),
      config.steps, report->attended_per_head, report->capture_ms, report->us_per_token,
      report->us_per_layer);
  if (!args.json.empty()) {
    if (Status s = write_output_file("--json", args.json, json_text(j) + "\n"); !s.ok()) {
      *exit_code = report_failure("bench", s, false, 1);
    }
  }
}

constexpr const char* kDriftLegend =
    "columns:\n"
    "  selection   the --selection code (and PQ setting)\n"
    "  refit       off, or on: refits past --drift-threshold (SequenceOptions::refit_threshold)\n"
    "  q1..q4      attention-mass recall against exact top-K (same sink and window), mean over\n"
    "              the sampled steps and layers of each quarter of the generated tokens\n"
    "  mean, min   over every sampled (step, layer)\n"
    "  refits      refits swapped in, all layers\n"
    "  refit ms    time of their builds (fit + re-encoding every key), summed; off the decode\n"
    "              path: cpu, wall time on a thread of its own; cuda, GPU time on the index's\n"
    "              build stream\n"
    "  end ratio   the largest per-KV-head error ratio (new keys' quantization error / the\n"
    "              fit's) of any layer at the end\n"
    "  append us   one layer's append of a generated token, mean and slowest (max)\n"
    "  step us     a whole decode step (every layer's append and attention, host calls), mean\n"
    "              over the steps while no refit is built (idle) and while one is (refit; -\n"
    "              when none ran), the steps of the latter, and the slowest step";

void print_drift_table(const DriftReport& r) {
  const BenchConfig& c = r.config;
  fmt::print(
      "pqkv bench --drift {}: {} ({} layers measured), prompt {} tokens, {} generated tokens "
      "drifting (scale +{:.1f}, offset {:.1f} sigma, outliers +{:.1f} at the end), budget {}, "
      "{} sampled steps, refit threshold {:.2f} after {} tokens, backend {}{}\n",
      r.drift.generated, c.spec.name, c.spec.num_layers, c.context, r.drift.generated,
      r.drift.scale, r.drift.offset, r.drift.outlier_growth, c.budget.to_string(), r.drift.samples,
      r.drift.refit_threshold, r.drift.refit_min_tokens, c.device.to_string(),
      r.drift.high_priority_stream ? ", decode on a greatest-priority stream" : "");
  fmt::print(
      "{:<16} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} "
      "{:>9} {:>6} {:>9}\n",
      "selection", "refit", "q1", "q2", "q3", "q4", "mean", "min", "refits", "refit ms",
      "end ratio", "append us", "max us", "step idle", "step refit", "steps", "step max");
  for (const DriftRow& row : r.rows) {
    fmt::print(
        "{:<16} {:>5} {:>7.4f} {:>7.4f} {:>7.4f} {:>7.4f} {:>7.4f} {:>7.4f} {:>6} {:>9.1f} "
        "{:>9.2f} {:>9.1f} {:>9.0f} {:>9.1f} {:>9} {:>6} {:>9.0f}\n",
        row.selection, row.refit ? "on" : "off", row.recall_quarter[0], row.recall_quarter[1],
        row.recall_quarter[2], row.recall_quarter[3], row.recall_mean, row.recall_min, row.refits,
        row.refit_ms, row.end_error_ratio, row.append_us, row.append_max_us, row.step_us[0],
        row.refit_steps > 0 ? fmt::format("{:.1f}", row.step_us[1]) : std::string("-"),
        row.refit_steps, row.step_max_us);
  }
  fmt::print("{}\n", kDriftLegend);
}

nlohmann::json drift_to_json(const DriftReport& r) {
  nlohmann::json j = config_json(r.config);
  j["drift"] = {{"generated", r.drift.generated},
                {"refit_threshold", r.drift.refit_threshold},
                {"refit_min_tokens", r.drift.refit_min_tokens},
                {"samples", r.drift.samples},
                {"scale", r.drift.scale},
                {"offset", r.drift.offset},
                {"outlier_growth", r.drift.outlier_growth},
                {"high_priority_stream", r.drift.high_priority_stream}};
  for (const DriftRow& row : r.rows) {
    j["rows"].push_back({{"selection", row.selection},
                         {"refit", row.refit},
                         {"recall_quarter", row.recall_quarter},
                         {"recall_mean", row.recall_mean},
                         {"recall_min", row.recall_min},
                         {"refits", row.refits},
                         {"refit_ms", row.refit_ms},
                         {"end_error_ratio", row.end_error_ratio},
                         {"append_us", row.append_us},
                         {"append_max_us", row.append_max_us},
                         {"step_us", row.step_us[0]},
                         {"step_refit_us", row.step_us[1]},
                         {"refit_steps", row.refit_steps},
                         {"step_max_us", row.step_max_us}});
  }
  return j;
}

// `--drift N`: the drifting generation instead of the table. Without
// --selection: int4, int8 and PQ.
void run_drift(BenchConfig config, const BenchArgs& args, bool selection_given, int* exit_code) {
  if (!selection_given) {
    config.selections = {SelectionConfig{}, SelectionConfig{}, SelectionConfig::pq()};
    config.selections[1].code = KeyCode::kInt8;
  }
  DriftBenchConfig drift;
  drift.generated = args.drift;
  drift.refit_threshold = args.drift_threshold;
  drift.refit_min_tokens = args.drift_min_tokens;
  drift.scale = args.drift_scale;
  drift.offset = args.drift_offset;
  drift.outlier_growth = args.drift_outliers;
  drift.high_priority_stream = args.drift_stream == "high";
  auto report = run_drift_bench(config, drift, /*progress=*/!args.quiet && args.json != "-");
  if (!report.ok()) {
    *exit_code = report_failure("bench", report.status(), args.json == "-",
                                report.status().code() == StatusCode::kInvalidArgument ? 2 : 1);
    return;
  }
  if (args.json == "-") {
    std::cout << drift_to_json(*report).dump(2) << "\n";
    return;
  }
  print_drift_table(*report);
  if (!args.json.empty()) {
    if (Status s = write_output_file("--json", args.json, drift_to_json(*report).dump(2) + "\n");
        !s.ok()) {
      *exit_code = report_failure("bench", s, false, 1);
    }
  }
}

void add_bench(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Measure selection quality and decode-step time on the synthetic workload.\n"
      "Prefills a sequence with keys and values that have real LLM structure (RoPE, outlier "
      "channels, sinks, recency, planted needles), decodes a few steps through Sequence::attend, "
      "and compares each step with exact attention. The default run (Llama-3.1-8B geometry, 32K "
      "tokens, 10% budget, 2 layers, 16 steps, CPU) takes under a minute.");
  cmd->add_option("--model", args->model,
                  "model geometry preset: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha")
      ->capture_default_str();
  cmd->add_option("--layers", args->layers, "layers to measure (the first N of the preset)")
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--context", args->context, "prompt length in tokens")
      ->capture_default_str()
      ->check(whole_number(true));
  cmd->add_option("--steps", args->steps, "decode steps")
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--budget", args->budget,
                  std::string("tokens attended besides the sink, split evenly between the "
                              "recent window and the top-K, or 'all' for every token: ") +
                      kTokenCountGrammar)
      ->capture_default_str();
  cmd->add_option("--sink", args->sink, "sink tokens, in --budget's grammar (32, 1%, 16+1%)")
      ->capture_default_str();
  cmd->add_option("--window", args->window,
                  "recent window, in --budget's grammar, overriding --budget's half");
  cmd->add_option("--top-k", args->top_k,
                  "top-K tokens, in --budget's grammar, overriding --budget's half");
  cmd->add_flag("--fixed-at-prefill", args->fixed_at_prefill,
                "PQCache's rule: window and top-K fixed from the prompt length");
  cmd->add_option("--pq", args->pq,
                  "PQ setting, used by --selection pq and two-stage selections with a pq "
                  "stage; repeatable for a comparison in one run: default (m=head_dim/8,b=8), "
                  "pqcache (m=2,b=6), or m=M,b=B (M sub-spaces: divides head_dim, at most "
                  "head_dim/2; B bits per code: 1..8)")
      ->capture_default_str();
  cmd->add_option("--selection", args->selection,
                  "how top-K tokens are picked, repeatable for a comparison in one run: int4 (the "
                  "default) or int8 (keys scalar-quantized per channel), pq (with --pq), oracle "
                  "(exact scores from the full keys), or FIRST+RERANK:C for two stages (e.g. "
                  "pq+int8:4: PQ picks 4 x top-K candidates, int8 keys keep top-K; C is 1 to "
                  "1024; FIRST and RERANK are pq, int8, int4 or exact)")
      ->capture_default_str();
  cmd->add_option("--aggregation", args->aggregation, "GQA aggregation: softmax-sum or max")
      ->capture_default_str();
  cmd->add_option("--backend", args->backend, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--seed", args->seed, "workload seed")
      ->capture_default_str()
      ->check(whole_number(false));
  cmd->add_flag("--compare-faiss", args->compare_faiss,
                "also run Faiss's IndexPQ search over the same codes as a baseline (for "
                "--selection pq)");
  cmd->add_flag("--no-quality", args->no_quality,
                "skip the comparison with exact attention and measure times only (long contexts, "
                "all layers)");
  cmd->add_flag("--quiet", args->quiet,
                "no progress output on stderr (progress shows on a terminal only, and never with "
                "--json -)");
  cmd->add_option("--json", args->json,
                  "also write the results as JSON to this file ('-' = stdout instead of the "
                  "table); the path is checked before the run")
      ->check(non_empty());
  cmd->add_option("--threads", args->threads, "CPU threads (0 = all cores)")
      ->capture_default_str()
      ->check(whole_in(0, StoreOptions::kMaxThreads));
  cmd->add_option("--batch", args->batch,
                  "decode N sequences together (prompts of context x 1, 0.75, 0.5, 0.25, ...) "
                  "through the batched step and the selector; reports recall per sequence and "
                  "times per step and per sequence (first --pq and --selection setting only); "
                  "on cuda also the batched step of every layer captured in one CUDA graph and "
                  "replayed (replayed_step_us in --json); 0 (the default): one sequence, "
                  "no batch")
      ->check(finite_at_least(0));
  cmd->add_flag("--no-resident", args->no_resident,
                "cuda: gather the sink and window over PCIe at every step instead of keeping "
                "them in HBM (the path before resident rows, for comparison)");
  // More sequences than a serving batch holds only makes the run long.
  cmd->get_option("--batch")->check(whole_in(0, 1024));
  cmd->add_flag("--explain", args->explain,
                "after the table, print each row's fetch plan as EXPLAIN ANALYZE: rows, bytes "
                "and hits per tier (resident in HBM, block cache slots, gathered from DRAM, read "
                "from disk with --ssd-fraction: with its pages and measured read time), the fetch "
                "time predicted from --dram-gbps, --hbm-gbps and --ssd-gbps against the measured "
                "one, and the hit rate (--json always carries the same in fetch_tiers)");
  cmd->add_option("--dram-gbps", args->dram_gbps,
                  "DRAM-to-GPU gather bandwidth the prediction uses, GB/s")
      ->capture_default_str();
  cmd->add_option("--hbm-gbps", args->hbm_gbps,
                  "HBM copy bandwidth (read + write) the prediction uses, GB/s")
      ->capture_default_str();
  cmd->add_option("--block-cache", args->block_cache,
                  "the block cache (StoreOptions::block_cache_bytes): bytes of slots (512M, 2G) or "
                  "a percentage of the run's K/V bytes (5%); 0 = none. HBM on a cuda backend")
      ->capture_default_str();
  cmd->add_option("--block-tokens", args->block_tokens,
                  "tokens per cache block: a power of two from 1 to 128")
      ->capture_default_str()
      ->check(whole_number(true));
  cmd->add_option("--cache-admit", args->cache_admit,
                  "steps a block must be picked at (its aged count) before the cache admits it: "
                  "1 admits at the first pick, 2 only a block picked again; 1 or 2 with "
                  "--block-tokens 1 (StoreOptions::block_cache_admit_steps)")
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--cache-policy", args->cache_policy,
                  "lfu-aging (pqkv's: --block-cache and --block-tokens, counts halved every 16 "
                  "steps) or pqcache (PQCache's: 32 blocks of 128 tokens per layer and KV head, "
                  "plain LFU; ignores --block-cache and --block-tokens)")
      ->capture_default_str();
  cmd->add_option("--ssd-gbps", args->ssd_gbps,
                  "random 4 KiB page read bandwidth of the spill files' disk the prediction "
                  "uses, GB/s")
      ->capture_default_str();
  cmd->add_option("--ssd-fraction", args->ssd_fraction,
                  "place this share of the rows on disk (0..0.99): the store spills cold "
                  "rows (StoreOptions::spill_to_disk) under a DRAM budget of the rest; --explain "
                  "then shows the ssd tier (cuda: a step with spilled rows synchronises; not "
                  "with --graph)")
      ->capture_default_str();
  cmd->add_option("--ssd-dir", args->ssd_dir,
                  "directory for the spilled rows with --ssd-fraction (default: a fresh one "
                  "under the system's temporary directory, removed after the run; with --save, "
                  "the rows spill under the --save directory instead)")
      ->check(non_empty());
  cmd->add_flag("--graph", args->graph,
                "CUDA only: capture the decode step of every layer (append + attend) once in a "
                "CUDA graph and replay it for --steps tokens with no per-layer sync; reports the "
                "time per token (first --pq and --selection setting; no quality)");
  cmd->add_flag("--vary-queries", args->vary_queries,
                "with --graph: each replay reads the workload's queries of its own step (copied "
                "to the device before each replay, for the cost of one small copy per token) "
                "instead of one query for every replay; measure caches with it");
  cmd->add_option("--save", args->save,
                  "save every run's sequence (after its decode steps) into this store directory "
                  "(made when missing), one per table row or --batch sequence, under the name "
                  "printed after the table (and 'saved_as' in --json); also reports Store::save "
                  "and close + open_sequence times. `pqkv inspect DIR` and `pqkv export-faiss` "
                  "read it. Not with --graph")
      ->check(non_empty());
  cmd->add_option("--drift", args->drift,
                  "a long generation whose keys drift: after the --context prompt, N "
                  "generated tokens whose keys' distribution shifts (scale, offset, outlier "
                  "channels); reports recall against exact top-K per quarter of them, without "
                  "and with refits of the codec (--drift-threshold), for int4, int8 and PQ "
                  "(or the --selection settings), the refits' count and time, and the decode "
                  "step's time while a refit is built and while none is (cpu or cuda)")
      ->check(finite_at_least(0))
      ->check(whole_number(true));
  cmd->add_option("--drift-threshold", args->drift_threshold,
                  "with --drift: the refit threshold of the runs with refits "
                  "(SequenceOptions::refit_threshold, an error ratio above 1)")
      ->capture_default_str();
  cmd->add_option("--drift-min-tokens", args->drift_min_tokens,
                  "with --drift: tokens between refits (SequenceOptions::refit_min_tokens)")
      ->capture_default_str()
      ->check(whole_number(true));
  cmd->add_option("--drift-scale", args->drift_scale,
                  "with --drift: how much every generated key has grown by the last token (keys "
                  "x (1 + S))")
      ->capture_default_str()
      ->check(finite_at_least(0));
  cmd->add_option("--drift-offset", args->drift_offset,
                  "with --drift: how far every dim has moved by the last token, in key sigmas")
      ->capture_default_str()
      ->check(finite_at_least(0));
  cmd->add_option("--drift-outliers", args->drift_outliers,
                  "with --drift: how much the outlier channels have grown by the last token (x (1 "
                  "+ G))")
      ->capture_default_str()
      ->check(finite_at_least(0));
  cmd->add_option("--drift-stream", args->drift_stream,
                  "with --drift on cuda: the decode steps' stream, 'store' (the Store's own, at "
                  "the priority of the build streams that refits run on) or 'high' (one at the "
                  "device's greatest priority)")
      ->check(CLI::IsMember({"store", "high"}))
      ->capture_default_str();
  cmd->footer(std::string(kLegend) +
              "\nExit status: 0 when every row was measured, 1 when the run failed, 2 for a "
              "usage error.");
  cmd->callback([cmd, args, exit_code] {
    auto config = to_config(*args);
    if (!config.ok()) {
      *exit_code = report_failure("bench", config.status(), args->json == "-", 2);
      return;
    }
    if (args->drift > 0) {
      run_drift(*config, *args, cmd->count("--selection") > 0, exit_code);
      return;
    }
    if (args->graph) {
      run_graph(*config, *args, exit_code);
      return;
    }
    if (args->batch > 0) {
      run_batch(*config, *args, exit_code);
      return;
    }
    auto report = run_bench(*config, /*progress=*/!args->quiet && args->json != "-");
    if (config->ssd_fraction > 0 && args->ssd_dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(config->ssd_directory, ec);
    }
    if (!report.ok()) {
      Status failed = report.status();
      if (failed.code() == StatusCode::kResourceExhausted && config->ssd_fraction > 0) {
        // The bench sets that budget from its flag: name the flag.
        failed =
            Status::resource_exhausted(failed.message() + " (the bench's DRAM budget is " +
                                       fmt::format("{:g}", 1.0 - config->ssd_fraction) +
                                       " of the rows, from --ssd-fraction: lower --ssd-fraction)");
      }
      *exit_code = report_failure("bench", failed, args->json == "-", 1);
      return;
    }
    if (args->json == "-") {
      std::cout << json_text(to_json(*report, *args)) << "\n";
      return;
    }
    print_table(*report);
    if (args->explain) print_explain(*report, *args);
    if (!args->json.empty()) {
      if (Status s =
              write_output_file("--json", args->json, json_text(to_json(*report, *args)) + "\n");
          !s.ok()) {
        *exit_code = report_failure("bench", s, false, 1);
      }
    }
  });
}

}  // namespace

PQKV_REGISTER_COMMAND(bench, add_bench);

}  // namespace pqkv::tools
