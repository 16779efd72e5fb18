// Needle prompts, scoring, the SVG grid, and the commands' flag parsing.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "model/needle.h"
#include "model/session.h"
#include "model/tokenizer.h"
#include "test_util.h"

namespace pqkv::model {
namespace {

std::string haystack_text() {
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "Sentence number " + std::to_string(i) + " talks about nothing in particular. ";
  }
  return text;
}

std::string decode_all(const Tokenizer& t, const std::vector<int32_t>& ids, size_t from) {
  std::string s;
  for (size_t i = from; i < ids.size(); ++i)
    s += t.decode(ids[i], i ? ids[i - 1] : -1);
  return s;
}

TEST(NeedleTest, PlantsTheNeedleAtEachDepthWithinTheLength) {
  ByteTokenizer tok;
  const std::string hay = haystack_text();
  for (int64_t length : {200, 777, 5000}) {
    for (double depth : {0.0, 0.25, 0.5, 1.0}) {
      const NeedleCase c = make_needle_case(length, depth, 9);
      auto p = build_needle_prompt(tok, 7, hay, c);
      PQKV_ASSERT_OK(p);
      SCOPED_TRACE("length " + std::to_string(length) + " depth " + std::to_string(depth));
      EXPECT_EQ(p->ids.front(), 7);  // BOS
      // Exactly the requested length: one token per byte, cut at any byte.
      EXPECT_EQ(static_cast<int64_t>(p->ids.size()), length);
      const std::string text = decode_all(tok, p->ids, 1);
      const std::string needle = "The secret code for " + c.word + " is " + c.code + ".";
      const size_t at = text.find(needle);
      ASSERT_NE(at, std::string::npos);
      EXPECT_EQ(text.substr(p->needle_token - 1, needle.size()), needle);
      const std::string question =
          "\n\nWhat is the secret code for " + c.word + "? The secret code for " + c.word + " is ";
      ASSERT_GE(text.size(), question.size());
      EXPECT_EQ(text.substr(text.size() - question.size()), question);
      const double where = double(at) / double(text.size() - question.size());
      if (depth == 0.0) {
        EXPECT_EQ(at, 0u);
      }
      if (depth == 1.0) {
        EXPECT_EQ(at + needle.size(), text.size() - question.size());
      }
      // Depth resolves to whole sentences: only meaningful with several of them.
      if (length >= 777) {
        EXPECT_NEAR(where, depth, 0.15);
      }
      if (at > 0 && depth < 1.0) {
        EXPECT_EQ(text.substr(at - 2, 2), ". ");  // at a sentence boundary
      }
    }
  }
}

TEST(NeedleTest, RefusesBadInputs) {
  ByteTokenizer tok;
  EXPECT_EQ(
      build_needle_prompt(tok, {}, haystack_text(), make_needle_case(20, 0.5, 1)).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(build_needle_prompt(tok, {}, "no sentence end here", make_needle_case(500, 0.5, 1))
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      build_needle_prompt(tok, {}, haystack_text(), make_needle_case(500, 1.5, 1)).status().code(),
      StatusCode::kInvalidArgument);
}

TEST(NeedleTest, CasesAreSeededAndScored) {
  const NeedleCase a = make_needle_case(100, 0.5, 3);
  const NeedleCase b = make_needle_case(100, 0.5, 3);
  EXPECT_EQ(a.word, b.word);
  EXPECT_EQ(a.code, b.code);
  EXPECT_EQ(a.code.size(), 6u);
  EXPECT_TRUE(needle_answer_correct(" " + a.code + ".", a));
  EXPECT_FALSE(needle_answer_correct(a.code.substr(0, 5), a));
}

TEST(NeedleTest, SvgIsWideEnoughForItsTitle) {
  NeedleGrid g;
  g.lengths = {256};
  g.depths = {0.5};
  g.exact = {{1}};
  g.pqkv = {{1}};
  g.title = "needle in a haystack: " + std::string(120, 'x') + " & <co>";
  g.pqkv_label = "pqkv";
  const std::string svg = needle_grid_svg(g);
  const size_t w = svg.find("width=\"");
  ASSERT_NE(w, std::string::npos);
  const int width = std::stoi(svg.substr(w + 7));
  // The bold 14 px title starts at x=70; at least 8 px per character.
  EXPECT_GE(width, 70 + 8 * static_cast<int>(g.title.size()));
  EXPECT_NE(svg.find("&amp; &lt;co&gt;"), std::string::npos);
}

TEST(NeedleTest, SvgHasBothGrids) {
  NeedleGrid g;
  g.lengths = {1024, 2048};
  g.depths = {0, 0.5, 1};
  g.exact = {{1, 1}, {1, 0.5}, {1, 0}};
  g.pqkv = {{1, 0}, {0, 0}, {1, 1}};
  g.title = "t";
  g.pqkv_label = "pqkv (budget)";
  const std::string svg = needle_grid_svg(g);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("exact attention"), std::string::npos);
  EXPECT_NE(svg.find("pqkv (budget)"), std::string::npos);
  EXPECT_NE(svg.find(">50%<"), std::string::npos);
  size_t cells = 0;
  for (size_t p = svg.find("<rect x="); p != std::string::npos; p = svg.find("<rect x=", p + 1)) {
    ++cells;
  }
  EXPECT_EQ(cells, 12u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
}

TEST(FlagsTest, BudgetSplitsBetweenWindowAndTopK) {
  auto b = parse_budget("0.1", "32");
  PQKV_ASSERT_OK(b);
  EXPECT_DOUBLE_EQ(b->window.ratio, 0.05);
  EXPECT_DOUBLE_EQ(b->top_k.ratio, 0.05);
  EXPECT_EQ(b->sink.tokens, 32);
  b = parse_budget("513", "0");
  PQKV_ASSERT_OK(b);
  EXPECT_EQ(b->window.tokens, 257);
  EXPECT_EQ(b->top_k.tokens, 256);
  b = parse_budget("all", "0");
  PQKV_ASSERT_OK(b);
  const auto counts = b->resolve(1000, 1000);
  EXPECT_EQ(counts.sink + counts.window + counts.top_k, 1000);
  EXPECT_FALSE(parse_budget("ten", "32").ok());
  EXPECT_FALSE(parse_budget("0.1", "x").ok());
}

TEST(FlagsTest, TokenIds) {
  auto ids = parse_token_ids("1,319, 459");
  PQKV_ASSERT_OK(ids);
  EXPECT_EQ(*ids, (std::vector<int32_t>{1, 319, 459}));
  EXPECT_FALSE(parse_token_ids("1,x").ok());
  EXPECT_FALSE(parse_token_ids("-3").ok());
  EXPECT_FALSE(parse_token_ids(" , ").ok());
  EXPECT_FALSE(parse_token_ids("").ok());
  EXPECT_FALSE(parse_token_ids("1,,2").ok());
  EXPECT_FALSE(parse_token_ids("1,2,").ok());
  EXPECT_FALSE(parse_token_ids(",1").ok());
  EXPECT_FALSE(parse_token_ids("1;2").ok());
  EXPECT_FALSE(parse_token_ids("99999999999").ok());
  auto spaced = parse_token_ids("1 2  3");
  PQKV_ASSERT_OK(spaced);
  EXPECT_EQ(spaced->size(), 3u);
}

}  // namespace
}  // namespace pqkv::model
