#include "pqkv/options.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>

namespace pqkv {
namespace {

bool parse_int(std::string_view s, int64_t* out) {
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

bool parse_double(std::string_view s, double* out) {
  if (s.empty()) return false;
  std::string copy(s);
  char* end = nullptr;
  *out = std::strtod(copy.c_str(), &end);
  return end == copy.c_str() + copy.size();
}

}  // namespace

Status PqConfig::validate(int head_dim) const {
  if (bits < 1 || bits > 8) {
    return Status::invalid_argument("PQ bits must be 1..8 (codes are one byte), got " +
                                    std::to_string(bits));
  }
  const int mm = resolved_m(head_dim);
  if (m < 0 || head_dim % mm != 0) {
    return Status::invalid_argument("PQ sub-spaces m=" + std::to_string(m) +
                                    " must divide head_dim=" + std::to_string(head_dim));
  }
  if (head_dim / mm < 2) {
    return Status::invalid_argument(
        "PQ m=" + std::to_string(mm) +
        " leaves fewer than 2 dims per sub-space; use m <= " + std::to_string(head_dim / 2));
  }
  if (kmeans_iters < 1) return Status::invalid_argument("kmeans_iters must be >= 1");
  if (max_train_points_per_centroid < 0) {
    return Status::invalid_argument("max_train_points_per_centroid must be >= 0");
  }
  return ok_status();
}

std::string PqConfig::to_string() const {
  return (m > 0 ? "m=" + std::to_string(m) : std::string("m=d/8")) + ",b=" + std::to_string(bits);
}

PqConfig PqConfig::pqcache() {
  PqConfig c;
  c.m = 2;
  c.bits = 6;
  return c;
}

Result<PqConfig> PqConfig::parse(std::string_view text) {
  if (text == "pqcache") return pqcache();
  if (text == "default") return pqkv_default();
  PqConfig c;
  bool have_m = false;
  bool have_b = false;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    const auto part = text.substr(pos, comma - pos);
    int64_t v = 0;
    const auto repeated = [&](const char* key) {
      return Status::invalid_argument("PQ setting '" + std::string(text) + "' gives " + key +
                                      " twice: give each of m= and b= once");
    };
    if (part.substr(0, 2) == "m=" && parse_int(part.substr(2), &v)) {
      if (have_m) return repeated("m=");
      // 0 would mean "the default" to the PQ codec: a setting names its m.
      if (v < 1) {
        return Status::invalid_argument("PQ setting '" + std::string(text) +
                                        "': m must be at least 1 (sub-spaces per key)");
      }
      c.m = static_cast<int>(v);
      have_m = true;
    } else if (part.substr(0, 2) == "b=" && parse_int(part.substr(2), &v)) {
      if (have_b) return repeated("b=");
      c.bits = static_cast<int>(v);
      have_b = true;
    } else {
      return Status::invalid_argument("cannot parse PQ setting '" + std::string(text) +
                                      "': use pqcache, default, or m=M,b=B (e.g. m=4,b=8)");
    }
    pos = comma + 1;
  }
  if (!have_m || !have_b) {
    return Status::invalid_argument("PQ setting '" + std::string(text) + "' needs both m= and b=");
  }
  return c;
}

int64_t TokenCount::resolve(int64_t context_length) const {
  const auto from_ratio =
      static_cast<int64_t>(std::ceil(ratio * static_cast<double>(context_length)));
  return std::max(tokens, from_ratio);
}

Status TokenCount::validate(const char* what) const {
  if (tokens < 0) {
    return Status::invalid_argument(std::string(what) + " must be >= 0 tokens, got " +
                                    std::to_string(tokens));
  }
  // Written so that NaN fails too: every comparison with NaN is false.
  if (!(ratio >= 0.0 && ratio <= 1.0)) {
    return Status::invalid_argument(
        std::string(what) + " ratio must be a number within 0..1, got " + std::to_string(ratio));
  }
  return ok_status();
}

namespace {

// One term of a token count: an integer count, a percentage, or a decimal
// fraction strictly below 1. Only digits, one '.', and a final '%' are read,
// so NaN, Inf, signs and exponents never parse.
enum class TermKind { kCount, kRatio };

bool parse_count_term(std::string_view s, TermKind* kind, int64_t* tokens, double* ratio) {
  if (s.empty()) return false;
  const bool percent = s.back() == '%';
  if (percent) s.remove_suffix(1);
  if (s.empty()) return false;
  const size_t dot = s.find('.');
  for (size_t i = 0; i < s.size(); ++i) {
    if (i == dot) continue;
    if (s[i] < '0' || s[i] > '9') return false;
  }
  // "1." and ".": a dot needs digits on both sides.
  if (dot != std::string_view::npos && (dot == 0 || dot + 1 == s.size())) return false;
  if (percent) {
    double pct = 0;
    if (!parse_double(s, &pct) || pct > 100.0) return false;
    *kind = TermKind::kRatio;
    *ratio = pct / 100.0;
    return true;
  }
  if (dot == std::string_view::npos) {
    *kind = TermKind::kCount;
    return parse_int(s, tokens);
  }
  // A fraction: below 1, so "1.0" (one token or all of them?) is refused.
  double r = 0;
  if (!parse_double(s, &r) || r >= 1.0) return false;
  *kind = TermKind::kRatio;
  *ratio = r;
  return true;
}

}  // namespace

Result<TokenCount> TokenCount::parse(std::string_view text) {
  const auto bad = [&] {
    return Status::invalid_argument(
        "cannot read token count '" + std::string(text) +
        "': write a count of tokens as an integer (512), a ratio of the context as a "
        "percentage (5%, at most 100%) or a fraction below 1 (0.05), or a count and a ratio "
        "joined by '+' (64+5%: the larger of the two)");
  };
  TokenCount c;
  const size_t plus = text.find('+');
  if (plus == std::string_view::npos) {
    TermKind kind{};
    if (!parse_count_term(text, &kind, &c.tokens, &c.ratio)) return bad();
    return c;
  }
  TermKind first{};
  TermKind second{};
  int64_t tokens[2] = {0, 0};
  double ratios[2] = {0, 0};
  if (!parse_count_term(text.substr(0, plus), &first, &tokens[0], &ratios[0]) ||
      !parse_count_term(text.substr(plus + 1), &second, &tokens[1], &ratios[1]) ||
      first == second) {
    return bad();
  }
  const int count_at = first == TermKind::kCount ? 0 : 1;
  c.tokens = tokens[count_at];
  c.ratio = ratios[1 - count_at];
  return c;
}

std::string TokenCount::to_string() const {
  if (ratio == 0) return std::to_string(tokens);
  const std::string pct = std::to_string(ratio * 100.0);
  std::string r = pct.substr(0, pct.find_last_not_of('0') + 1);
  if (r.back() == '.') r.pop_back();
  return tokens > 0 ? std::to_string(tokens) + "+" + r + "%" : r + "%";
}

BudgetPolicy::Counts BudgetPolicy::resolve(int64_t length, int64_t prefill_length) const {
  Counts c;
  if (length <= 0) return c;
  c.sink = std::min(sink.resolve(length), length);
  int64_t window_n = 0;
  int64_t topk_n = 0;
  if (fixed_at_prefill) {
    const int64_t base =
        std::max<int64_t>(0, prefill_length - std::min(sink.tokens, prefill_length));
    window_n = window.resolve(base);
    topk_n = top_k.resolve(base);
  } else {
    window_n = window.resolve(length);
    topk_n = top_k.resolve(length);
  }
  // The newest token is always attended: it is the first token of the window.
  c.window = std::clamp<int64_t>(window_n, std::min<int64_t>(1, length - c.sink), length - c.sink);
  c.top_k = std::clamp<int64_t>(topk_n, 0, length - c.sink - c.window);
  return c;
}

Status BudgetPolicy::validate() const {
  PQKV_RETURN_IF_ERROR(sink.validate("budget sink"));
  PQKV_RETURN_IF_ERROR(window.validate("budget window"));
  PQKV_RETURN_IF_ERROR(top_k.validate("budget top_k"));
  return ok_status();
}

std::string BudgetPolicy::to_string() const {
  return "sink=" + sink.to_string() + " window=" + window.to_string() +
         " top_k=" + top_k.to_string() + (fixed_at_prefill ? " (fixed at prefill)" : "");
}

BudgetPolicy BudgetPolicy::ratio_of_context(double ratio) {
  BudgetPolicy b;
  b.window = {0, ratio / 2};
  b.top_k = {0, ratio / 2};
  return b;
}

BudgetPolicy BudgetPolicy::pqcache(double c, double r) {
  BudgetPolicy b;
  b.sink = {32, 0.0};
  b.window = {0, c * r};
  b.top_k = {0, c * (1 - r)};
  b.fixed_at_prefill = true;
  return b;
}

BudgetPolicy BudgetPolicy::everything() {
  BudgetPolicy b;
  b.sink = {0, 0.0};
  b.window = {0, 1.0};
  b.top_k = {0, 0.0};
  return b;
}

const char* gqa_aggregation_name(GqaAggregation a) {
  return a == GqaAggregation::kMax ? "max" : "softmax-sum";
}

Result<GqaAggregation> parse_gqa_aggregation(std::string_view text) {
  if (text == "softmax-sum" || text == "sum") return GqaAggregation::kSoftmaxSum;
  if (text == "max") return GqaAggregation::kMax;
  return Status::invalid_argument("unknown GQA aggregation '" + std::string(text) +
                                  "': use softmax-sum or max");
}

const char* key_code_name(KeyCode code) {
  switch (code) {
    case KeyCode::kPq:
      return "pq";
    case KeyCode::kInt8:
      return "int8";
    case KeyCode::kInt4:
      return "int4";
    case KeyCode::kExact:
      return "exact";
  }
  return "unknown";
}

Result<KeyCode> parse_key_code(std::string_view text) {
  if (text == "pq") return KeyCode::kPq;
  if (text == "int8") return KeyCode::kInt8;
  if (text == "int4") return KeyCode::kInt4;
  if (text == "exact" || text == "oracle") return KeyCode::kExact;
  return Status::invalid_argument("unknown key code '" + std::string(text) +
                                  "': use pq, int8, int4 or exact");
}

Status SelectionConfig::validate() const {
  if (candidates < 0 || candidates > kMaxCandidates) {
    return Status::invalid_argument("selection candidates (C) must be 0 (one stage) to " +
                                    std::to_string(kMaxCandidates) + ", got " +
                                    std::to_string(candidates));
  }
  return ok_status();
}

std::string SelectionConfig::to_string() const {
  if (is_oracle()) return "oracle";
  std::string s = key_code_name(code);
  if (two_stage()) {
    s += "+";
    s += key_code_name(rerank);
    s += ':';
    s += std::to_string(candidates);
  }
  return s;
}

SelectionConfig SelectionConfig::oracle() {
  SelectionConfig c;
  c.code = KeyCode::kExact;
  return c;
}

SelectionConfig SelectionConfig::pq() {
  SelectionConfig c;
  c.code = KeyCode::kPq;
  return c;
}

Result<SelectionConfig> SelectionConfig::parse(std::string_view text) {
  const auto bad = [&] {
    return Status::invalid_argument(
        "cannot parse selection '" + std::string(text) +
        "': use oracle, pq, int8, int4, exact, or FIRST+RERANK:C for two stages (e.g. pq+int8:4)");
  };
  SelectionConfig c;
  const size_t plus = text.find('+');
  if (plus == std::string_view::npos) {
    auto code = parse_key_code(text);
    if (!code.ok()) return bad();
    c.code = *code;
    return c;
  }
  const size_t colon = text.find(':', plus);
  if (colon == std::string_view::npos) return bad();
  auto first = parse_key_code(text.substr(0, plus));
  auto second = parse_key_code(text.substr(plus + 1, colon - plus - 1));
  int64_t candidates = 0;
  if (!first.ok() || !second.ok() || !parse_int(text.substr(colon + 1), &candidates)) {
    return bad();
  }
  if (candidates < 1 || candidates > kMaxCandidates) {
    return Status::invalid_argument("selection '" + std::string(text) +
                                    "': C, the candidates kept per top-K token, must be 1 to " +
                                    std::to_string(kMaxCandidates) + ", got " +
                                    std::to_string(candidates));
  }
  c.code = *first;
  c.rerank = *second;
  c.candidates = static_cast<int>(candidates);
  return c;
}

Status SequenceOptions::validate(const ModelSpec& spec) const {
  PQKV_RETURN_IF_ERROR(pq.validate(spec.head_dim));
  PQKV_RETURN_IF_ERROR(selection.validate());
  PQKV_RETURN_IF_ERROR(budget.validate());
  if (aggregation != GqaAggregation::kSoftmaxSum && aggregation != GqaAggregation::kMax) {
    return Status::invalid_argument("unknown GQA aggregation code " +
                                    std::to_string(static_cast<int>(aggregation)) +
                                    ": use softmax-sum or max");
  }
  if (!(refit_threshold == 0 || (refit_threshold > 1 && std::isfinite(refit_threshold)))) {
    return Status::invalid_argument(
        "refit_threshold must be 0 (off) or a finite error ratio above 1 (e.g. 2: refit when new "
        "keys quantize twice as badly as the fit's), got " +
        std::to_string(refit_threshold));
  }
  if (refit_min_tokens < 1) {
    return Status::invalid_argument("refit_min_tokens must be >= 1, got " +
                                    std::to_string(refit_min_tokens));
  }
  return ok_status();
}

Status StoreOptions::validate() const {
  PQKV_RETURN_IF_ERROR(spec.validate());
  PQKV_RETURN_IF_ERROR(check_device_usable(device));
  if (dram_budget_bytes < 0) return Status::invalid_argument("dram_budget_bytes must be >= 0");
  if (dram_prealloc_bytes < 0) {
    return Status::invalid_argument("dram_prealloc_bytes must be >= 0 (0 = none), got " +
                                    std::to_string(dram_prealloc_bytes));
  }
  if (dram_budget_bytes > 0 && dram_prealloc_bytes > dram_budget_bytes) {
    return Status::invalid_argument("dram_prealloc_bytes (" + std::to_string(dram_prealloc_bytes) +
                                    ") passes dram_budget_bytes (" +
                                    std::to_string(dram_budget_bytes) +
                                    "); lower the preallocation or raise the budget");
  }
  if (hbm_budget_bytes < 0) return Status::invalid_argument("hbm_budget_bytes must be >= 0");
  if (block_cache_bytes < 0) {
    return Status::invalid_argument("block_cache_bytes must be >= 0 (0 = no block cache), got " +
                                    std::to_string(block_cache_bytes));
  }
  if (block_cache_tokens < 1 || block_cache_tokens > 128 ||
      (block_cache_tokens & (block_cache_tokens - 1)) != 0) {
    return Status::invalid_argument(
        "block_cache_tokens must be a power of two from 1 to 128, got " +
        std::to_string(block_cache_tokens));
  }
  if (block_cache_admit_steps < 1 || (block_cache_tokens == 1 && block_cache_admit_steps > 2)) {
    return Status::invalid_argument(
        "block_cache_admit_steps must be >= 1, and 1 or 2 with block_cache_tokens 1 (hot rows); "
        "got " +
        std::to_string(block_cache_admit_steps));
  }
  if (block_cache_aging_steps < 0) {
    return Status::invalid_argument("block_cache_aging_steps must be >= 0 (0 = plain LFU), got " +
                                    std::to_string(block_cache_aging_steps));
  }
  if (num_threads < 0 || num_threads > StoreOptions::kMaxThreads) {
    return Status::invalid_argument("num_threads must be 0 (one per core) to " +
                                    std::to_string(StoreOptions::kMaxThreads) + ", got " +
                                    std::to_string(num_threads));
  }
  if (spill_to_disk) {
    if (directory.empty() || dram_budget_bytes == 0) {
      return Status::invalid_argument(
          "spill_to_disk needs a directory for the spill files and a nonzero dram_budget_bytes "
          "to spill past; set StoreOptions::directory and dram_budget_bytes");
    }
    if (block_cache_bytes > 0 && !device.is_cpu()) {
      // The CUDA cache admits blocks by copying them from DRAM on a copy
      // stream, one step behind; a spilled block is no longer there.
      return Status::unimplemented(
          "spill_to_disk and a block cache (block_cache_bytes > 0) combine on cpu stores only: "
          "a CUDA store's cache copies its blocks from pinned DRAM, where a spilled block no "
          "longer is; turn one of them off");
    }
  }
  return ok_status();
}

}  // namespace pqkv
