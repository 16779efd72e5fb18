// The CRC-32C that seals catalog values (storage/checksum.h): the standard
// check values, parts summed as their concatenation, and every change to a
// sealed value or its key refused as Corruption naming the key.
#include "storage/checksum.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "test_util.h"

namespace pqkv::storage {
namespace {

TEST(ChecksumTest, Crc32cMatchesTheStandardCheckValues) {
  // RFC 3720, B.4, and the catalogue of parametrised CRCs ("123456789").
  EXPECT_EQ(crc32c({"123456789"}), 0xE3069283u);
  EXPECT_EQ(crc32c({""}), 0u);
  EXPECT_EQ(crc32c({std::string(32, '\0')}), 0x8A9136AAu);
  EXPECT_EQ(crc32c({std::string(32, '\xff')}), 0x62A8AB43u);
  EXPECT_EQ(crc32c({"1234", "", "56789"}), 0xE3069283u);
}

TEST(ChecksumTest, ASealedValueOpensOnlyUnderItsKeyAndUnchanged) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (size_t size : {size_t{0}, size_t{1}, size_t{17}, size_t{4096}}) {
    std::string payload(size, '\0');
    for (char& c : payload)
      c = static_cast<char>(rng());
    const std::string key = "seq/61/codes/000001/0/000002/0000000000";
    const std::string sealed = seal_value(key, payload);
    ASSERT_EQ(sealed.size(), size + 4);
    auto back = unseal_value(key, sealed);
    PQKV_ASSERT_OK(back);
    EXPECT_EQ(*back, payload);
    // Under another key (a chunk of another KV head): refused.
    auto moved = unseal_value("seq/61/codes/000001/0/000003/0000000000", sealed);
    EXPECT_EQ(moved.status().code(), StatusCode::kCorruption);
    EXPECT_NE(moved.status().message().find("CRC-32C"), std::string::npos);
    // One bit changed anywhere, the sum included: refused, naming the key.
    for (int i = 0; i < 16; ++i) {
      std::string d = sealed;
      const size_t at = rng() % d.size();
      d[at] = static_cast<char>(d[at] ^ (1 << (rng() % 8)));
      auto r = unseal_value(key, d);
      EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << "bit flipped at " << at;
      EXPECT_NE(r.status().message().find(key), std::string::npos) << r.status().to_string();
    }
  }
  for (const std::string& shorter : {std::string(), std::string("abc")}) {
    auto r = unseal_value("k", shorter);
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
    EXPECT_NE(r.status().message().find("too few"), std::string::npos) << r.status().to_string();
  }
}

}  // namespace
}  // namespace pqkv::storage
