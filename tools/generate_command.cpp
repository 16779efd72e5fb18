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

namespace pqkv::tools {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_file;
  std::string prompt_ids;
  int max_new = 64;
  std::string budget = "0.1";
  std::string sink = "32";
  std::string pq = "default";
  std::string backend = "cpu";
  std::string store_device = "cpu";
  std::string kv_dtype = "bf16";
  bool exact = false;
  bool no_store = false;
  bool ignore_eos = false;
  bool show_ids = false;
  float temperature = 0.0f;
  uint64_t seed = 0;
  int64_t prefill_chunk = 0;
  int threads = 0;
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
  if (a.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(a.threads));
  }
  model::SessionOptions so;
  so.model_dir = a.model;
  PQKV_ASSIGN_OR_RETURN(so.backend, parse_device(a.backend));
  PQKV_ASSIGN_OR_RETURN(so.store_device, parse_device(a.store_device));
  PQKV_ASSIGN_OR_RETURN(so.kv_dtype, parse_dtype(a.kv_dtype));
  so.num_threads = a.threads;
  SequenceOptions seq_opts;
  PQKV_ASSIGN_OR_RETURN(seq_opts.budget, model::parse_budget(a.budget, a.sink));
  PQKV_ASSIGN_OR_RETURN(seq_opts.pq, PqConfig::parse(a.pq));
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
  opts.prefill_chunk = a.prefill_chunk;
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
    attention += " (" + seq_opts.budget.to_string() + ", " + seq_opts.pq.to_string() + ")";
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
  cmd->add_option("--budget", args->budget,
                  "Tokens a decode step attends to besides the sink, split evenly between "
                  "the recent window and the top-K: a ratio of the context (0.1 or 10%), a "
                  "count (512), both (64+0.05: the larger), or 'all' for every token")
      ->capture_default_str();
  cmd->add_option("--sink", args->sink, "First tokens always attended (count or ratio)")
      ->capture_default_str();
  cmd->add_option("--pq", args->pq,
                  "PQ index of the keys: 'default' (8 dims per sub-space: m=head_dim/8, b=8), "
                  "'pqcache' (m=2,b=6) or m=M,b=B")
      ->capture_default_str();
  cmd->add_flag("--exact", args->exact,
                "Attend to every stored token (Sequence::attend_exact) instead of the budget");
  cmd->add_flag("--no-store", args->no_store,
                "Exact attention over the runtime's own KV cache, without a pqkv sequence");
  cmd->add_option("--backend", args->backend, "Where the forward pass runs: cpu or cuda[:N]")
      ->capture_default_str();
  cmd->add_option("--store-device", args->store_device,
                  "Where the pqkv store searches and attends: cpu or cuda[:N]")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", args->kv_dtype,
                  "How the store keeps keys and values: bf16, f16, f32")
      ->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "Sampling temperature; 0 = greedy")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", args->seed, "Seed of temperature sampling")->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Keep generating past an EOS token");
  cmd->add_flag("--show-ids", args->show_ids, "Print token ids instead of text");
  cmd->add_option("--prefill-chunk", args->prefill_chunk,
                  "Prompt tokens per prefill pass (bounds activation memory); 0 = one pass")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--threads", args->threads, "CPU threads; 0 = one per core")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
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
