// What the model commands share: a loaded model, its backend and a pqkv Store
// shaped for its keys and values; and the parsing of their budget and token flags.
#pragma once

#include <filesystem>
#include <memory>
#include <string_view>
#include <vector>

#include "model/backend.h"
#include "model/llama_model.h"
#include "pqkv/options.h"
#include "pqkv/store.h"

namespace pqkv::model {

struct SessionOptions {
  std::filesystem::path model_dir;
  Device backend = Device::cpu();       // where the forward pass runs. Default cpu.
  Device store_device = Device::cpu();  // where the Store searches and attends. Default cpu.
  DType kv_dtype = DType::kBF16;        // how the Store keeps keys and values. Default bf16.
  int num_threads = 0;                  // Store worker threads; 0 = one per core. Default 0.
};

struct ModelSession {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<ModelBackend> backend;
  std::unique_ptr<Store> store;
  Device store_device = Device::cpu();
};

Result<ModelSession> open_model_session(const SessionOptions& options);

// The commands' budget: `budget` is a TokenCount ("0.1", "10%", "512",
// "64+5%"; see TokenCount::parse) split evenly between the recent window and
// the top-K, or "all" for every token; `sink` is a TokenCount of first tokens.
// InvalidArgument naming the flag (--budget, --sink) of what cannot be read.
Result<BudgetPolicy> parse_budget(std::string_view budget, std::string_view sink);

// TokenCount::parse of the value of `flag`; its errors name the flag.
Result<TokenCount> parse_token_count(std::string_view flag, std::string_view text);

// Token ids separated by commas or spaces: "1,319,459".
Result<std::vector<int32_t>> parse_token_ids(std::string_view text);

// Text to ids with the model's tokenizer, BOS first when config.json names one.
Result<std::vector<int32_t>> encode_prompt(const LlamaModel& model, std::string_view text);

}  // namespace pqkv::model
