#include "model/llama_config.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "model/mapped_file.h"

namespace pqkv::model {
namespace {

using nlohmann::json;

// Field readers that turn a wrong JSON type into a Status instead of an exception.
template <class T>
Status read_number(const json& j, const char* key, T* out, bool required) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) return Status::invalid_argument(std::string("config.json lacks '") + key + "'");
    return ok_status();
  }
  if (!j[key].is_number()) {
    return Status::invalid_argument(std::string("config.json: '") + key + "' must be a number");
  }
  if constexpr (std::is_integral_v<T>) {
    // A float or an out-of-range integer would convert with undefined or wrong results.
    const json& v = j[key];
    const bool fits =
        v.is_number_unsigned()
            ? v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max())
            : v.is_number_integer() && v.get<int64_t>() >= std::numeric_limits<T>::min() &&
                  v.get<int64_t>() <= std::numeric_limits<T>::max();
    if (!fits) {
      return Status::invalid_argument(std::string("config.json: '") + key + "' must be an integer" +
                                      " within " + std::to_string(std::numeric_limits<T>::min()) +
                                      ".." + std::to_string(std::numeric_limits<T>::max()) +
                                      ", got " + v.dump());
    }
  }
  *out = j[key].get<T>();
  return ok_status();
}

Status read_bool(const json& j, const char* key, bool* out) {
  if (!j.contains(key) || j[key].is_null()) return ok_status();
  if (!j[key].is_boolean()) {
    return Status::invalid_argument(std::string("config.json: '") + key +
                                    "' must be true or false");
  }
  *out = j[key].get<bool>();
  return ok_status();
}

Status read_rope_scaling(const json& j, RopeScaling* out) {
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return ok_status();
  const json& rs = j["rope_scaling"];
  if (!rs.is_object())
    return Status::invalid_argument("config.json: rope_scaling must be an object");
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    if (rs.contains(key) && rs[key].is_string()) type = rs[key].get<std::string>();
  }
  if (type == "default" || type.empty()) return ok_status();
  PQKV_RETURN_IF_ERROR(read_number(rs, "factor", &out->factor, /*required=*/true));
  if (out->factor <= 0) return Status::invalid_argument("rope_scaling.factor must be positive");
  if (type == "linear") {
    out->type = RopeScaling::Type::kLinear;
    return ok_status();
  }
  if (type == "llama3") {
    out->type = RopeScaling::Type::kLlama3;
    PQKV_RETURN_IF_ERROR(read_number(rs, "low_freq_factor", &out->low_freq_factor, true));
    PQKV_RETURN_IF_ERROR(read_number(rs, "high_freq_factor", &out->high_freq_factor, true));
    PQKV_RETURN_IF_ERROR(read_number(rs, "original_max_position_embeddings",
                                     &out->original_max_position_embeddings, true));
    if (!(out->low_freq_factor > 0) || out->original_max_position_embeddings <= 0) {
      return Status::invalid_argument(
          "rope_scaling: low_freq_factor and original_max_position_embeddings must be positive");
    }
    if (out->high_freq_factor <= out->low_freq_factor) {
      return Status::invalid_argument("rope_scaling: high_freq_factor must exceed low_freq_factor");
    }
    return ok_status();
  }
  return Status::unimplemented("rope_scaling type '" + type +
                               "' is not supported; pqkv runs none, linear and llama3");
}

Status read_token_ids(const json& j, const char* key, std::vector<int32_t>* out) {
  if (!j.contains(key) || j[key].is_null()) return ok_status();
  const json& v = j[key];
  // Each id through read_number's range check: a float or a 64-bit value would
  // otherwise wrap into some valid id.
  if (v.is_number()) {
    int32_t id = 0;
    PQKV_RETURN_IF_ERROR(read_number(j, key, &id, /*required=*/true));
    out->push_back(id);
  } else if (v.is_array()) {
    for (const auto& e : v) {
      int32_t id = 0;
      if (!e.is_number() || !read_number(json{{key, e}}, key, &id, true).ok()) {
        return Status::invalid_argument(std::string("config.json: '") + key +
                                        "' must hold 32-bit integers, got " + e.dump());
      }
      out->push_back(id);
    }
  } else {
    return Status::invalid_argument(std::string("config.json: '") + key +
                                    "' must be an integer or a list of them");
  }
  return ok_status();
}

}  // namespace

Result<LlamaConfig> LlamaConfig::parse(std::string_view json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    // A syntax error or a number past double's range; the parser's message
    // names the byte where the text stops being JSON that pqkv can read.
    return Status::invalid_argument(std::string("config.json is not valid JSON (") + e.what() +
                                    "); replace it with the model's own config.json");
  }
  if (!j.is_object()) return Status::invalid_argument("config.json is not a JSON object");
  LlamaConfig c;
  std::string model_type;
  if (j.contains("model_type") && j["model_type"].is_string()) {
    model_type = j["model_type"].get<std::string>();
  }
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string()) {
    c.architecture = j["architectures"][0].get<std::string>();
  } else if (model_type == "llama") {
    c.architecture = "LlamaForCausalLM";
  } else if (model_type == "mistral") {
    c.architecture = "MistralForCausalLM";
  } else if (model_type == "qwen2") {
    c.architecture = "Qwen2ForCausalLM";
  }
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM" && !qwen2) {
    return Status::unimplemented(
        "architecture '" + (c.architecture.empty() ? model_type : c.architecture) +
        "' is not supported; pqkv runs LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM");
  }
  if (j.contains("hidden_act") && j["hidden_act"].is_string() &&
      j["hidden_act"].get<std::string>() != "silu") {
    return Status::unimplemented("hidden_act '" + j["hidden_act"].get<std::string>() +
                                 "' is not supported; pqkv runs silu (SwiGLU)");
  }
  PQKV_RETURN_IF_ERROR(read_number(j, "hidden_size", &c.hidden_size, true));
  PQKV_RETURN_IF_ERROR(read_number(j, "intermediate_size", &c.intermediate_size, true));
  PQKV_RETURN_IF_ERROR(read_number(j, "num_hidden_layers", &c.num_layers, true));
  PQKV_RETURN_IF_ERROR(read_number(j, "num_attention_heads", &c.num_q_heads, true));
  c.num_kv_heads = c.num_q_heads;
  PQKV_RETURN_IF_ERROR(read_number(j, "num_key_value_heads", &c.num_kv_heads, false));
  if (c.num_q_heads > 0) c.head_dim = c.hidden_size / c.num_q_heads;
  PQKV_RETURN_IF_ERROR(read_number(j, "head_dim", &c.head_dim, false));
  PQKV_RETURN_IF_ERROR(read_number(j, "vocab_size", &c.vocab_size, true));
  PQKV_RETURN_IF_ERROR(
      read_number(j, "max_position_embeddings", &c.max_position_embeddings, false));
  bool windowed = c.architecture == "MistralForCausalLM";
  if (qwen2) PQKV_RETURN_IF_ERROR(read_bool(j, "use_sliding_window", &windowed));
  if (windowed) PQKV_RETURN_IF_ERROR(read_number(j, "sliding_window", &c.sliding_window, false));
  PQKV_RETURN_IF_ERROR(read_number(j, "rms_norm_eps", &c.rms_norm_eps, false));
  PQKV_RETURN_IF_ERROR(read_number(j, "rope_theta", &c.rope_theta, false));
  PQKV_RETURN_IF_ERROR(read_rope_scaling(j, &c.rope_scaling));
  PQKV_RETURN_IF_ERROR(read_bool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  // Qwen2 always biases q/k/v and nothing else; Llama's attention_bias covers o_proj too.
  if (qwen2) {
    c.attention_bias = true;
  } else {
    PQKV_RETURN_IF_ERROR(read_bool(j, "attention_bias", &c.attention_bias));
    c.o_proj_bias = c.attention_bias;
    PQKV_RETURN_IF_ERROR(read_bool(j, "mlp_bias", &c.mlp_bias));
  }
  std::vector<int32_t> bos;
  PQKV_RETURN_IF_ERROR(read_token_ids(j, "bos_token_id", &bos));
  if (!bos.empty()) c.bos_token_id = bos.front();
  PQKV_RETURN_IF_ERROR(read_token_ids(j, "eos_token_id", &c.eos_token_ids));
  PQKV_RETURN_IF_ERROR(c.validate());
  return c;
}

Result<LlamaConfig> LlamaConfig::load(const std::filesystem::path& dir) {
  const auto path = dir / "config.json";
  PQKV_ASSIGN_OR_RETURN(const std::string text, read_model_file(path));
  auto c = parse(text);
  if (!c.ok()) return c.status().with_context(path.string());
  return c;
}

Status LlamaConfig::validate() const {
  const std::pair<const char*, int64_t> sizes[] = {
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_layers},
      {"num_attention_heads", num_q_heads},
      {"num_key_value_heads", num_kv_heads},
      {"head_dim", head_dim},
      {"vocab_size", vocab_size}};
  for (const auto& [key, value] : sizes) {
    if (value <= 0) {
      return Status::invalid_argument(std::string("config.json needs a positive ") + key +
                                      ", got " + std::to_string(value));
    }
  }
  if (sliding_window < 0) {
    return Status::invalid_argument("config.json: sliding_window must be positive, got " +
                                    std::to_string(sliding_window));
  }
  if (max_position_embeddings < 0) {
    return Status::invalid_argument("config.json: max_position_embeddings must be positive, got " +
                                    std::to_string(max_position_embeddings));
  }
  if (num_q_heads % num_kv_heads != 0) {
    return Status::invalid_argument("num_attention_heads (" + std::to_string(num_q_heads) +
                                    ") must be a multiple of num_key_value_heads (" +
                                    std::to_string(num_kv_heads) + ")");
  }
  if (head_dim % 2 != 0) {
    return Status::invalid_argument("head_dim must be even for RoPE, got " +
                                    std::to_string(head_dim));
  }
  // The model computes in fp32: each of these must be a positive normal float there
  // (1e300 would be Inf, 1e-300 zero, and either gives NaN activations).
  const std::pair<const char*, double> reals[] = {
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"rope_scaling.factor", rope_scaling.factor},
      {"rope_scaling.low_freq_factor", rope_scaling.low_freq_factor},
      {"rope_scaling.high_freq_factor", rope_scaling.high_freq_factor}};
  for (const auto& [key, value] : reals) {
    if (!(value >= std::numeric_limits<float>::min() &&
          value <= std::numeric_limits<float>::max())) {
      return Status::invalid_argument(std::string("config.json: ") + key +
                                      " must be a positive number within fp32's normal range "
                                      "(1.2e-38 to 3.4e38), got " +
                                      json(value).dump());
    }
  }
  for (int32_t id : eos_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return Status::invalid_argument("eos_token_id " + std::to_string(id) +
                                      " is outside the vocabulary");
    }
  }
  if (bos_token_id && (*bos_token_id < 0 || *bos_token_id >= vocab_size)) {
    return Status::invalid_argument("bos_token_id " + std::to_string(*bos_token_id) +
                                    " is outside the vocabulary");
  }
  return ok_status();
}

bool LlamaConfig::is_eos(int32_t token) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end();
}

ModelSpec LlamaConfig::kv_spec(DType kv_dtype) const {
  ModelSpec s;
  s.name = architecture;
  s.num_layers = num_layers;
  s.num_q_heads = num_q_heads;
  s.num_kv_heads = num_kv_heads;
  s.head_dim = head_dim;
  s.dtype = kv_dtype;
  return s;
}

}  // namespace pqkv::model
