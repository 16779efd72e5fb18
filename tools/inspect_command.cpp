// `pqkv inspect DIR`: the sequences saved in a store directory, their
// geometry, tokens, codes per layer and bytes on disk; --verify reads every
// page and checks every checksum; --recall measures each saved index's
// selection against exact scores (index_recall.h); --json for scripts.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"
#include "tools/index_recall.h"
#include "tools/progress.h"
#include "tools/store_directory.h"

namespace pqkv::tools {
namespace {

struct InspectArgs {
  std::string dir;
  bool verify = false;
  bool json = false;
  std::string sequence;  // empty: every sequence
  bool recall = false;
  RecallOptions recall_options;
  // Whether a recall option was given (they need --recall).
  bool recall_option_given = false;
};

nlohmann::json recall_json(const SequenceRecall& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerRecall& l : r.layers) {
    nlohmann::json heads = nlohmann::json::array();
    for (size_t h = 0; h < l.heads.size(); ++h)
      heads.push_back({{"head", h}, {"mean", l.heads[h].mean}, {"min", l.heads[h].min}});
    layers.push_back({{"layer", l.layer},
                      {"tokens", l.tokens},
                      {"k", l.k},
                      {"mean", l.mean},
                      {"min", l.min},
                      {"heads", heads}});
  }
  return {{"selection", r.selection}, {"queries", r.queries}, {"seed", r.seed},
          {"perturb", r.perturb},     {"mean", r.mean},       {"min", r.min},
          {"layers", layers}};
}

void print_recall(const SequenceRecall& r) {
  fmt::print(
      "  recall@K of {} against exact scores ({} queries per KV head, seed {}, perturb {}): "
      "mean {:.4f}, min {:.4f}\n",
      r.selection, r.queries, r.seed, r.perturb, r.mean, r.min);
  for (const LayerRecall& l : r.layers) {
    size_t worst = 0;
    for (size_t h = 1; h < l.heads.size(); ++h) {
      if (l.heads[h].mean < l.heads[worst].mean) worst = h;
    }
    fmt::print(
        "    layer {}: K {} of {} tokens, mean {:.4f}, min {:.4f} (worst head {}: mean {:.4f})\n",
        l.layer, l.k, l.tokens, l.mean, l.min, worst, l.heads[worst].mean);
  }
}

// What the sequence's stored bytes are checked against: the rows' pages
// always; the catalog values from the format that seals them on.
nlohmann::json checksums_json(const engine::SavedSequenceInfo& info) {
  return {{"rows", "xxh3-64 per 4 KiB page"},
          {"catalog", info.checksummed ? "crc32c per value"
                                       : "none (saved by an older pqkv: save it again to add "
                                         "them)"}};
}

// Whether any layer of the saved sequence has an index (none when it was
// saved before finish_prefill): --recall has nothing to measure without one.
bool has_index(const engine::SavedSequenceInfo& info) {
  return std::any_of(info.layer_codes.begin(), info.layer_codes.end(),
                     [](const auto& stages) { return !stages.empty(); });
}

// The usage errors --recall's options can have before any work: exit 2.
Status check_args(const InspectArgs& args, const engine::SavedSequences& saved,
                  const std::vector<std::string>& names) {
  if (args.recall_option_given && !args.recall) {
    return Status::invalid_argument(
        "--queries, --seed, --top-k, --top-fraction and --perturb apply to --recall; add it");
  }
  if (!args.sequence.empty() &&
      std::find(names.begin(), names.end(), args.sequence) == names.end()) {
    return Status::not_found("no saved sequence named '" + args.sequence + "' in " + args.dir +
                             (names.empty()
                                  ? std::string(" (it has none)")
                                  : "; it has: " + fmt::format("{}", fmt::join(names, ", "))));
  }
  if (!args.recall) return ok_status();
  PQKV_RETURN_IF_ERROR(check_recall_options(args.recall_options));
  for (const std::string& name : names) {
    if (!args.sequence.empty() && name != args.sequence) continue;
    auto info = saved.info(name);
    if (!info.ok()) continue;  // reported with the sequence
    if (!args.sequence.empty() && !has_index(*info)) {
      return Status::failed_precondition(
          "sequence '" + name +
          "' was saved without an index (before finish_prefill): --recall has nothing to "
          "measure; inspect it without --recall");
    }
    for (size_t l = 0; l < info->lengths.size(); ++l) {
      if (info->layer_codes[l].empty()) continue;
      PQKV_RETURN_IF_ERROR(recall_k(*info, info->lengths[l], args.recall_options).status());
    }
  }
  return ok_status();
}

// "pq" when every layer uses it, else the codes of each layer; stages joined by '+'.
std::vector<std::string> layer_codes(const engine::SavedSequenceInfo& info) {
  std::vector<std::string> out;
  for (const auto& stages : info.layer_codes) {
    std::string s;
    for (KeyCode c : stages) {
      if (!s.empty()) s += '+';
      s += key_code_name(c);
    }
    out.push_back(s.empty() ? "none" : s);
  }
  return out;
}

int run_inspect(const InspectArgs& args) {
  if (Status dir = check_store_directory(args.dir); !dir.ok()) {
    return report_failure("inspect", dir, args.json, 2);
  }
  auto saved = engine::SavedSequences::open(args.dir, engine::SavedSequences::Access::kReadOnly);
  if (!saved.ok()) return report_failure("inspect", saved.status(), args.json, 1);
  const Result<std::vector<std::string>> listed = (*saved)->names();
  if (!listed.ok()) return report_failure("inspect", listed.status(), args.json, 1);
  const std::vector<std::string>& names = *listed;
  if (const Status s = check_args(args, **saved, names); !s.ok()) {
    return report_failure("inspect", s, args.json, 2);
  }
  nlohmann::json seqs = nlohmann::json::array();
  bool intact = true;
  std::string first_error;  // the first damaged sequence, for the one-line summary
  nlohmann::json catalog;   // with --verify: the catalog files' own checksums
  if (args.verify) {
    const Status s = (*saved)->verify_catalog();
    catalog["verified"] = s.ok();
    if (!s.ok()) {
      intact = false;
      catalog["error"] = s.to_string();
      first_error = "catalog: " + s.to_string();
    }
    if (!args.json) {
      fmt::print("catalog: {}\n", s.ok() ? "verified: every table file and block intact"
                                         : "verify FAILED: " + s.to_string());
    }
  }
  for (const std::string& name : names) {
    if (!args.sequence.empty() && name != args.sequence) continue;
    nlohmann::json j;
    j["name"] = name;
    auto info = (*saved)->info(name);
    if (!info.ok()) {
      intact = false;
      j["error"] = info.status().to_string();
      if (first_error.empty()) first_error = name + ": " + info.status().to_string();
      if (!args.json) fmt::print("{}: {}\n", name, info.status().to_string());
      seqs.push_back(j);
      continue;
    }
    const int64_t tokens = info->lengths.empty() ? 0 : info->lengths[0];
    j["tokens"] = tokens;
    j["tokens_per_layer"] = info->lengths;
    j["geometry"] = {{"model", info->spec.name},          {"layers", info->spec.num_layers},
                     {"q_heads", info->spec.num_q_heads}, {"kv_heads", info->spec.num_kv_heads},
                     {"head_dim", info->spec.head_dim},   {"dtype", dtype_name(info->spec.dtype)}};
    j["model_fingerprint"] = info->model_fingerprint;
    j["prefilled"] = info->prefilled;
    j["selection"] = info->options.selection.to_string();
    j["pq"] = info->options.pq.to_string();
    j["codes_per_layer"] = layer_codes(*info);
    j["segment_file"] = info->segment_file;
    j["segment_bytes"] = info->segment_bytes;
    j["code_bytes"] = info->code_bytes;
    j["checksums"] = checksums_json(*info);
    std::string verified;
    if (args.verify) {
      const Status s = (*saved)->verify(name);
      j["verified"] = s.ok();
      if (!s.ok()) {
        intact = false;
        j["error"] = s.to_string();
        if (first_error.empty()) first_error = name + ": " + s.to_string();
      }
      verified = s.ok() ? "  verified: every page and code chunk intact"
                        : "  verify FAILED: " + s.to_string();
    }
    std::optional<SequenceRecall> recall;
    std::string recall_error;
    // A sequence saved before finish_prefill has no selection to measure:
    // said in the listing, not reported as damage (it was, exit 1).
    const bool no_index = args.recall && !has_index(*info);
    if (no_index) j["recall"] = {{"skipped", "saved without an index (before finish_prefill)"}};
    if (args.recall && !no_index) {
      Progress bar("recall " + name, info->spec.num_layers);
      Result<SequenceRecall> r =
          sequence_recall(**saved, name, args.recall_options, [&](int, int) { bar.tick(); });
      bar.finish();
      if (r.ok()) {
        recall = std::move(*r);
        j["recall"] = recall_json(*recall);
      } else {
        intact = false;
        recall_error = r.status().to_string();
        j["recall"] = {{"error", recall_error}};
        if (first_error.empty()) first_error = name + ": " + recall_error;
      }
    }
    if (!args.json) {
      fmt::print("{}: {} tokens, {}, fingerprint '{}', {}\n", name, tokens, info->spec.to_string(),
                 info->model_fingerprint, info->prefilled ? "prefilled" : "not prefilled");
      // The PQ shape only where a stage uses PQ codes: an int4 store has none.
      const SelectionConfig& sel = info->options.selection;
      const bool uses_pq =
          sel.code == KeyCode::kPq || (sel.two_stage() && sel.rerank == KeyCode::kPq);
      fmt::print("  selection {}{}, codes per layer: {}\n", sel.to_string(),
                 uses_pq ? " (" + info->options.pq.to_string() + ")" : std::string(),
                 fmt::join(layer_codes(*info), ", "));
      fmt::print("  on disk: {} ({} B of rows), {} B of codes in the catalog\n", info->segment_file,
                 info->segment_bytes, info->code_bytes);
      if (!info->checksummed) {
        fmt::print("  checksums: rows only (saved by an older pqkv: save it again to add them)\n");
      }
      if (!verified.empty()) fmt::print("{}\n", verified);
      if (recall) print_recall(*recall);
      if (!recall_error.empty()) fmt::print("  recall FAILED: {}\n", recall_error);
      if (no_index) fmt::print("  recall: none, saved without an index (before finish_prefill)\n");
    }
    seqs.push_back(j);
  }
  if (args.json) {
    nlohmann::json out{{"directory", args.dir}, {"sequences", seqs}};
    if (args.verify) out["catalog"] = catalog;
    fmt::print("{}\n", json_text(out));
  } else if (seqs.empty()) {
    fmt::print("no saved sequences in {}\n", args.dir);
  }
  if (intact) return 0;
  // The details are in the listing; stderr gets one line either way.
  fmt::print(stderr, "pqkv inspect: {} is damaged ({}); restore it from a backup or drop it\n",
             args.dir, first_error);
  return 1;
}

void add_inspect_command(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "List the sequences saved in a store directory (Store::save): per sequence its "
      "tokens, geometry, model fingerprint, key code of each layer, and bytes on disk. "
      "Reads only: nothing in DIR is written, and a store that another process has open "
      "can be inspected (as it was when inspect opened it).");
  cmd->add_option("DIR", args->dir, "The store directory (StoreOptions::directory)")->required();
  cmd->add_flag("--verify", args->verify,
                "Read every page of every segment file and check its checksum, every code "
                "chunk and its CRC-32C, and every block of the catalog's files; exit 1 naming "
                "what is damaged");
  cmd->add_flag("--json", args->json,
                "Print JSON: {\"directory\", \"sequences\": [{\"name\", \"tokens\", ...}]}");
  cmd->add_option("--sequence", args->sequence, "Only this saved sequence (default: every one)")
      ->check(non_empty());
  cmd->add_flag("--recall", args->recall,
                "Recompute each saved index's selection recall against exact scores: per layer, "
                "reopen the index on the CPU from its saved codes (no training), draw queries "
                "(stored keys of random positions plus noise, one query per KV head), and count "
                "how many of the index's top-K are in the exact top-K of dot products over the "
                "stored keys; prints recall@K mean and min per layer (worst KV head too) and, in "
                "--json, per (layer, KV head) under \"recall\"");
  const auto recall_opt = [&](CLI::Option* o) {
    o->each([a = args.get()](const std::string&) { a->recall_option_given = true; });
  };
  recall_opt(cmd->add_option("--queries", args->recall_options.queries,
                             "--recall: queries per (layer, KV head), 1..100000")
                 ->capture_default_str()
                 ->check(fits_int()));
  recall_opt(cmd->add_option("--seed", args->recall_options.seed,
                             "--recall: seed of the query positions and noise (printed)")
                 ->capture_default_str()
                 ->check(whole_number(false)));
  // Set only when given: 0 is a value to refuse, not "unset".
  recall_opt(cmd->add_option_function<int64_t>(
                    "--top-k", [a = args.get()](const int64_t& k) { a->recall_options.top_k = k; },
                    "--recall: tokens selected per KV head, at most the tokens stored "
                    "(default: the sequence's own top-K budget at its length)")
                 ->check(whole_number(true)));
  recall_opt(cmd->add_option_function<double>(
      "--top-fraction", [a = args.get()](const double& f) { a->recall_options.top_fraction = f; },
      "--recall: K as a fraction of the tokens, in (0, 1] (instead of --top-k)"));
  recall_opt(cmd->add_option("--perturb", args->recall_options.perturb,
                             "--recall: noise added to each sampled key, as a standard deviation "
                             "relative to that key's RMS")
                 ->capture_default_str());
  cmd->footer(
      "Exit status: 0 when every sequence was read (and, with --verify, is intact; with --recall, "
      "measured, or skipped when saved without an index), 1 when something is damaged or "
      "unreadable, 2 for a usage error (DIR is not a store, an unknown --sequence, --recall of a "
      "--sequence saved without an index, a bad --recall option such as --top-k past the tokens "
      "or --queries 0).");
  cmd->callback([args, exit_code] { *exit_code = run_inspect(*args); });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(inspect, pqkv::tools::add_inspect_command);
