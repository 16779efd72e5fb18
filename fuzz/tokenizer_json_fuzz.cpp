// Fuzzes tokenizer.json loading (byte-level BPE) and encoding: every input
// gives a tokenizer or a Status, never a crash, and a tokenizer that loads
// encodes text into ids below its vocabulary size that decode without a crash.
#include <cstdint>
#include <string_view>

#include "fuzz_util.h"
#include "model/bpe_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = pqkv::fuzz::scratch_dir() / "tokenizer.json";
  pqkv::fuzz::write_file(path, data, size);
  // A small vocabulary (as config.json would give) bounds the id table.
  auto tok = pqkv::model::BpeTokenizer::load(path, /*vocab_size=*/4096);
  if (!tok.ok()) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data), size < 64 ? size : 64);
  int32_t previous = -1;
  for (int32_t id : (*tok)->encode(text)) {
    if (id < 0 || id >= (*tok)->vocab_size()) pqkv::fuzz::fail("an encoded id is out of range");
    (void)(*tok)->decode(id, previous);
    previous = id;
  }
  return 0;
}
