// `pqkv tokenize`: text to token ids with a model folder's tokenizer, the
// same one `generate --prompt` and `needle` use.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <sstream>

#include "model/llama_config.h"
#include "model/tokenizer.h"
#include "tools/cli_checks.h"
#include "tools/commands.h"

namespace pqkv::tools {
namespace {

struct TokenizeArgs {
  std::string model;
  std::string text;
  std::string file;
  bool lines = false;
};

Status run_tokenize(const TokenizeArgs& a, int* failure_code) {
  *failure_code = 2;
  std::string input = a.text;
  if (!a.file.empty()) {
    PQKV_RETURN_IF_ERROR(check_input_file("--file", a.file, /*allow_empty=*/true));
    std::ifstream in(a.file, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    input = s.str();
  }
  *failure_code = 1;
  // config.json is optional here: a folder with only a tokenizer file will do.
  model::LlamaConfig config;
  if (std::filesystem::exists(std::filesystem::path(a.model) / "config.json")) {
    PQKV_ASSIGN_OR_RETURN(config, model::LlamaConfig::load(a.model));
  }
  std::string passed_over;
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tok,
                        model::load_tokenizer(a.model, config, &passed_over));
  if (tok == nullptr) {
    *failure_code = 2;
    return model::no_tokenizer_error(a.model, passed_over,
                                     "add the model's tokenizer file to the folder");
  }
  const auto print = [&](std::string_view text) {
    const std::vector<int32_t> ids = tok->encode(text);
    fmt::print("{}\n", fmt::join(ids, ","));
  };
  if (!a.lines) {
    print(input);
    return ok_status();
  }
  size_t start = 0;
  while (start < input.size()) {
    size_t end = input.find('\n', start);
    if (end == std::string::npos) end = input.size();
    print(std::string_view(input).substr(start, end - start));
    start = end + 1;
  }
  return ok_status();
}

void add_tokenize_command(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize",
      "Print the token ids of a text, comma-separated, as the model folder's tokenizer "
      "encodes it for `generate --prompt` and `needle` (no BOS). Reads tokenizer.json "
      "(byte-level BPE: Llama 3, Qwen2, GPT-2), tokenizer.model (SentencePiece: Llama 2, "
      "Mistral), tokenizer.bin (llama2.c), or bytes for a 256-token vocabulary.");
  cmd->add_option("--model", args->model, "Folder with the tokenizer (config.json optional)")
      ->required()
      ->check(CLI::ExistingDirectory);
  auto* text = cmd->add_option("--text", args->text, "The text to encode");
  auto* file = cmd->add_option("--file", args->file, "Read the text from a file");
  text->excludes(file);
  cmd->add_flag("--lines", args->lines,
                "Encode each line on its own (without its newline), one line of ids each");
  cmd->footer("Exit status: 0 when the text was encoded, 1 on failure, 2 for a usage error.");
  cmd->callback([cmd, args, exit_code] {
    if (cmd->count("--text") + cmd->count("--file") == 0) {
      fmt::print(stderr, "pqkv tokenize: give --text or --file\n");
      *exit_code = 2;
      return;
    }
    int failure_code = 1;
    const Status s = run_tokenize(*args, &failure_code);
    if (!s.ok()) {
      fmt::print(stderr, "pqkv tokenize: {}\n", s.to_string());
      *exit_code = failure_code;
    }
  });
}

}  // namespace
}  // namespace pqkv::tools

PQKV_REGISTER_COMMAND(tokenize, pqkv::tools::add_tokenize_command);
