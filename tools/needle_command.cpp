// `pqkv needle`: needle-in-a-haystack retrieval with exact attention and with
// pqkv's budgeted attention, side by side.
#include <fmt/format.h>
#include <tbb/global_control.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "model/generator.h"
#include "model/needle.h"
#include "model/session.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"
#include "tools/model_flags.h"
#include "tools/progress.h"

namespace pqkv::tools {
namespace {

struct NeedleArgs {
  std::string model;
  ModelFlags run;  // store, budget, backends, threads
  std::string haystack;
  std::vector<int64_t> lengths = {1024, 2048, 4096};
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  int max_new = 12;
  int trials = 1;
  uint64_t seed = 0;
  std::string plot;
  std::string json;  // --json FILE: the grids and recalls for scripts
};

struct CellRun {
  std::string answer;
  bool correct = false;
  std::vector<double> recall;
};

Result<CellRun> run_cell(model::ModelSession& s, model::AttentionPath path,
                         const SequenceOptions& seq_opts, const model::NeedlePrompt& prompt,
                         const model::NeedleCase& c, const NeedleArgs& args) {
  const std::string name = "needle";
  PQKV_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> handle, s.store->create_sequence(name, seq_opts));
  Sequence* seq = handle.get();
  model::GenerateOptions opts;
  opts.max_new_tokens = args.max_new;
  opts.prefill_chunk = args.run.prefill_chunk;
  // Every answer token then comes out of decode attention, also the first.
  opts.decode_last_prompt_token = true;
  opts.measure_recall = path == model::AttentionPath::kStoreSparse;
  opts.on_index_build = build_progress_line(!args.run.quiet);
  model::Generator gen(*s.model, *s.backend);
  auto r = gen.generate(prompt.ids, path, {seq, s.store_device}, opts);
  PQKV_RETURN_IF_ERROR(s.store->drop(name));
  if (!r.ok()) return r.status();
  CellRun run;
  int32_t previous = prompt.ids.back();
  for (int32_t t : r->tokens) {
    run.answer += s.model->tokenizer()->decode(t, previous);
    previous = t;
  }
  run.correct = model::needle_answer_correct(run.answer, c);
  run.recall = std::move(r->layer_recall);
  return run;
}

// An answer on one progress line: line breaks and tabs as spaces, other
// control bytes and invalid UTF-8 escaped.
std::string printable(std::string text) {
  for (char& ch : text) {
    if (ch == '\n' || ch == '\r' || ch == '\t') ch = ' ';
  }
  TerminalText escaper;
  return escaper.feed(text) + escaper.finish();
}

// On failure *failure_code says whose it was: 2 while the flags and inputs
// are checked (before any work), 1 once the run has started.
Status run_needle(const NeedleArgs& a, int* failure_code) {
  *failure_code = 2;
  using Clock = std::chrono::steady_clock;
  std::optional<tbb::global_control> threads;
  if (a.run.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism,
                    static_cast<size_t>(a.run.threads));
  }
  model::SessionOptions so;
  so.model_dir = a.model;
  SequenceOptions seq_opts;
  PQKV_RETURN_IF_ERROR(resolve_model_flags(a.run, &so, &seq_opts));
  for (double d : a.depths) {
    if (!(d >= 0 && d <= 1)) {
      return Status::invalid_argument(
          fmt::format("--depths: {} is not a depth; give numbers within 0..1 (0 = start of the "
                      "haystack, 1 = its end)",
                      d));
    }
  }
  PQKV_RETURN_IF_ERROR(check_input_file("--haystack", a.haystack));
  if (!a.plot.empty()) PQKV_RETURN_IF_ERROR(check_output_path("--plot", a.plot, false));
  if (!a.json.empty()) PQKV_RETURN_IF_ERROR(check_output_path("--json", a.json, false));
  PQKV_RETURN_IF_ERROR(check_outputs_apart({{"--plot", a.plot}, {"--json", a.json}},
                                           {{"--model", a.model}, {"--haystack", a.haystack}}));
  std::ifstream in(a.haystack, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string haystack = buf.str();

  *failure_code = 1;
  PQKV_ASSIGN_OR_RETURN(model::ModelSession session, model::open_model_session(so));
  const model::LlamaConfig& cfg = session.model->config();
  // Flags the model cannot take are usage errors.
  *failure_code = 2;
  PQKV_RETURN_IF_ERROR(seq_opts.validate(cfg.kv_spec(so.kv_dtype)));
  if (session.model->tokenizer() == nullptr) {
    return model::no_tokenizer_error(a.model, session.model->tokenizer_passed_over(),
                                     "pqkv needle builds its prompts from text and needs one");
  }
  // The longest prompt's keys and values, held at once in the runtime's fp32
  // cache for the exact run (pqkv's store holds another copy).
  const int64_t longest = *std::max_element(a.lengths.begin(), a.lengths.end());
  PQKV_RETURN_IF_ERROR(check_fits_in_memory(
      static_cast<double>(longest) * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 *
          sizeof(float),
      fmt::format("--lengths {}: one prompt's keys and values", longest), "--lengths"));
  for (int64_t len : a.lengths) {
    if (cfg.max_position_embeddings > 0 && len > cfg.max_position_embeddings) {
      fmt::print(stderr,
                 "warning: length {} exceeds the model's max_position_embeddings ({}); "
                 "retrieval past it measures the model's extrapolation too\n",
                 len, cfg.max_position_embeddings);
    }
    if (cfg.sliding_window > 0 && len > cfg.sliding_window) {
      fmt::print(stderr,
                 "warning: length {} exceeds the model's sliding_window ({}); pqkv attends over "
                 "the whole context, so past it attention differs from the model's\n",
                 len, cfg.sliding_window);
    }
  }

  const size_t nl = a.lengths.size();
  const size_t nd = a.depths.size();
  const auto case_of = [&](size_t li, size_t di, int trial) {
    const uint64_t seed = a.seed * 1000003ULL + (li * nd + di) * 7919ULL + trial;
    return model::make_needle_case(a.lengths[li], a.depths[di], seed);
  };
  // Every cell's shortest prompt before the first runs: a length too short
  // for one of its needles is a usage error, not a failure after hours.
  for (size_t li = 0; li < nl; ++li) {
    int64_t needs = 0;
    for (size_t di = 0; di < nd; ++di) {
      for (int trial = 0; trial < a.trials; ++trial) {
        PQKV_ASSIGN_OR_RETURN(const int64_t bare, model::needle_prompt_min_length(
                                                      *session.model->tokenizer(), cfg.bos_token_id,
                                                      haystack, case_of(li, di, trial)));
        needs = std::max(needs, bare);
      }
    }
    if (a.lengths[li] < needs) {
      return Status::invalid_argument(fmt::format(
          "--lengths {}: this run's needle prompts (--seed, --depths and --trials choose their "
          "words) need at least {} tokens with this tokenizer; give lengths of {} or more",
          a.lengths[li], needs, needs));
    }
  }
  *failure_code = 1;
  std::vector<std::vector<int>> exact_ok(nd, std::vector<int>(nl, 0));
  std::vector<std::vector<int>> pqkv_ok(nd, std::vector<int>(nl, 0));
  std::vector<std::vector<double>> recall(nl, std::vector<double>(cfg.num_layers, 0.0));
  const int total = static_cast<int>(nl * nd) * a.trials;
  int done = 0;
  const std::string label = fmt::format("pqkv ({}, {})", seq_opts.budget.to_string(),
                                        selection_description(seq_opts, cfg.head_dim));
  for (size_t li = 0; li < nl; ++li) {
    for (size_t di = 0; di < nd; ++di) {
      for (int trial = 0; trial < a.trials; ++trial) {
        const auto t0 = Clock::now();
        const model::NeedleCase c = case_of(li, di, trial);
        PQKV_ASSIGN_OR_RETURN(
            model::NeedlePrompt prompt,
            model::build_needle_prompt(*session.model->tokenizer(), cfg.bos_token_id, haystack, c));
        PQKV_ASSIGN_OR_RETURN(CellRun exact, run_cell(session, model::AttentionPath::kStoreExact,
                                                      seq_opts, prompt, c, a));
        PQKV_ASSIGN_OR_RETURN(CellRun sparse, run_cell(session, model::AttentionPath::kStoreSparse,
                                                       seq_opts, prompt, c, a));
        exact_ok[di][li] += exact.correct;
        pqkv_ok[di][li] += sparse.correct;
        for (int l = 0; l < cfg.num_layers; ++l)
          recall[li][l] += sparse.recall[l];
        ++done;
        if (!a.run.quiet) {
          fmt::print(stderr,
                     "[{}/{}] length {} ({} tokens) depth {:.2f} code {}: exact '{}' {}, pqkv "
                     "'{}' {} ({:.1f} s)\n",
                     done, total, a.lengths[li], prompt.ids.size(), a.depths[di], c.code,
                     printable(exact.answer), exact.correct ? "ok" : "MISS",
                     printable(sparse.answer), sparse.correct ? "ok" : "MISS",
                     std::chrono::duration<double>(Clock::now() - t0).count());
        }
      }
    }
  }

  fmt::print("needle in a haystack: {} ({} trial(s) per cell)\n", a.model, a.trials);
  fmt::print("accuracy, exact | {}\n", label);
  fmt::print("{:<14}", "depth\\length");
  for (int64_t len : a.lengths)
    fmt::print("{:>15}", len);
  fmt::print("\n");
  int exact_total = 0;
  int pqkv_total = 0;
  for (size_t di = 0; di < nd; ++di) {
    fmt::print("{:<14.2f}", a.depths[di]);
    for (size_t li = 0; li < nl; ++li) {
      fmt::print("{:>15}", fmt::format("{:.0f}% | {:.0f}%", 100.0 * exact_ok[di][li] / a.trials,
                                       100.0 * pqkv_ok[di][li] / a.trials));
      exact_total += exact_ok[di][li];
      pqkv_total += pqkv_ok[di][li];
    }
    fmt::print("\n");
  }
  fmt::print("overall: exact {}/{}, pqkv {}/{}\n\n", exact_total, total, pqkv_total, total);
  fmt::print(
      "pqkv attention recall at the answer position (exact attention mass on the "
      "attended tokens), mean over depths and trials\n");
  fmt::print("{:<14}", "layer\\length");
  for (int64_t len : a.lengths)
    fmt::print("{:>10}", len);
  fmt::print("\n");
  for (int l = 0; l < cfg.num_layers; ++l) {
    fmt::print("{:<14}", l);
    for (size_t li = 0; li < nl; ++li) {
      fmt::print("{:>10.4f}", recall[li][l] / static_cast<double>(nd * a.trials));
    }
    fmt::print("\n");
  }

  if (!a.plot.empty()) {
    model::NeedleGrid grid;
    grid.lengths = a.lengths;
    grid.depths = a.depths;
    std::filesystem::path model_dir(a.model);
    if (model_dir.filename().empty()) model_dir = model_dir.parent_path();  // "dir/"
    grid.title = "needle in a haystack: " + model_dir.filename().string();
    grid.pqkv_label = label;
    for (size_t di = 0; di < nd; ++di) {
      grid.exact.emplace_back();
      grid.pqkv.emplace_back();
      for (size_t li = 0; li < nl; ++li) {
        grid.exact.back().push_back(double(exact_ok[di][li]) / a.trials);
        grid.pqkv.back().push_back(double(pqkv_ok[di][li]) / a.trials);
      }
    }
    PQKV_RETURN_IF_ERROR(write_output_file("--plot", a.plot, model::needle_grid_svg(grid)));
    fmt::print("\nwrote {}\n", a.plot);
  }
  if (!a.json.empty()) {
    // The tables above as numbers: accuracy [depth][length] as fractions of
    // --trials, recall [length][layer] as means over depths and trials.
    nlohmann::json exact_acc, pqkv_acc, recall_mean;
    for (size_t di = 0; di < nd; ++di) {
      exact_acc.emplace_back();
      pqkv_acc.emplace_back();
      for (size_t li = 0; li < nl; ++li) {
        exact_acc.back().push_back(double(exact_ok[di][li]) / a.trials);
        pqkv_acc.back().push_back(double(pqkv_ok[di][li]) / a.trials);
      }
    }
    for (size_t li = 0; li < nl; ++li) {
      recall_mean.emplace_back();
      for (int l = 0; l < cfg.num_layers; ++l)
        recall_mean.back().push_back(recall[li][l] / static_cast<double>(nd * a.trials));
    }
    const nlohmann::json j = {{"model", a.model},           {"attention", label},
                              {"lengths", a.lengths},       {"depths", a.depths},
                              {"trials", a.trials},         {"exact_accuracy", exact_acc},
                              {"pqkv_accuracy", pqkv_acc},  {"exact_correct", exact_total},
                              {"pqkv_correct", pqkv_total}, {"cells", total},
                              {"layer_recall", recall_mean}};
    PQKV_RETURN_IF_ERROR(write_output_file("--json", a.json, json_text(j) + "\n"));
  }
  return ok_status();
}

void add_needle_command(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<NeedleArgs>();
  CLI::App* cmd = app.add_subcommand(
      "needle",
      "Needle in a haystack: plants \"The secret code for WORD is NNNNNN.\" at a sentence "
      "boundary at each depth of a haystack text, asks for the code at the end, and "
      "generates the answer with exact attention and with pqkv's budget. Prints both "
      "accuracy grids side by side and pqkv's per-layer attention recall at the answer "
      "position. The last prompt token runs as a decode step, so every answer token comes "
      "out of decode attention.");
  cmd->add_option("--model", args->model, kModelFolderHelp)
      ->required()
      ->check(CLI::ExistingDirectory);
  add_model_flags(cmd, &args->run);
  cmd->add_option("--haystack", args->haystack,
                  "Plain text to hide the needle in (repeated when short)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--lengths", args->lengths,
                  "Prompt lengths in tokens, comma-separated; each prompt has exactly this "
                  "many tokens, BOS and question included")
      ->delimiter(',')
      ->capture_default_str()
      ->check(finite_at_least(1));
  cmd->add_option(
         "--depths", args->depths,
         "Needle depths within 0..1, comma-separated: 0 = start of the haystack, 1 = its end")
      ->delimiter(',')
      ->capture_default_str()
      ->check(finite_at_least(0));
  cmd->add_option("--max-new", args->max_new, "Answer tokens to generate")
      ->capture_default_str()
      ->check(finite_at_least(1))
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--trials", args->trials, "Needles (word and code) per grid cell")
      ->capture_default_str()
      ->check(finite_at_least(1))
      ->check(whole_in(1, 1000));
  cmd->add_option("--seed", args->seed, "Seed of the words and codes")
      ->capture_default_str()
      ->check(whole_number(false));
  cmd->add_option("--plot", args->plot,
                  "Also write the two accuracy grids to this SVG file (checked before the run)")
      ->check(non_empty());
  cmd->add_option("--json", args->json,
                  "Also write the results as JSON to this file (checked before the run): "
                  "exact_accuracy and pqkv_accuracy [depth][length] (fractions of --trials), "
                  "exact_correct, pqkv_correct and cells (counts), layer_recall [length][layer], "
                  "with model, lengths, depths, trials and attention (the settings)")
      ->check(non_empty());
  cmd->footer(
      "Exit status: 0 when every cell ran (whatever the accuracy), 1 when the run failed, 2 for "
      "a usage error.");
  cmd->callback([args, exit_code] {
    int failure_code = 1;
    const Status s = run_needle(*args, &failure_code);
    if (!s.ok()) {
      fmt::print(stderr, "pqkv needle: {}\n", s.to_string());
      *exit_code = failure_code;
    }
  });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(needle, pqkv::tools::add_needle_command);
