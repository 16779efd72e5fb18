// Fuzzes model.safetensors.index.json: the weight map that names a sharded
// checkpoint's files. The first byte picks whether a real shard is present.
#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz_util.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto& dir = pqkv::fuzz::scratch_dir();
  static const bool written = [&] {
    // A valid one-tensor shard that an index may name.
    const char header[] = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    std::string bytes(8, '\0');
    const uint64_t len = sizeof(header) - 1;
    std::memcpy(bytes.data(), &len, 8);
    bytes += std::string(header, len) + std::string(8, '\0');
    pqkv::fuzz::write_file(dir / "shard.safetensors",
                           reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    return true;
  }();
  static_cast<void>(written);
  pqkv::fuzz::write_file(dir / "model.safetensors.index.json", data + 1, size - 1);
  auto files = pqkv::model::WeightFiles::open_dir(dir);
  if (files.ok() && (data[0] & 1)) {
    auto w = files->get("w", {2});
    if (w.ok() && (*w)->at(1) != 0.0f) pqkv::fuzz::fail("the shard's tensor reads wrong");
  }
  return 0;
}
