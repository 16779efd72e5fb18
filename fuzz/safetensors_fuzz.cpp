// Fuzzes the safetensors reader: the 8-byte header length, the JSON header
// and the data offsets. Every input must give a Status, never a crash, and
// every tensor of an opened file must lie inside the file's data.
#include <cstdint>

#include "fuzz_util.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = pqkv::fuzz::scratch_dir() / "model.safetensors";
  pqkv::fuzz::write_file(path, data, size);
  auto file = pqkv::model::SafetensorsFile::open(path);
  if (!file.ok()) return 0;
  for (const auto& [name, t] : file->tensors()) {
    if (!t.supported) continue;
    // Reading every element must stay inside the mapping (ASan watches).
    float sum = 0;
    for (int64_t i = 0; i < t.numel(); ++i)
      sum += t.at(i) * 0.0f;
    if (sum != 0.0f && sum == sum) pqkv::fuzz::fail("a zero-weighted sum is not zero");
  }
  return 0;
}
