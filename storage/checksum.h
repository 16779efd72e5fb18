// CRC-32C (Castagnoli) of the catalog values a store writes, and the framing
// that carries it: a sealed value is its payload followed by the CRC-32C
// (u32, little-endian) of the value's key and then its payload. The key is
// part of the sum, so a value moved under another key (a code chunk of one
// KV head or layer under another's) fails the check as a changed byte does.
// Layout: docs/formats.md. The sum is RocksDB's (its public file checksum
// generator, hardware-accelerated where the CPU has SSE4.2).
//
// Thread safety: free functions without state.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "pqkv/status.h"

namespace pqkv::storage {

// CRC-32C of the parts, concatenated (crc32c({"123456789"}) == 0xE3069283).
uint32_t crc32c(std::initializer_list<std::string_view> parts);

// `payload` followed by crc32c({key, payload}).
std::string seal_value(std::string_view key, std::string_view payload);

// The payload of a value seal_value wrote under `key`: Corruption naming the
// key when the value is shorter than its CRC or the CRC does not match (the
// value or its key was altered). The view points into `value`.
Result<std::string_view> unseal_value(std::string_view key, std::string_view value);

}  // namespace pqkv::storage
