// `pqkv export-faiss DIR --sequence NAME --layer L --head H --out FILE`: one
// saved (layer, KV head)'s codes as a Faiss index file that faiss::read_index
// loads and searches (inner product) with pqkv's scores of the same codes.
#include <faiss/impl/FaissException.h>
#include <faiss/index_io.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/saved_sequences.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"
#include "tools/faiss_export.h"
#include "tools/store_directory.h"

namespace pqkv::tools {
namespace {

struct ExportArgs {
  std::string dir;
  std::string sequence;
  int layer = -1;
  int head = -1;
  std::string out;
  bool rerank = false;
  bool json = false;
};

// Writes to FILE.tmp, then renames it over FILE: a failed export leaves no
// half-written index under the requested name.
Status write_index_file(const faiss::Index& index, const std::string& path) {
  const std::string tmp = path + ".tmp";
  try {
    faiss::write_index(&index, tmp.c_str());
  } catch (const faiss::FaissException& e) {
    std::remove(tmp.c_str());
    return Status::io_error("cannot write " + path + ": " + e.what());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return Status::io_error("cannot write " + path + ": " + ec.message());
  }
  return ok_status();
}

int run_export(const ExportArgs& args) {
  const auto fail = [&](int code, const Status& status) {
    return report_failure("export-faiss", status, args.json, code);
  };
  // The output path first: a run that cannot write its file reads nothing.
  // The file is replaced whole (write_index_file): a device or pipe there
  // would be replaced by a regular file (as root, /dev/null was).
  if (Status out = check_not_special("--out", args.out); !out.ok()) return fail(2, out);
  if (Status out = check_output_path("--out", args.out, /*allow_stdout=*/false); !out.ok()) {
    return fail(2, out);
  }
  if (Status dir = check_store_directory(args.dir); !dir.ok()) return fail(2, dir);
  if (Status apart = check_outputs_apart({{"--out", args.out}}, {{"DIR", args.dir}}); !apart.ok()) {
    return fail(2, apart);
  }
  auto saved = engine::SavedSequences::open(args.dir, engine::SavedSequences::Access::kReadOnly);
  if (!saved.ok()) return fail(1, saved.status());
  auto info = (*saved)->info(args.sequence);
  if (!info.ok()) {
    if (info.status().code() != StatusCode::kNotFound) return fail(1, info.status());
    const Result<std::vector<std::string>> listed = (*saved)->names();
    if (!listed.ok()) return fail(1, listed.status());
    const std::vector<std::string>& names = *listed;
    return fail(2, Status::not_found(
                       "no saved sequence named '" + args.sequence + "' in " + args.dir +
                       (names.empty() ? std::string(" (it holds none)")
                                      : fmt::format(" (it holds: {})", fmt::join(names, ", ")))));
  }
  const ModelSpec& spec = info->spec;
  if (args.layer < 0 || args.layer >= spec.num_layers) {
    return fail(2, Status::out_of_range(
                       fmt::format("--layer {} is out of range: sequence '{}' has layers 0..{}",
                                   args.layer, args.sequence, spec.num_layers - 1)));
  }
  if (args.head < 0 || args.head >= spec.num_kv_heads) {
    return fail(2, Status::out_of_range(
                       fmt::format("--head {} is out of range: sequence '{}' has KV heads 0..{} "
                                   "(--head counts KV heads, not query heads)",
                                   args.head, args.sequence, spec.num_kv_heads - 1)));
  }
  const auto& stages = info->layer_codes[static_cast<size_t>(args.layer)];
  if (stages.empty()) {
    return fail(1, Status::failed_precondition(
                       fmt::format("layer {} of sequence '{}' has no index: it was saved before "
                                   "finish_prefill trained one",
                                   args.layer, args.sequence)));
  }
  const size_t stage = args.rerank ? 1 : 0;
  if (stage >= stages.size()) {
    return fail(2, Status::invalid_argument(fmt::format(
                       "--rerank: layer {} of sequence '{}' scores with one stage ({}); leave "
                       "--rerank out",
                       args.layer, args.sequence, key_code_name(stages[0]))));
  }
  auto snapshot = (*saved)->read_index(args.sequence, args.layer);
  if (!snapshot.ok()) return fail(1, snapshot.status());
  auto index = faiss_index_of_codes(snapshot->stages[stage], snapshot->num_tokens, spec.head_dim,
                                    args.head, info->options.pq);
  if (!index.ok()) return fail(1, index.status());
  const Status written = write_index_file(**index, args.out);
  if (!written.ok()) return fail(1, written);

  const std::string what = describe_faiss_index(**index);
  if (args.json) {
    fmt::print("{}\n", json_text(nlohmann::json{{"file", args.out},
                                                {"sequence", args.sequence},
                                                {"layer", args.layer},
                                                {"kv_head", args.head},
                                                {"code", key_code_name(stages[stage])},
                                                {"faiss_index", what},
                                                {"metric", "inner_product"},
                                                {"vectors", snapshot->num_tokens},
                                                {"dim", spec.head_dim}}));
  } else {
    fmt::print(
        "wrote {}: {}, {} vectors (sequence '{}', layer {}, KV head {}, {} codes), inner "
        "product\n",
        args.out, what, snapshot->num_tokens, args.sequence, args.layer, args.head,
        key_code_name(stages[stage]));
  }
  return 0;
}

void add_export_faiss_command(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* cmd = app.add_subcommand(
      "export-faiss",
      "Write the codes of one saved (sequence, layer, KV head) as a Faiss index file. "
      "Faiss's own read_index loads it, and its inner-product search scores every token as "
      "pqkv scores the same codes: PQ codes become an IndexPQ (pqkv's codebook as its "
      "centroids), int8 and int4 keys an IndexScalarQuantizer (QT_8bit / QT_4bit, its ranges "
      "set so that Faiss decodes each code to pqkv's value), exact keys an IndexFlatIP. "
      "Vector ids are token positions. Reads only: nothing in DIR is written, and a store "
      "that another process has open can be read (as it was when export-faiss opened it).");
  cmd->add_option("DIR", args->dir, "The store directory (StoreOptions::directory)")->required();
  cmd->add_option("--sequence", args->sequence, "Name of the saved sequence (see pqkv inspect)")
      ->required()
      ->check(non_empty());
  cmd->add_option("--layer", args->layer, "Layer, from 0")->required()->check(fits_int());
  cmd->add_option("--head", args->head, "KV head, from 0 (not a query head)")
      ->required()
      ->check(fits_int());
  cmd->add_option("--out", args->out, "The Faiss index file to write (replaced if it exists)")
      ->required();
  cmd->add_flag("--rerank", args->rerank,
                "Export the second (rerank) stage's codes of a two-stage selection instead of "
                "the first stage's");
  cmd->add_flag("--json", args->json,
                "Print what was written as JSON: {\"file\", \"faiss_index\", \"vectors\", ...}");
  cmd->footer(
      "Exit status: 0 when the file was written, 1 when the store could not be read or the "
      "file written, 2 for a usage error (DIR is not a store; no such sequence, layer or "
      "KV head).");
  cmd->callback([args, exit_code] { *exit_code = run_export(*args); });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(export_faiss, pqkv::tools::add_export_faiss_command);
