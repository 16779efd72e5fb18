// Fuzzes config.json parsing: every input gives a config or a Status, and a
// config that parses has a geometry a model can be built with.
#include <cstdint>
#include <string_view>

#include "fuzz_util.h"
#include "model/llama_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto config = pqkv::model::LlamaConfig::parse(text);
  if (!config.ok()) return 0;
  const auto& c = *config;
  if (c.num_layers <= 0 || c.num_q_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 ||
      c.hidden_size <= 0 || c.vocab_size <= 0) {
    pqkv::fuzz::fail("a parsed config has a non-positive size");
  }
  if (c.num_q_heads % c.num_kv_heads != 0) pqkv::fuzz::fail("q heads not a multiple of kv heads");
  return 0;
}
