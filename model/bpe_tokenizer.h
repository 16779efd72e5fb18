// Hugging Face tokenizer.json with a byte-level BPE model, as Llama 3, Qwen2
// and GPT-2 checkpoints ship it: added (special) tokens split out first, then
// the pre-tokenizer's regex (through PCRE2, for the Unicode classes these
// patterns use), each piece mapped to byte-level characters and merged by
// merge rank.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model/tokenizer.h"
#include "pqkv/status.h"

namespace pqkv::model {

class BpeTokenizer final : public Tokenizer {
 public:
  // Reads tokenizer.json. Supported: model BPE (merges as "a b" strings or
  // [a, b] pairs, ignore_merges); pre_tokenizer ByteLevel (GPT-2's regex when
  // use_regex, add_prefix_space), Split with a Regex or String pattern and
  // behavior Isolated, or a Sequence of those; normalizer null or NFC (the
  // text is taken as given: text already in NFC, as nearly all is, encodes
  // the same); added_tokens. Unimplemented for any other model, pre-tokenizer
  // or normalizer, naming it; Corruption for JSON that does not parse and for
  // a token id that is not an integer in 0..vocab_size-1 (config.json's
  // vocab_size; 0 = unknown, then ids up to 2^24 - 1 are taken).
  static Result<std::unique_ptr<BpeTokenizer>> load(const std::filesystem::path& path,
                                                    int vocab_size = 0);
  ~BpeTokenizer() override;

  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  // Thread-safe (the compiled patterns are only read; match data is per call).
  std::vector<int32_t> encode(std::string_view text) const override;
  // The bytes of `token`; special added tokens decode to nothing.
  std::string decode(int32_t token, int32_t previous) const override;

  struct Pattern;  // a compiled pre-tokenizer regex (PCRE2)

 private:
  BpeTokenizer() = default;
  // Appends the ids of one pre-tokenized piece.
  void encode_piece(std::string_view piece, std::vector<int32_t>* ids) const;
  void pre_tokenize(std::string_view text, std::vector<std::string>* pieces) const;

  std::vector<std::string> pieces_;  // id -> byte-level string (or added content)
  std::vector<bool> special_;        // id -> a special added token
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "a b" -> rank
  std::vector<std::pair<std::string, int32_t>> added_;   // content, id; longest first
  std::vector<std::unique_ptr<Pattern>> patterns_;       // applied in order
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
};

}  // namespace pqkv::model
