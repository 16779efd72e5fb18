#include "model/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <queue>

#include "model/bpe_tokenizer.h"
#include "model/mapped_file.h"
#include "model/sentencepiece_tokenizer.h"

namespace pqkv::model {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text)
    ids.push_back(static_cast<uint8_t>(c));
  return ids;
}

std::string ByteTokenizer::decode(int32_t token, int32_t /*previous*/) const {
  if (token < 0 || token > 255) return {};
  return std::string(1, static_cast<char>(token));
}

Result<std::unique_ptr<Llama2cTokenizer>> Llama2cTokenizer::load(const std::filesystem::path& path,
                                                                 int vocab_size, int32_t bos_id) {
  PQKV_RETURN_IF_ERROR(check_model_file(path));
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::io_error("cannot read " + path.string());
  const auto truncated = [&](int token) {
    return Status::corruption(path.string() + " is truncated at token " + std::to_string(token) +
                              " of " + std::to_string(vocab_size) + " (config.json's vocab_size)");
  };
  int32_t max_len = 0;
  if (!in.read(reinterpret_cast<char*>(&max_len), 4)) return truncated(0);
  auto tok = std::unique_ptr<Llama2cTokenizer>(new Llama2cTokenizer());
  tok->bos_id_ = bos_id;
  tok->pieces_.resize(vocab_size);
  tok->scores_.resize(vocab_size);
  for (int i = 0; i < vocab_size; ++i) {
    int32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&tok->scores_[i]), 4) ||
        !in.read(reinterpret_cast<char*>(&len), 4)) {
      return truncated(i);
    }
    if (len < 0 || len > (1 << 16)) {
      return Status::corruption(path.string() + ": token " + std::to_string(i) +
                                " has an implausible length " + std::to_string(len));
    }
    tok->pieces_[i].resize(len);
    if (len > 0 && !in.read(tok->pieces_[i].data(), len)) return truncated(i);
    // The first id wins when a piece is listed twice.
    tok->ids_.emplace(tok->pieces_[i], i);
  }
  tok->byte_base_ = tok->lookup("<0x00>");
  if (tok->byte_base_ >= 0 && tok->byte_base_ + 255 >= vocab_size) tok->byte_base_ = -1;
  return tok;
}

int32_t Llama2cTokenizer::lookup(std::string_view piece) const {
  auto it = ids_.find(std::string(piece));
  return it == ids_.end() ? -1 : it->second;
}

std::vector<int32_t> Llama2cTokenizer::encode(std::string_view text) const {
  // Symbols start as UTF-8 characters (or their bytes where the vocabulary
  // lacks the character), kept in a doubly linked list; pairs are merged best
  // score first, leftmost on ties, through a heap with lazy invalidation.
  struct Symbol {
    int32_t id;
    int prev;
    int next;
    bool alive;
  };
  std::vector<Symbol> sym;
  const auto push = [&](int32_t id) {
    const int i = static_cast<int>(sym.size());
    sym.push_back({id, i - 1, i + 1, true});
  };
  if (!text.empty()) {
    const int32_t space = lookup(" ");
    if (space >= 0) push(space);
  }
  size_t pos = 0;
  while (pos < text.size()) {
    const auto lead = static_cast<uint8_t>(text[pos]);
    size_t len = 1;
    if ((lead & 0xE0) == 0xC0) len = 2;
    if ((lead & 0xF0) == 0xE0) len = 3;
    if ((lead & 0xF8) == 0xF0) len = 4;
    len = std::min(len, text.size() - pos);
    const std::string_view ch = text.substr(pos, len);
    const int32_t id = lookup(ch);
    if (id >= 0) {
      push(id);
    } else {
      for (char b : ch) {
        // Without byte pieces an unknown byte becomes id 0 (<unk> by convention).
        push(byte_base_ >= 0 ? byte_base_ + static_cast<uint8_t>(b) : 0);
      }
    }
    pos += len;
  }
  if (sym.empty()) return {};
  sym.back().next = -1;

  struct Candidate {
    float score;
    int left;  // index of the left symbol; list order equals index order
    int32_t left_id;
    int32_t right_id;
    int32_t merged;
  };
  const auto worse = [](const Candidate& a, const Candidate& b) {
    return a.score != b.score ? a.score < b.score : a.left > b.left;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(worse)> heap(worse);
  std::string buf;
  const auto consider = [&](int left) {
    if (left < 0) return;
    const int right = sym[left].next;
    if (right < 0) return;
    buf = pieces_[sym[left].id];
    buf += pieces_[sym[right].id];
    const int32_t merged = lookup(buf);
    if (merged >= 0) heap.push({scores_[merged], left, sym[left].id, sym[right].id, merged});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i)
    consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& l = sym[c.left];
    // Stale when either side changed since the candidate was pushed.
    if (!l.alive || l.id != c.left_id || l.next < 0 || sym[l.next].id != c.right_id) continue;
    Symbol& r = sym[l.next];
    l.id = c.merged;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = c.left;
    consider(l.prev);
    consider(c.left);
  }
  std::vector<int32_t> ids;
  for (int i = 0; i >= 0; i = sym[i].next)
    ids.push_back(sym[i].id);
  return ids;
}

std::string Llama2cTokenizer::decode(int32_t token, int32_t previous) const {
  if (token < 0 || token >= vocab_size()) return {};
  std::string_view piece = pieces_[token];
  if (previous == bos_id_ && bos_id_ >= 0 && !piece.empty() && piece.front() == ' ') {
    piece.remove_prefix(1);
  }
  unsigned byte = 0;
  if (piece.size() == 6 && piece.substr(0, 3) == "<0x" && piece.back() == '>' &&
      std::sscanf(std::string(piece.substr(3, 2)).c_str(), "%2x", &byte) == 1) {
    return std::string(1, static_cast<char>(byte));
  }
  return std::string(piece);
}

Status no_tokenizer_error(const std::filesystem::path& dir, std::string_view passed_over,
                          std::string_view what_to_do) {
  std::string message = "the model folder " + dir.string() +
                        " has no tokenizer pqkv reads (tokenizer.json with a byte-level BPE, "
                        "tokenizer.model, tokenizer.bin, or a 256-token byte vocabulary)";
  if (!passed_over.empty()) {
    message += "; its tokenizer.json was passed over: ";
    message += passed_over;
  }
  message += "; ";
  message += what_to_do;
  return Status::failed_precondition(message);
}

Result<std::unique_ptr<Tokenizer>> load_tokenizer(const std::filesystem::path& dir,
                                                  const LlamaConfig& config,
                                                  std::string* passed_over) {
  std::error_code ec;
  // tokenizer.json first when it holds a byte-level BPE; Llama 2 style
  // checkpoints ship a SentencePiece-style tokenizer.json beside their
  // tokenizer.model, which is read instead.
  const auto hf = dir / "tokenizer.json";
  Status hf_status = ok_status();
  if (std::filesystem::exists(hf, ec)) {
    auto tok = BpeTokenizer::load(hf, config.vocab_size);
    if (tok.ok()) return std::unique_ptr<Tokenizer>(std::move(tok).value());
    hf_status = tok.status();
  }
  const auto sp = dir / "tokenizer.model";
  if (std::filesystem::exists(sp, ec)) {
    auto tok = SentencePieceTokenizer::load(sp);
    if (!tok.ok()) return tok.status();
    return std::unique_ptr<Tokenizer>(std::move(tok).value());
  }
  if (!hf_status.ok() && hf_status.code() != StatusCode::kUnimplemented) return hf_status;
  const auto bin = dir / "tokenizer.bin";
  if (std::filesystem::exists(bin, ec)) {
    auto tok = Llama2cTokenizer::load(bin, config.vocab_size, config.bos_token_id.value_or(-1));
    if (!tok.ok()) return tok.status();
    return std::unique_ptr<Tokenizer>(std::move(tok).value());
  }
  if (config.vocab_size == 256) return std::unique_ptr<Tokenizer>(new ByteTokenizer());
  if (passed_over != nullptr && !hf_status.ok()) *passed_over = hf_status.message();
  return std::unique_ptr<Tokenizer>();
}

}  // namespace pqkv::model
