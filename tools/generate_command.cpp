// `pqkv generate`: runs a Llama-family checkpoint with its keys and values in a
// pqkv Sequence and streams the generated tokens.
#include <fmt/format.h>
#include <tbb/global_control.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include "model/generator.h"
#include "model/session.h"
#include "tools/commands.h"
#include "tools/model_flags.h"

namespace pqkv::tools {
namespace {

struct GenerateArgs {
  std::string model;
  ModelFlags run;  // store, budget, backends, threads
  std::string prompt;
  std::string prompt_file;
  std::string prompt_ids;
  int max_new = 64;
  bool exact = false;
  bool no_store = false;
  bool ignore_eos = false;
  bool show_ids = false;
  float temperature = 0.0f;
  uint64_t seed = 0;
};

Result<std::vector<int32_t>> prompt_ids(const GenerateArgs& a, const model::LlamaModel& m) {
  if (!a.prompt_ids.empty()) return model::parse_token_ids(a.prompt_ids);
  if (!a.prompt_file.empty()) {
    std::ifstream in(a.prompt_file, std::ios::binary);
    if (!in) return Status::not_found("cannot read prompt file " + a.prompt_file);
    std::stringstream text;
    text << in.rdbuf();
    return model::encode_prompt(m, text.str());
  }
  return model::encode_prompt(m, a.prompt);
}

Status run_generate(const GenerateArgs& a) {
  std::optional<tbb::global_control> threads;
  if (a.run.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism,
                    static_cast<size_t>(a.run.threads));
  }
  model::SessionOptions so;
  so.model_dir = a.model;
  SequenceOptions seq_opts;
  PQKV_RETURN_IF_ERROR(resolve_model_flags(a.run, &so, &seq_opts));
  PQKV_ASSIGN_OR_RETURN(model::ModelSession session, model::open_model_session(so));
  const model::LlamaModel& m = *session.model;
  PQKV_RETURN_IF_ERROR(seq_opts.validate(m.config().kv_spec(so.kv_dtype)));
  PQKV_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, prompt_ids(a, m));

  const int64_t total = static_cast<int64_t>(prompt.size()) + a.max_new;
  if (m.config().max_position_embeddings > 0 && total > m.config().max_position_embeddings) {
    fmt::print(stderr,
               "warning: {} prompt + {} new tokens exceed the model's max_position_embeddings "
               "({}); quality may drop past it\n",
               prompt.size(), a.max_new, m.config().max_position_embeddings);
  }
  const model::AttentionPath path = a.no_store ? model::AttentionPath::kBackendCache
                                    : a.exact  ? model::AttentionPath::kStoreExact
                                               : model::AttentionPath::kStoreSparse;
  model::StoreTarget target{nullptr, session.store_device};
  if (path != model::AttentionPath::kBackendCache) {
    PQKV_ASSIGN_OR_RETURN(target.sequence, session.store->create_sequence("generate", seq_opts));
  }
  model::GenerateOptions opts;
  opts.max_new_tokens = a.max_new;
  opts.prefill_chunk = a.run.prefill_chunk;
  opts.stop_at_eos = !a.ignore_eos;
  opts.sampling.temperature = a.temperature;
  opts.sampling.seed = a.seed;

  const model::Tokenizer* tok = a.show_ids ? nullptr : m.tokenizer();
  int32_t previous = prompt.back();
  const auto on_token = [&](int32_t token) {
    if (tok != nullptr) {
      const std::string piece = tok->decode(token, previous);
      std::fwrite(piece.data(), 1, piece.size(), stdout);
    } else {
      fmt::print("{} ", token);
    }
    std::fflush(stdout);
    previous = token;
  };
  // Echo the prompt so that the stream reads as one text.
  if (tok != nullptr) {
    for (size_t i = 0; i < prompt.size(); ++i) {
      const std::string piece = tok->decode(prompt[i], i > 0 ? prompt[i - 1] : -1);
      if (!(m.config().bos_token_id && prompt[i] == *m.config().bos_token_id)) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
      }
    }
  }
  model::Generator gen(m, *session.backend);
  PQKV_ASSIGN_OR_RETURN(model::GenerateResult r,
                        gen.generate(prompt, path, target, opts, on_token));

  std::string attention = model::attention_path_name(path);
  if (path == model::AttentionPath::kStoreSparse) {
    attention += " (" + seq_opts.budget.to_string() + ", " + selection_description(seq_opts) + ")";
  }
  fmt::print("\n\nprompt {} tokens, generated {}; attention: {}; backend {}, kv {}\n",
             r.prompt_tokens, r.tokens.size(), attention, so.backend.to_string(),
             dtype_name(so.kv_dtype));
  fmt::print("time to first token:   {:.2f} ms\n", r.ttft_ms);
  if (r.tokens.size() > 1) {
    fmt::print("time per output token: {:.2f} ms ({:.1f} tokens/s)\n", r.tpot_ms,
               1000.0 / r.tpot_ms);
  } else {
    fmt::print("time per output token: n/a (one token generated)\n");
  }
  return ok_status();
}

void add_generate_command(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "generate",
      "Generate text with a Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2; "
      "safetensors in fp32, bf16 or fp16) whose keys and values live in a pqkv sequence. "
      "The prompt is prefilled with exact attention; each decode step attends to sink + "
      "recent window + the top-K tokens picked by the PQ index. Streams the tokens, then "
      "prints time to first token and time per output token.");
  cmd->add_option("--model", args->model,
                  "Model folder: config.json, *.safetensors (or a sharded index), and "
                  "optionally tokenizer.bin (llama2.c format)")
      ->required()
      ->check(CLI::ExistingDirectory);
  add_model_flags(cmd, &args->run);
  auto* prompt = cmd->add_option("--prompt", args->prompt,
                                 "Prompt text (needs a tokenizer; BOS is added when "
                                 "config.json names one)");
  auto* file =
      cmd->add_option("--prompt-file", args->prompt_file, "Read the prompt text from a file")
          ->check(CLI::ExistingFile);
  auto* ids = cmd->add_option("--prompt-ids", args->prompt_ids,
                              "Prompt as token ids, e.g. 1,319,459 (used as given: no BOS added)");
  prompt->excludes(file)->excludes(ids);
  file->excludes(ids);
  cmd->add_option("--max-new", args->max_new, "Tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--exact", args->exact,
                "Attend to every stored token (Sequence::attend_exact) instead of the budget");
  cmd->add_flag("--no-store", args->no_store,
                "Exact attention over the runtime's own KV cache, without a pqkv sequence");
  cmd->add_option("--temperature", args->temperature, "Sampling temperature; 0 = greedy")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", args->seed, "Seed of temperature sampling")->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Keep generating past an EOS token");
  cmd->add_flag("--show-ids", args->show_ids, "Print token ids instead of text");
  cmd->callback([cmd, args, exit_code] {
    if (cmd->count("--prompt") + cmd->count("--prompt-file") + cmd->count("--prompt-ids") == 0) {
      fmt::print(stderr, "pqkv generate: give --prompt, --prompt-file or --prompt-ids\n");
      *exit_code = 2;
      return;
    }
    const Status s = run_generate(*args);
    if (!s.ok()) {
      fmt::print(stderr, "pqkv generate: {}\n", s.to_string());
      *exit_code = 1;
    }
  });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(generate, pqkv::tools::add_generate_command);
