#include "pqkv/model_spec.h"

#include <string>

namespace pqkv {

Status ModelSpec::validate() const {
  if (num_layers <= 0 || num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0) {
    return Status::invalid_argument("model spec '" + name +
                                    "' needs positive layers, heads and head_dim: " + to_string());
  }
  if (num_q_heads % num_kv_heads != 0) {
    return Status::invalid_argument("q_heads (" + std::to_string(num_q_heads) +
                                    ") must be a multiple of kv_heads (" +
                                    std::to_string(num_kv_heads) + ") for grouped-query attention");
  }
  if (dtype != DType::kBF16 && dtype != DType::kF16 && dtype != DType::kF32) {
    return Status::invalid_argument("model spec '" + name + "' has an unknown dtype code " +
                                    std::to_string(static_cast<int>(dtype)) +
                                    ": use bf16, fp16 or fp32");
  }
  if (head_dim % 2 != 0 || head_dim > 512) {
    return Status::invalid_argument("head_dim must be even and at most 512, got " +
                                    std::to_string(head_dim));
  }
  return ok_status();
}

std::string ModelSpec::to_string() const {
  return name + " (layers=" + std::to_string(num_layers) +
         ", q_heads=" + std::to_string(num_q_heads) + ", kv_heads=" + std::to_string(num_kv_heads) +
         ", head_dim=" + std::to_string(head_dim) + ", " + dtype_name(dtype) + ")";
}

ModelSpec ModelSpec::llama31_8b() {
  return {"llama-3.1-8b", 32, 32, 8, 128, DType::kBF16};
}
ModelSpec ModelSpec::mistral_7b() {
  return {"mistral-7b", 32, 32, 8, 128, DType::kBF16};
}
ModelSpec ModelSpec::qwen25_7b() {
  return {"qwen2.5-7b", 28, 28, 4, 128, DType::kBF16};
}
ModelSpec ModelSpec::tiny() {
  return {"tiny", 2, 4, 2, 32, DType::kBF16};
}
ModelSpec ModelSpec::tiny_mha() {
  return {"tiny-mha", 2, 2, 2, 16, DType::kBF16};
}

std::vector<std::string> ModelSpec::preset_names() {
  return {"llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "tiny", "tiny-mha"};
}

Result<ModelSpec> ModelSpec::preset(std::string_view name) {
  if (name == "llama-3.1-8b" || name == "llama3.1-8b" || name == "llama") return llama31_8b();
  if (name == "mistral-7b" || name == "mistral") return mistral_7b();
  if (name == "qwen2.5-7b" || name == "qwen") return qwen25_7b();
  if (name == "tiny") return tiny();
  if (name == "tiny-mha") return tiny_mha();
  std::string known;
  for (const auto& n : preset_names())
    known += (known.empty() ? "" : ", ") + n;
  return Status::invalid_argument("unknown model preset '" + std::string(name) +
                                  "'; known presets: " + known);
}

}  // namespace pqkv
