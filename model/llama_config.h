// The fields of a Hugging Face config.json that a Llama-family forward needs
// (Llama, Mistral, Qwen2).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/status.h"

namespace pqkv::model {

struct RopeScaling {
  enum class Type : uint8_t { kNone = 0, kLinear = 1, kLlama3 = 2 };
  Type type = Type::kNone;
  double factor = 1.0;                              // linear and llama3
  double low_freq_factor = 1.0;                     // llama3
  double high_freq_factor = 4.0;                    // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct LlamaConfig {
  std::string architecture;  // "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // hidden_size / num_q_heads unless config.json says otherwise
  int vocab_size = 0;
  int64_t max_position_embeddings = 0;
  // Mistral's (and Qwen2's, with use_sliding_window) attention window, 0 for
  // none. pqkv attends over the whole context: the tools warn past it.
  int64_t sliding_window = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (always for Qwen2; o_proj has none there)
  bool o_proj_bias = false;     // Llama's attention_bias also biases o_proj
  bool mlp_bias = false;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;

  // Parses config.json text; Unimplemented for architectures or options pqkv
  // does not run, InvalidArgument for inconsistent geometry.
  static Result<LlamaConfig> parse(std::string_view json_text);
  // Reads dir/config.json.
  static Result<LlamaConfig> load(const std::filesystem::path& dir);

  Status validate() const;
  bool is_eos(int32_t token) const;
  // The geometry a pqkv Store needs for this model's keys and values.
  ModelSpec kv_spec(DType kv_dtype) const;
};

}  // namespace pqkv::model
