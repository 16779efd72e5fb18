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

struct ModelFlags {
  std::string budget = "0.1";
  std::string sink = "32";
  std::string pq = "default";
  std::string selection = "pq";
  std::string backend = "cpu";
  std::string store_device = "cpu";
  std::string kv_dtype = "bf16";
  int64_t prefill_chunk = 0;
  int threads = 0;
};

// Registers the flags on `cmd`; `flags` must outlive the parse.
void add_model_flags(CLI::App* cmd, ModelFlags* flags);

// The session and sequence options the flags describe (the model folder is the caller's).
Status resolve_model_flags(const ModelFlags& flags, model::SessionOptions* session,
                           SequenceOptions* sequence);

// What a sequence scores with, for reports: "pq m=d/8,b=8", "oracle", "int4",
// "pq+int8:4 m=4,b=8".
std::string selection_description(const SequenceOptions& sequence);

}  // namespace pqkv::tools
