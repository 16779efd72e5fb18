#include "model/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <cstdio>

#include "model/mapped_file.h"

namespace pqkv::model {

SentencePieceTokenizer::SentencePieceTokenizer()
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

Result<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::load(
    const std::filesystem::path& path) {
  PQKV_RETURN_IF_ERROR(check_model_file(path));
  auto tok = std::unique_ptr<SentencePieceTokenizer>(new SentencePieceTokenizer());
  const auto s = tok->sp_->Load(path.string());
  if (!s.ok()) {
    return Status::corruption("cannot read " + path.string() +
                              " as a SentencePiece model: " + s.ToString());
  }
  return tok;
}

int SentencePieceTokenizer::vocab_size() const {
  return sp_->GetPieceSize();
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  if (!sp_->Encode(std::string(text), &ids).ok()) return {};
  return {ids.begin(), ids.end()};
}

std::string SentencePieceTokenizer::decode(int32_t token, int32_t previous) const {
  if (token < 0 || token >= sp_->GetPieceSize() || sp_->IsControl(token)) return {};
  if (sp_->IsByte(token)) {
    // "<0xNN>": the byte itself, so that a character split over byte pieces
    // comes out whole once its bytes are joined.
    unsigned byte = 0;
    if (std::sscanf(sp_->IdToPiece(token).c_str(), "<0x%2X>", &byte) == 1) {
      return std::string(1, static_cast<char>(byte));
    }
  }
  if (previous < 0 || previous >= sp_->GetPieceSize() || sp_->IsControl(previous)) {
    return sp_->DecodeIds({token});
  }
  // The piece's text after `previous`: the decoder drops a leading space at
  // the start of the text only, so decode the pair and take off the first.
  const std::string both = sp_->DecodeIds({previous, token});
  const std::string first = sp_->DecodeIds({previous});
  if (both.compare(0, first.size(), first) == 0) return both.substr(first.size());
  return sp_->DecodeIds({token});
}

}  // namespace pqkv::model
