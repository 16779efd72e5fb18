// A Llama-family checkpoint loaded from a Hugging Face folder: config.json,
// memory-mapped safetensors weights (bound to named roles, shapes checked) and
// the tokenizer when one is there.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model/llama_config.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"

namespace pqkv::model {

struct LayerWeights {
  const WeightTensor* input_norm = nullptr;  // [hidden]
  const WeightTensor* q_proj = nullptr;      // [q_heads * head_dim, hidden]
  const WeightTensor* k_proj = nullptr;      // [kv_heads * head_dim, hidden]
  const WeightTensor* v_proj = nullptr;      // [kv_heads * head_dim, hidden]
  const WeightTensor* o_proj = nullptr;      // [hidden, q_heads * head_dim]
  const WeightTensor* q_bias = nullptr;      // null unless config.attention_bias
  const WeightTensor* k_bias = nullptr;
  const WeightTensor* v_bias = nullptr;
  const WeightTensor* o_bias = nullptr;     // null unless config.o_proj_bias
  const WeightTensor* post_norm = nullptr;  // [hidden]
  const WeightTensor* gate_proj = nullptr;  // [intermediate, hidden]
  const WeightTensor* up_proj = nullptr;    // [intermediate, hidden]
  const WeightTensor* down_proj = nullptr;  // [hidden, intermediate]
  const WeightTensor* gate_bias = nullptr;  // null unless config.mlp_bias
  const WeightTensor* up_bias = nullptr;
  const WeightTensor* down_bias = nullptr;
};

struct LlamaWeights {
  const WeightTensor* embed = nullptr;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  const WeightTensor* final_norm = nullptr;  // [hidden]
  const WeightTensor* lm_head = nullptr;     // [vocab, hidden]; the embedding when tied
};

class LlamaModel {
 public:
  // Loads dir/config.json, the safetensors weights and the tokenizer.
  static Result<std::unique_ptr<LlamaModel>> load(const std::filesystem::path& dir);

  const LlamaConfig& config() const { return config_; }
  const LlamaWeights& weights() const { return weights_; }
  // Null when the folder has no tokenizer pqkv reads (token ids only).
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  // Why the folder's tokenizer.json was not read, when tokenizer() is null
  // and there is one (its format is one pqkv does not read); empty otherwise.
  const std::string& tokenizer_passed_over() const { return tokenizer_passed_over_; }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  LlamaModel() = default;

  std::filesystem::path dir_;
  LlamaConfig config_;
  WeightFiles files_;
  LlamaWeights weights_;  // points into files_
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string tokenizer_passed_over_;
};

// Binds and checks the weights the config implies.
Result<LlamaWeights> bind_llama_weights(const WeightFiles& files, const LlamaConfig& config);

}  // namespace pqkv::model
