// The attention geometry pqkv stores keys and values for.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "pqkv/dtype.h"
#include "pqkv/export.h"
#include "pqkv/status.h"

namespace pqkv {

struct PQKV_API ModelSpec {
  std::string name = "custom";
  int num_layers = 0;
  int num_q_heads = 0;   // query heads per layer
  int num_kv_heads = 0;  // key/value heads per layer; divides num_q_heads (GQA)
  int head_dim = 0;
  DType dtype = DType::kBF16;  // how keys and values are stored

  int group_size() const { return num_q_heads / num_kv_heads; }
  // Bytes of one stored (layer, KV head, token) row: K then V.
  int64_t row_bytes() const { return 2LL * head_dim * dtype_size(dtype); }
  Status validate() const;
  std::string to_string() const;

  static ModelSpec llama31_8b();  // 32 layers, 32 q heads, 8 KV heads, d=128
  static ModelSpec mistral_7b();  // 32, 32, 8, 128
  static ModelSpec qwen25_7b();   // 28, 28, 4, 128
  static ModelSpec tiny();        // 2 layers, 4 q heads, 2 KV heads, d=32: unit tests
  static ModelSpec tiny_mha();    // 2 layers, 2 q heads, 2 KV heads, d=16: no grouping

  // Looks a preset up by name: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha.
  static Result<ModelSpec> preset(std::string_view name);
  static std::vector<std::string> preset_names();
};

}  // namespace pqkv
