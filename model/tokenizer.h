// Text <-> token ids. Formats: Hugging Face tokenizer.json with a byte-level
// BPE (model/bpe_tokenizer.h), SentencePiece tokenizer.model
// (model/sentencepiece_tokenizer.h), llama2.c's tokenizer.bin (vocabulary
// strings with merge scores, BPE merging by best score, byte fallback through
// "<0xNN>" pieces), and byte-level models (vocab 256, id = byte).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model/llama_config.h"
#include "pqkv/status.h"

namespace pqkv::model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual int vocab_size() const = 0;
  // Encodes text without BOS; the caller adds one where the model has one.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // The bytes `token` stands for when it follows `previous` (-1 at the start).
  virtual std::string decode(int32_t token, int32_t previous) const = 0;
};

class ByteTokenizer final : public Tokenizer {
 public:
  int vocab_size() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(int32_t token, int32_t previous) const override;
};

class Llama2cTokenizer final : public Tokenizer {
 public:
  // Reads tokenizer.bin: int32 max_token_length, then per token a float32
  // score, an int32 byte length and the bytes. `bos_id` is the id after which
  // a piece's leading space is dropped (-1: none).
  static Result<std::unique_ptr<Llama2cTokenizer>> load(const std::filesystem::path& path,
                                                        int vocab_size, int32_t bos_id);

  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  // A leading space is added to non-empty text (SentencePiece's dummy prefix).
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(int32_t token, int32_t previous) const override;

 private:
  int32_t lookup(std::string_view piece) const;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> ids_;
  int32_t byte_base_ = -1;  // id of "<0x00>"; bytes 0..255 follow it
  int32_t bos_id_ = -1;
};

// The tokenizer of a model folder, the first that applies: tokenizer.json
// holding a byte-level BPE; tokenizer.model (SentencePiece); tokenizer.bin;
// bytes when the vocabulary has 256 entries; otherwise null (token ids only).
// A tokenizer.json of another kind is passed over (Unimplemented is not an
// error here; when no tokenizer comes back, *passed_over, when given, gets
// why); a file that is there but does not parse is Corruption.
Result<std::unique_ptr<Tokenizer>> load_tokenizer(const std::filesystem::path& dir,
                                                  const LlamaConfig& config,
                                                  std::string* passed_over = nullptr);

// The error of a text operation on the model folder `dir`, which has no
// tokenizer pqkv reads: the formats it reads, why its tokenizer.json was
// passed over (`passed_over`, when not empty) and `what_to_do`.
Status no_tokenizer_error(const std::filesystem::path& dir, std::string_view passed_over,
                          std::string_view what_to_do);

}  // namespace pqkv::model
