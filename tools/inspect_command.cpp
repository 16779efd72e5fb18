// `pqkv inspect DIR`: the sequences saved in a store directory, their
// geometry, tokens, codes per layer and bytes on disk; --verify reads every
// page and checks every checksum; --json for scripts.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"

namespace pqkv::tools {
namespace {

struct InspectArgs {
  std::string dir;
  bool verify = false;
  bool json = false;
};

// "pq" when every layer uses it, else the codes of each layer; stages joined by '+'.
std::vector<std::string> layer_codes(const engine::SavedSequenceInfo& info) {
  std::vector<std::string> out;
  for (const auto& stages : info.layer_codes) {
    std::string s;
    for (KeyCode c : stages)
      s += (s.empty() ? "" : "+") + std::string(key_code_name(c));
    out.push_back(s.empty() ? "none" : s);
  }
  return out;
}

int run_inspect(const InspectArgs& args) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(args.dir + "/catalog", ec)) {
    return report_failure(
        "inspect",
        Status::invalid_argument(args.dir + " is not a pqkv store directory (no catalog "
                                            "in it): give the directory a store saved into"),
        args.json, 2);
  }
  auto saved = engine::SavedSequences::open(args.dir, /*remove_orphans=*/false);
  if (!saved.ok()) return report_failure("inspect", saved.status(), args.json, 1);
  nlohmann::json seqs = nlohmann::json::array();
  bool intact = true;
  std::string first_error;  // the first damaged sequence, for the one-line summary
  for (const std::string& name : (*saved)->names()) {
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
    if (!args.json) {
      fmt::print("{}: {} tokens, {}, fingerprint '{}', {}\n", name, tokens, info->spec.to_string(),
                 info->model_fingerprint, info->prefilled ? "prefilled" : "not prefilled");
      fmt::print("  selection {} ({}), codes per layer: {}\n", info->options.selection.to_string(),
                 info->options.pq.to_string(), fmt::join(layer_codes(*info), ", "));
      fmt::print("  on disk: {} ({} B of rows), {} B of codes in the catalog\n", info->segment_file,
                 info->segment_bytes, info->code_bytes);
      if (!verified.empty()) fmt::print("{}\n", verified);
    }
    seqs.push_back(j);
  }
  if (args.json) {
    fmt::print("{}\n", json_text(nlohmann::json{{"directory", args.dir}, {"sequences", seqs}}));
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
      "Reads only; a store that another process has open cannot be inspected (RocksDB "
      "locks it).");
  cmd->add_option("DIR", args->dir, "The store directory (StoreOptions::directory)")->required();
  cmd->add_flag("--verify", args->verify,
                "Read every page of every segment file and check its checksum, and every code "
                "chunk; exit 1 naming what is damaged");
  cmd->add_flag("--json", args->json,
                "Print JSON: {\"directory\", \"sequences\": [{\"name\", \"tokens\", ...}]}");
  cmd->footer(
      "Exit status: 0 when every sequence was read (and, with --verify, is intact), 1 when "
      "something is damaged or unreadable, 2 for a usage error (DIR is not a store).");
  cmd->callback([args, exit_code] { *exit_code = run_inspect(*args); });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(inspect, pqkv::tools::add_inspect_command);
