// Flags shared by the commands that run a model with its KV cache in pqkv
// (`generate`, `needle`): where the forward pass and the store run, the store's
// dtype, the budget and the PQ setting, prefill chunking and threads.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

#include "model/session.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::tools {

// How every command reads a budget or a token count (TokenCount::parse), for
// --help texts.
inline constexpr const char* kTokenCountGrammar =
    "an integer is a count of tokens (512); a percentage (10%) or a fraction below 1 (0.1) "
    "is a ratio of the context; 64+10% is the larger of the two. '1.0' is refused: write 1 "
    "(one token) or 100% (the whole context)";

// What --model of `generate` and `needle` reads, for --help texts.
inline constexpr const char* kModelFolderHelp =
    "Model folder (Hugging Face layout): config.json, *.safetensors (fp32, bf16 or fp16; or a "
    "sharded model.safetensors.index.json) and, for text prompts, a tokenizer, the first of: "
    "tokenizer.json with a byte-level BPE (Llama 3, Qwen2), tokenizer.model (SentencePiece: "
    "Llama 2, Mistral), tokenizer.bin (llama2.c), or none when the vocabulary is 256 bytes";

// The m of `pq` at `head_dim` written out ("m=16,b=8"), as the run used it.
std::string pq_label(const PqConfig& pq, int head_dim);

struct ModelFlags {
  std::string budget = "0.1";
  std::string sink = "32";
  std::string pq = "default";
  std::string selection = "int4";
  std::string backend = "cpu";
  std::string store_device = "cpu";
  std::string kv_dtype = "bf16";
  int64_t prefill_chunk = 0;
  int threads = 0;
  bool quiet = false;  // no progress output on stderr
};

// Registers the flags on `cmd`; `flags` must outlive the parse.
void add_model_flags(CLI::App* cmd, ModelFlags* flags);

// The session and sequence options the flags describe (the model folder is the caller's).
Status resolve_model_flags(const ModelFlags& flags, model::SessionOptions* session,
                           SequenceOptions* sequence);

// What a sequence scores with, for reports: "pq m=16,b=8", "oracle", "int4",
// "pq+int8:4 m=4,b=8" (the PQ setting resolved for head_dim).
std::string selection_description(const SequenceOptions& sequence, int head_dim);

}  // namespace pqkv::tools
