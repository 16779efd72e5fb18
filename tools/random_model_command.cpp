// `pqkv random-model`: writes a random-weight checkpoint with a real model's
// geometry, for `pqkv generate` and `pqkv needle` benchmarks without weights.
#include <iostream>

#include "model/random_checkpoint.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"

namespace pqkv::tools {
namespace {

struct RandomModelArgs {
  std::string out;
  int layers = 2;
  int intermediate = 14336;
  int hidden = 4096;
  int heads = 32;
  int kv_heads = 8;
  uint64_t seed = 7;
};

void add_random_model(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<RandomModelArgs>();
  CLI::App* cmd = app.add_subcommand(
      "random-model",
      "Write a random-weight Llama checkpoint, by default with Llama-3.1-8B's layer geometry "
      "(hidden 4096, 32 query heads, 8 KV heads, head_dim 128, Llama-3 RoPE scaling, bf16), and "
      "a byte-level vocabulary of 256, so that `pqkv generate --prompt-file` needs no tokenizer. "
      "Each layer takes about 436 MB at the full size; --hidden, --heads, --kv-heads and "
      "--intermediate make small models (e.g. --layers 6 --hidden 512 --heads 8 --kv-heads 2 "
      "--intermediate 1536 for CPU benchmarks).");
  cmd->add_option("--out", args->out,
                  "folder to write config.json and model.safetensors into (made when missing; "
                  "files of those names there are replaced)")
      ->required();
  cmd->add_option("--layers", args->layers, "decoder layers")
      ->check(whole_in(1, 128))
      ->capture_default_str();
  cmd->add_option("--intermediate", args->intermediate,
                  "MLP width (14336 in Llama-3.1-8B; smaller writes and loads faster)")
      ->check(finite_at_least(1))
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--hidden", args->hidden,
                  "model width (4096 in Llama-3.1-8B); head_dim is hidden / heads")
      ->check(finite_at_least(1))
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--heads", args->heads, "query heads (32 in Llama-3.1-8B)")
      ->check(finite_at_least(1))
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--kv-heads", args->kv_heads,
                  "KV heads (8 in Llama-3.1-8B); must divide --heads (GQA groups)")
      ->check(finite_at_least(1))
      ->capture_default_str()
      ->check(whole_in(1, kMaxCliInt));
  cmd->add_option("--seed", args->seed, "seed of the weights")
      ->capture_default_str()
      ->check(whole_number(false));
  cmd->footer(
      "Exit status: 0 when the checkpoint was written, 1 when it could not be, 2 for a usage "
      "error (a geometry such as --hidden not a multiple of --heads, an --out that is a file).");
  cmd->callback([args, exit_code] {
    model::RandomCheckpoint c = model::RandomCheckpoint::llama31_8b_geometry(args->layers);
    c.intermediate = args->intermediate;
    if (args->hidden % args->heads != 0 || (args->hidden / args->heads) % 2 != 0 ||
        args->heads % args->kv_heads != 0) {
      std::cerr << "pqkv random-model: --hidden must be an even multiple of --heads (head_dim = "
                   "hidden / heads, even for RoPE) and --kv-heads must divide --heads\n";
      *exit_code = 2;
      return;
    }
    if (const Status out = check_output_dir("--out", args->out); !out.ok()) {
      std::cerr << "pqkv random-model: " << out.to_string() << "\n";
      *exit_code = 2;
      return;
    }
    c.hidden = args->hidden;
    c.q_heads = args->heads;
    c.kv_heads = args->kv_heads;
    c.head_dim = args->hidden / args->heads;
    c.seed = args->seed;
    std::cerr << "writing " << c.layers << " layers to " << args->out << " ...\n";
    const Status s = model::write_random_checkpoint(args->out, c);
    if (!s.ok()) {
      std::cerr << "pqkv random-model: " << s.to_string()
                << (s.code() == StatusCode::kResourceExhausted
                        ? "; lower --hidden, --intermediate or --layers"
                        : "")
                << "\n";
      *exit_code = 1;
      return;
    }
    std::cerr << "done\n";
  });
}

}  // namespace

PQKV_REGISTER_COMMAND(random_model, add_random_model);

}  // namespace pqkv::tools
