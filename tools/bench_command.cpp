// `pqkv bench`: selection quality and stage timings of the decode step on the
// synthetic workload, one row per PQ setting (and Faiss's IndexPQ as a baseline).
#include <fmt/format.h>

#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "tools/bench_runner.h"
#include "tools/commands.h"

namespace pqkv::tools {
namespace {

struct BenchArgs {
  std::string model = "llama-3.1-8b";
  int layers = 2;
  int64_t context = 32768;
  int steps = 16;
  double budget = 0.1;
  std::string sink = "32";
  std::string window;
  std::string top_k;
  bool fixed_at_prefill = false;
  std::vector<std::string> pq = {"default"};
  std::string aggregation = "softmax-sum";
  std::string backend = "cpu";
  uint64_t seed = 1;
  bool compare_faiss = false;
  bool no_quality = false;
  std::string json;
  int threads = 0;
};

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
  if (!(a.budget > 0 && a.budget <= 1)) {  // NaN fails both comparisons
    return Status::invalid_argument("--budget must be a number in (0, 1]");
  }
  c.budget = BudgetPolicy::ratio_of_context(a.budget);
  PQKV_ASSIGN_OR_RETURN(c.budget.sink, TokenCount::parse(a.sink));
  if (!a.window.empty()) {
    PQKV_ASSIGN_OR_RETURN(c.budget.window, TokenCount::parse(a.window));
  }
  if (!a.top_k.empty()) {
    PQKV_ASSIGN_OR_RETURN(c.budget.top_k, TokenCount::parse(a.top_k));
  }
  c.budget.fixed_at_prefill = a.fixed_at_prefill;
  for (const auto& p : a.pq) {
    PQKV_ASSIGN_OR_RETURN(PqConfig pq, PqConfig::parse(p));
    PQKV_RETURN_IF_ERROR(pq.validate(c.spec.head_dim));
    c.pq.push_back(pq);
  }
  PQKV_ASSIGN_OR_RETURN(c.aggregation, parse_gqa_aggregation(a.aggregation));
  PQKV_ASSIGN_OR_RETURN(c.device, parse_device(a.backend));
  c.seed = a.seed;
  c.compare_faiss = a.compare_faiss;
  c.quality = !a.no_quality;
  c.num_threads = a.threads;
  return c;
}

void print_table(const BenchReport& r) {
  const BenchConfig& c = r.config;
  fmt::print(
      "pqkv bench: {} ({} of {} layers measured), context {} tokens, {} decode steps, "
      "budget {}, {} aggregation, backend {}\n",
      c.spec.name, c.spec.num_layers, ModelSpec::preset(c.spec.name)->num_layers, c.context,
      c.steps, c.budget.to_string(), gqa_aggregation_name(c.aggregation), c.device.to_string());
  fmt::print("{:<26} {:>5} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
             "selection", "B/tok", "build ms", "recall", "min", "out err", "needles", "score us",
             "topk us", "gather us", "attn us", "step us");
  for (const BenchRow& row : r.rows) {
    const std::string needles =
        row.needle_steps > 0 ? fmt::format("{:.0f}/{}", row.needle_hits, row.needle_steps) : "-";
    const auto quality = [&](double v) { return c.quality ? fmt::format("{:.4f}", v) : "-"; };
    fmt::print(
        "{:<26} {:>5} {:>9.1f} {:>7} {:>7} {:>8} {:>8} {:>9.1f} {:>9.1f} {:>9.1f} "
        "{:>9.1f} {:>9.1f}\n",
        row.name, row.code_bytes_per_token, row.build_ms, quality(row.recall_mean),
        quality(row.recall_min), quality(row.output_error_mean), needles, row.score_us, row.topk_us,
        row.gather_us, row.attention_us, row.attend_us);
  }
  fmt::print(
      "recall: exact softmax mass attended / mass the oracle (same sink and window, exact "
      "top-K) attends, mean over steps and layers; needles: KV heads that attended the "
      "needle, summed over needle queries / needle (step, layer) pairs; times per (step, "
      "layer).\n");
}

nlohmann::json to_json(const BenchReport& r) {
  const BenchConfig& c = r.config;
  nlohmann::json j;
  j["model"] = c.spec.name;
  j["layers"] = c.spec.num_layers;
  j["context"] = c.context;
  j["steps"] = c.steps;
  j["budget"] = c.budget.to_string();
  j["aggregation"] = gqa_aggregation_name(c.aggregation);
  j["backend"] = c.device.to_string();
  j["seed"] = c.seed;
  for (const BenchRow& row : r.rows) {
    j["rows"].push_back({{"selection", row.name},
                         {"code_bytes_per_token", row.code_bytes_per_token},
                         {"prefill_ms", row.prefill_ms},
                         {"build_ms", row.build_ms},
                         {"recall_mean", row.recall_mean},
                         {"recall_min", row.recall_min},
                         {"output_error_mean", row.output_error_mean},
                         {"output_error_max", row.output_error_max},
                         {"needle_steps", row.needle_steps},
                         {"needle_hits", row.needle_hits},
                         {"attended_per_head", row.attended_per_head},
                         {"score_us", row.score_us},
                         {"topk_us", row.topk_us},
                         {"gather_us", row.gather_us},
                         {"attention_us", row.attention_us},
                         {"attend_us", row.attend_us}});
  }
  return j;
}

void add_bench(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Measure selection quality and decode-step time on the synthetic workload.\n"
      "Prefills a sequence with keys and values that have real LLM structure (RoPE, outlier "
      "channels, sinks, recency, planted needles), decodes a few steps through Sequence::attend, "
      "and compares each step with exact attention. The default run (Llama-3.1-8B geometry, 32K "
      "tokens, 10% budget, 2 layers, 16 steps, CPU) takes about a minute.");
  cmd->add_option("--model", args->model,
                  "model geometry preset: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha")
      ->capture_default_str();
  cmd->add_option("--layers", args->layers, "layers to measure (the first N of the preset)")
      ->capture_default_str();
  cmd->add_option("--context", args->context, "prompt length in tokens")->capture_default_str();
  cmd->add_option("--steps", args->steps, "decode steps")->capture_default_str();
  cmd->add_option("--budget", args->budget,
                  "fraction of the context attended besides the sink, split evenly between the "
                  "recent window and the top-K")
      ->capture_default_str();
  cmd->add_option("--sink", args->sink, "sink tokens: N, a ratio (0.01 or 1%), or N+ratio")
      ->capture_default_str();
  cmd->add_option("--window", args->window, "recent window, overriding --budget's half");
  cmd->add_option("--top-k", args->top_k, "top-K tokens, overriding --budget's half");
  cmd->add_flag("--fixed-at-prefill", args->fixed_at_prefill,
                "PQCache's rule: window and top-K fixed from the prompt length");
  cmd->add_option("--pq", args->pq,
                  "PQ setting, repeatable for a comparison in one run: default, pqcache, or "
                  "m=M,b=B")
      ->capture_default_str();
  cmd->add_option("--aggregation", args->aggregation, "GQA aggregation: softmax-sum or max")
      ->capture_default_str();
  cmd->add_option("--backend", args->backend, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--seed", args->seed, "workload seed")->capture_default_str();
  cmd->add_flag("--compare-faiss", args->compare_faiss,
                "also run Faiss's IndexPQ search over the same codes as a baseline");
  cmd->add_flag("--no-quality", args->no_quality,
                "skip the comparison with exact attention and measure times only (long contexts, "
                "all layers)");
  cmd->add_option("--json", args->json,
                  "also write the results as JSON to this file ('-' = stdout)");
  cmd->add_option("--threads", args->threads, "CPU threads (0 = all cores)")->capture_default_str();
  cmd->callback([args, exit_code] {
    auto config = to_config(*args);
    if (!config.ok()) {
      std::cerr << "pqkv bench: " << config.status().to_string() << "\n";
      *exit_code = 2;
      return;
    }
    auto report = run_bench(*config, /*progress=*/true);
    if (!report.ok()) {
      std::cerr << "pqkv bench: " << report.status().to_string() << "\n";
      *exit_code = 1;
      return;
    }
    if (args->json == "-") {
      std::cout << to_json(*report).dump(2) << "\n";
      return;
    }
    print_table(*report);
    if (!args->json.empty()) {
      std::ofstream f(args->json);
      f << to_json(*report).dump(2) << "\n";
      if (!f) {
        std::cerr << "pqkv bench: cannot write " << args->json << "\n";
        *exit_code = 1;
      }
    }
  });
}

}  // namespace

PQKV_REGISTER_COMMAND(bench, add_bench);

}  // namespace pqkv::tools
