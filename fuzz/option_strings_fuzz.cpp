// Fuzzes the option strings a user types: token counts and budgets
// ("64+5%"), PQ codecs ("m=4,b=8"), dtypes, GQA aggregations and model
// presets. Input: newline-separated fields. A string that parses must give
// options that validate, and a valid budget must resolve to counts that fit
// the context.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.h"
#include "pqkv/model_spec.h"
#include "pqkv/options.h"

namespace {

std::vector<std::string_view> split_lines(std::string_view text, size_t max_fields) {
  std::vector<std::string_view> out;
  while (out.size() + 1 < max_fields) {
    const size_t nl = text.find('\n');
    if (nl == std::string_view::npos) break;
    out.push_back(text.substr(0, nl));
    text.remove_prefix(nl + 1);
  }
  out.push_back(text);
  return out;
}

void check_budget(const pqkv::BudgetPolicy& b) {
  if (!b.validate().ok()) return;
  for (int64_t length : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{31}, int64_t{33},
                         int64_t{4096}, int64_t{1} << 40}) {
    for (int64_t prefill : {int64_t{0}, int64_t{1}, length / 2, length}) {
      const auto c = b.resolve(length, prefill);
      if (c.sink < 0 || c.window < 0 || c.top_k < 0) pqkv::fuzz::fail("a negative count");
      if (c.sink + c.window + c.top_k > length) pqkv::fuzz::fail("counts exceed the context");
      if (length > c.sink && c.window < 1) pqkv::fuzz::fail("the newest token is not attended");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto fields = split_lines(text, 5);

  pqkv::BudgetPolicy budget;
  pqkv::TokenCount* counts[] = {&budget.sink, &budget.window, &budget.top_k};
  for (size_t i = 0; i < fields.size() && i < 3; ++i) {
    auto c = pqkv::TokenCount::parse(fields[i]);
    if (!c.ok()) continue;
    if (!c->validate("parsed").ok()) pqkv::fuzz::fail("a parsed token count does not validate");
    *counts[i] = *c;
    static_cast<void>(c->to_string());
  }
  budget.fixed_at_prefill = size > 0 && (data[size - 1] & 1);
  check_budget(budget);

  if (fields.size() > 3) {
    auto pq = pqkv::PqConfig::parse(fields[3]);
    if (pq.ok() && pq->validate(128).ok()) {
      const int m = pq->resolved_m(128);
      if (m <= 0 || 128 % m != 0 || pq->bits < 1 || pq->bits > 8) {
        pqkv::fuzz::fail("a valid PQ config has an unusable geometry");
      }
      static_cast<void>(pq->to_string());
    }
  }
  if (fields.size() > 4) {
    static_cast<void>(pqkv::parse_dtype(fields[4]));
    static_cast<void>(pqkv::parse_gqa_aggregation(fields[4]));
    auto spec = pqkv::ModelSpec::preset(fields[4]);
    if (spec.ok() && !spec->validate().ok()) pqkv::fuzz::fail("a preset does not validate");
  }
  return 0;
}
