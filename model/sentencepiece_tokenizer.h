// SentencePiece tokenizer.model (Llama 2, Mistral), read and run by the
// SentencePiece library.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.h"
#include "pqkv/status.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace pqkv::model {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Corruption when the file is not a SentencePiece model.
  static Result<std::unique_ptr<SentencePieceTokenizer>> load(const std::filesystem::path& path);
  ~SentencePieceTokenizer() override;

  int vocab_size() const override;
  // The model's own normalization and dummy prefix; no BOS.
  std::vector<int32_t> encode(std::string_view text) const override;
  // The text `token` adds after `previous`: its leading space kept except at
  // the start of the text (-1, or after a control token such as BOS).
  std::string decode(int32_t token, int32_t previous) const override;

 private:
  SentencePieceTokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace pqkv::model
