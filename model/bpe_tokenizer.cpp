#include "model/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <limits>
#include <nlohmann/json.hpp>

#include "model/mapped_file.h"

namespace pqkv::model {

// A compiled pattern; match data is made per call, so that encode is thread-safe.
struct BpeTokenizer::Pattern {
  pcre2_code* code = nullptr;
  ~Pattern() { pcre2_code_free(code); }
};

namespace {

using json = nlohmann::json;

// GPT-2's pre-tokenizer regex, which ByteLevel applies when use_regex is set.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void append_utf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xC0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *out += static_cast<char>(0xE0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// GPT-2's byte-level alphabet: each byte stands for a printable code point,
// itself where it is printable and 256 + n for the n-th other byte.
struct ByteAlphabet {
  std::array<std::string, 256> byte_to_char;
  std::array<int, 0x200> char_to_byte{};  // code point -> byte, -1 if none

  ByteAlphabet() {
    char_to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      append_utf8(cp, &byte_to_char[b]);
      char_to_byte[cp] = b;
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// Decodes the UTF-8 character at s[*i] and advances *i; 0xFFFFFFFF when invalid.
uint32_t next_code_point(std::string_view s, size_t* i) {
  const auto c = static_cast<unsigned char>(s[*i]);
  int n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || *i + n > s.size()) {
    ++*i;
    return 0xFFFFFFFF;
  }
  uint32_t cp = n == 1 ? c : c & (0x7F >> n);
  for (int k = 1; k < n; ++k)
    cp = (cp << 6) | (static_cast<unsigned char>(s[*i + k]) & 0x3F);
  *i += n;
  return cp;
}

size_t utf8_char_end(std::string_view s, size_t i) {
  ++i;
  while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80)
    ++i;
  return i;
}

Result<std::unique_ptr<BpeTokenizer::Pattern>> compile(const std::string& regex,
                                                       const std::string& where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  auto p = std::make_unique<BpeTokenizer::Pattern>();
  p->code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(regex.c_str()), regex.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
  if (p->code == nullptr) {
    std::array<PCRE2_UCHAR, 256> msg{};
    pcre2_get_error_message(error, msg.data(), msg.size());
    return Status::unimplemented(where + ": pre-tokenizer regex does not compile at offset " +
                                 std::to_string(offset) + ": " +
                                 reinterpret_cast<const char*>(msg.data()));
  }
  pcre2_jit_compile(p->code, PCRE2_JIT_COMPLETE);  // a speed-up only; matching works without
  return p;
}

// Splits every piece at the pattern's matches, keeping matches and the text
// between them as pieces of their own (Hugging Face's "Isolated" behavior).
void split_isolated(const BpeTokenizer::Pattern& pattern, std::vector<std::string>* pieces) {
  std::vector<std::string> out;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(pattern.code, nullptr);
  for (const std::string& piece : *pieces) {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
    size_t last = 0;
    size_t offset = 0;
    while (offset < piece.size()) {
      const int rc = pcre2_match(pattern.code, subject, piece.size(), offset, 0, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {
        offset = utf8_char_end(piece, ov[0]);
        continue;
      }
      if (ov[0] > last) out.emplace_back(piece.substr(last, ov[0] - last));
      out.emplace_back(piece.substr(ov[0], ov[1] - ov[0]));
      last = offset = ov[1];
    }
    if (last < piece.size()) out.emplace_back(piece.substr(last));
  }
  pcre2_match_data_free(md);
  *pieces = std::move(out);
}

std::string escape_literal(const std::string& s) {
  std::string out = "\\Q";
  for (size_t i = 0; i < s.size(); ++i) {
    if (s.compare(i, 2, "\\E") == 0) {
      out += "\\E\\\\E\\Q";
      ++i;
    } else {
      out += s[i];
    }
  }
  return out + "\\E";
}

// Ids above this are refused when config.json gives no vocab_size: far more
// than any model's vocabulary, and a table of that many pieces still fits.
constexpr int32_t kMaxTokenizerVocab = int32_t{1} << 24;

// A token id of tokenizer.json (`what` names where it sits): an integer in
// [0, limit). Anything else would index the id -> piece table out of its
// bounds or size it past memory.
Result<int32_t> read_token_id(const json& v, int32_t limit, bool limit_from_config,
                              const std::string& where, const std::string& what) {
  const bool in_range =
      v.is_number_integer() &&
      (v.is_number_unsigned() ? v.get<uint64_t>() < uint64_t(limit)
                              : v.get<int64_t>() >= 0 && v.get<int64_t>() < int64_t{limit});
  if (!in_range) {
    return Status::corruption(where + ": the id of " + what + " is " + v.dump() +
                              "; token ids must be integers in 0.." + std::to_string(limit - 1) +
                              (limit_from_config ? " (config.json's vocab_size)" : "") +
                              "; replace the file with the model's own tokenizer.json");
  }
  return v.get<int32_t>();
}

}  // namespace

BpeTokenizer::~BpeTokenizer() = default;

Result<std::unique_ptr<BpeTokenizer>> BpeTokenizer::load(const std::filesystem::path& path,
                                                         int vocab_size) {
  const std::string where = path.string();
  PQKV_ASSIGN_OR_RETURN(const std::string text, read_model_file(path));
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return Status::corruption(where + " is not a JSON object");
  }
  const int32_t limit = vocab_size > 0 ? vocab_size : kMaxTokenizerVocab;
  auto tok = std::unique_ptr<BpeTokenizer>(new BpeTokenizer());
  try {
    const json& model = doc.at("model");
    if (model.value("type", std::string()) != "BPE") {
      return Status::unimplemented(where + ": model type '" + model.value("type", std::string()) +
                                   "' is not read; pqkv reads byte-level BPE tokenizer.json "
                                   "files and SentencePiece tokenizer.model files");
    }
    if (model.value("byte_fallback", false)) {
      return Status::unimplemented(where +
                                   ": a BPE with byte_fallback (SentencePiece-style) is "
                                   "not read from tokenizer.json; use tokenizer.model");
    }
    tok->ignore_merges_ = model.value("ignore_merges", false);
    const json& vocab = model.at("vocab");
    if (!vocab.is_object()) {
      return Status::corruption(where + ": model.vocab must be an object of piece -> id");
    }
    int32_t max_id = -1;
    for (const auto& [piece, value] : vocab.items()) {
      PQKV_ASSIGN_OR_RETURN(const int32_t id, read_token_id(value, limit, vocab_size > 0, where,
                                                            "vocabulary piece '" + piece + "'"));
      tok->vocab_[piece] = id;
      max_id = std::max(max_id, id);
    }
    int32_t rank = 0;
    for (const json& m : model.at("merges")) {
      std::string key = m.is_string()
                            ? m.get<std::string>()
                            : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>();
      tok->merge_rank_.emplace(std::move(key), rank++);
    }
    if (doc.contains("added_tokens") && doc["added_tokens"].is_array()) {
      for (const json& a : doc["added_tokens"]) {
        const std::string content = a.at("content").get<std::string>();
        PQKV_ASSIGN_OR_RETURN(const int32_t id,
                              read_token_id(a.at("id"), limit, vocab_size > 0, where,
                                            "added token '" + content + "'"));
        tok->added_.emplace_back(content, id);
        max_id = std::max(max_id, id);
      }
    }
    tok->pieces_.resize(static_cast<size_t>(max_id + 1));
    tok->special_.assign(tok->pieces_.size(), false);
    for (const auto& [piece, id] : tok->vocab_)
      tok->pieces_[id] = piece;
    for (const auto& [content, id] : tok->added_)
      tok->pieces_[id] = content;
    if (doc.contains("added_tokens") && doc["added_tokens"].is_array()) {
      for (const json& a : doc["added_tokens"])
        tok->special_[a.at("id").get<int32_t>()] = a.value("special", false);
    }
    // The longest content first, so that "<|a|>x" wins over "<|a|>" at one position.
    std::stable_sort(tok->added_.begin(), tok->added_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

    const json& normalizer = doc.value("normalizer", json());
    if (!normalizer.is_null()) {
      const std::string type = normalizer.value("type", std::string());
      if (type != "NFC") {
        return Status::unimplemented(where + ": normalizer '" + type + "' is not read");
      }
    }
    // Pre-tokenizers, flattened out of a Sequence.
    std::vector<json> steps;
    const json& pre = doc.value("pre_tokenizer", json());
    if (pre.is_object() && pre.value("type", std::string()) == "Sequence") {
      for (const json& p : pre.at("pretokenizers"))
        steps.push_back(p);
    } else if (!pre.is_null()) {
      steps.push_back(pre);
    }
    bool byte_level = false;
    for (const json& p : steps) {
      const std::string type = p.value("type", std::string());
      if (type == "ByteLevel") {
        byte_level = true;
        tok->add_prefix_space_ = p.value("add_prefix_space", false);
        if (p.value("use_regex", true)) {
          PQKV_ASSIGN_OR_RETURN(auto pattern, compile(kGpt2Pattern, where));
          tok->patterns_.push_back(std::move(pattern));
        }
      } else if (type == "Split") {
        if (p.value("behavior", std::string()) != "Isolated" || p.value("invert", false)) {
          return Status::unimplemented(where +
                                       ": only Split pre-tokenizers with behavior "
                                       "Isolated (not inverted) are read");
        }
        const json& pattern = p.at("pattern");
        const std::string regex = pattern.contains("Regex")
                                      ? pattern.at("Regex").get<std::string>()
                                      : escape_literal(pattern.at("String").get<std::string>());
        PQKV_ASSIGN_OR_RETURN(auto compiled, compile(regex, where));
        tok->patterns_.push_back(std::move(compiled));
      } else {
        return Status::unimplemented(where + ": pre-tokenizer '" + type + "' is not read");
      }
    }
    if (!byte_level) {
      return Status::unimplemented(where +
                                   ": not a byte-level BPE (no ByteLevel pre-tokenizer); "
                                   "use the checkpoint's tokenizer.model");
    }
  } catch (const json::exception& e) {
    return Status::corruption(where + ": unexpected tokenizer.json layout: " + e.what());
  }
  return tok;
}

void BpeTokenizer::pre_tokenize(std::string_view text, std::vector<std::string>* pieces) const {
  pieces->clear();
  std::string first(text);
  if (add_prefix_space_ && !first.empty() && first.front() != ' ') first.insert(0, 1, ' ');
  pieces->push_back(std::move(first));
  for (const auto& p : patterns_)
    split_isolated(*p, pieces);
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>* ids) const {
  const ByteAlphabet& a = alphabet();
  std::vector<std::string> symbols;
  symbols.reserve(piece.size());
  for (char c : piece)
    symbols.push_back(a.byte_to_char[static_cast<unsigned char>(c)]);
  if (ignore_merges_) {
    std::string whole;
    for (const auto& s : symbols)
      whole += s;
    if (auto it = vocab_.find(whole); it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  // Merge the lowest-ranked adjacent pair, leftmost first, until none is a merge.
  while (symbols.size() > 1) {
    int32_t best = std::numeric_limits<int32_t>::max();
    size_t at = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = merge_rank_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        at = i;
      }
    }
    if (best == std::numeric_limits<int32_t>::max()) break;
    symbols[at] += symbols[at + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  for (const auto& s : symbols) {
    // A symbol outside the vocabulary is dropped, as Hugging Face's BPE
    // without an unknown token does.
    if (auto it = vocab_.find(s); it != vocab_.end()) ids->push_back(it->second);
  }
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  std::vector<std::string> pieces;
  const auto encode_segment = [&](std::string_view segment) {
    if (segment.empty()) return;
    pre_tokenize(segment, &pieces);
    for (const auto& p : pieces)
      encode_piece(p, &ids);
  };
  size_t pos = 0;
  while (pos < text.size()) {
    // The earliest added token, the longest at that position.
    size_t found = std::string_view::npos;
    const std::pair<std::string, int32_t>* token = nullptr;
    for (const auto& added : added_) {
      const size_t at = text.find(added.first, pos);
      if (at < found && !added.first.empty()) {
        found = at;
        token = &added;
      }
    }
    if (token == nullptr) break;
    encode_segment(text.substr(pos, found - pos));
    ids.push_back(token->second);
    pos = found + token->first.size();
  }
  encode_segment(text.substr(pos));
  return ids;
}

std::string BpeTokenizer::decode(int32_t token, int32_t /*previous*/) const {
  if (token < 0 || static_cast<size_t>(token) >= pieces_.size() || special_[token]) return {};
  const std::string& piece = pieces_[token];
  if (vocab_.count(piece) == 0) return piece;  // an added token: its content as written
  const ByteAlphabet& a = alphabet();
  std::string bytes;
  for (size_t i = 0; i < piece.size();) {
    const uint32_t cp = next_code_point(piece, &i);
    if (cp < a.char_to_byte.size() && a.char_to_byte[cp] >= 0) {
      bytes += static_cast<char>(a.char_to_byte[cp]);
    }
  }
  return bytes;
}

}  // namespace pqkv::model
