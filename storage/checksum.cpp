#include "storage/checksum.h"

#include <rocksdb/file_checksum.h>

#include <cstdio>
#include <cstring>
#include <memory>

namespace pqkv::storage {
namespace {

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

}  // namespace

uint32_t crc32c(std::initializer_list<std::string_view> parts) {
  static const std::shared_ptr<rocksdb::FileChecksumGenFactory> factory =
      rocksdb::GetFileChecksumGenCrc32cFactory();
  std::unique_ptr<rocksdb::FileChecksumGenerator> gen =
      factory->CreateFileChecksumGenerator(rocksdb::FileChecksumGenContext());
  for (std::string_view p : parts)
    gen->Update(p.data(), p.size());
  gen->Finalize();
  // Four bytes, most significant first.
  const std::string sum = gen->GetChecksum();
  uint32_t v = 0;
  for (size_t i = 0; i < 4 && i < sum.size(); ++i)
    v = (v << 8) | static_cast<unsigned char>(sum[i]);
  return v;
}

std::string seal_value(std::string_view key, std::string_view payload) {
  const uint32_t sum = crc32c({key, payload});
  std::string out(payload);
  out.append(reinterpret_cast<const char*>(&sum), sizeof(sum));
  return out;
}

Result<std::string_view> unseal_value(std::string_view key, std::string_view value) {
  if (value.size() < sizeof(uint32_t)) {
    return Status::corruption("catalog entry " + std::string(key) + " holds " +
                              std::to_string(value.size()) + " bytes, too few for its CRC-32C");
  }
  const std::string_view payload = value.substr(0, value.size() - sizeof(uint32_t));
  uint32_t stored = 0;
  std::memcpy(&stored, value.data() + payload.size(), sizeof(stored));
  const uint32_t computed = crc32c({key, payload});
  if (stored != computed) {
    return Status::corruption("catalog entry " + std::string(key) +
                              " fails its CRC-32C check (stored " + hex32(stored) + ", computed " +
                              hex32(computed) + "): its bytes or its key were altered on disk");
  }
  return payload;
}

}  // namespace pqkv::storage
