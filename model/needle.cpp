#include "model/needle.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>

namespace pqkv::model {
namespace {

constexpr std::array<const char*, 24> kWords = {
    "amber",  "falcon", "harbor", "lantern", "meadow",  "nickel", "orchid",  "pepper",
    "quartz", "raven",  "saddle", "timber",  "velvet",  "walnut", "yonder",  "zephyr",
    "cobalt", "dune",   "ember",  "glacier", "hickory", "indigo", "juniper", "kettle"};

bool is_sentence_end(std::string_view text, size_t i) {
  const char c = text[i];
  if (c != '.' && c != '!' && c != '?') return false;
  return i + 1 >= text.size() || text[i + 1] == ' ' || text[i + 1] == '\n';
}

// The prefix of `text` that ends right after the last sentence end at or before `n`.
size_t sentence_prefix(std::string_view text, size_t n) {
  n = std::min(n, text.size());
  for (size_t i = n; i > 0; --i) {
    if (is_sentence_end(text, i - 1)) return i;
  }
  return 0;
}

// Where to cut the haystack near `n` characters: at `n` itself, stepped back
// to the start of a UTF-8 character. Cutting at a sentence or word end instead
// would leave the prompt short by up to a sentence (a tenth of it and more);
// the question follows after a blank line, so a cut word reads as a cut.
size_t haystack_cut(std::string_view text, size_t n) {
  n = std::min(n, text.size());
  while (n > 0 && n < text.size() && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80)
    --n;
  return n;
}

std::string compose(std::string_view hay, const NeedleCase& c, size_t* needle_char) {
  const std::string needle = "The secret code for " + c.word + " is " + c.code + ".";
  // Plant after the sentence end nearest below the depth (the start when none).
  const auto target = static_cast<size_t>(std::llround(c.depth * static_cast<double>(hay.size())));
  const size_t at = target >= hay.size() ? hay.size() : sentence_prefix(hay, target);
  std::string text(hay.substr(0, at));
  if (at > 0) text += ' ';
  *needle_char = text.size();
  text += needle;
  if (at < hay.size()) {
    std::string_view rest = hay.substr(at);
    while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\n'))
      rest.remove_prefix(1);
    text += ' ';
    text += rest;
  }
  text += "\n\nWhat is the secret code for " + c.word + "? The secret code for " + c.word + " is ";
  return text;
}

// Text for an SVG element: &, < and > escaped.
std::string xml_text(std::string_view text) {
  std::string out;
  for (char ch : text) {
    switch (ch) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      default:
        out += ch;
    }
  }
  return out;
}

}  // namespace

Status check_needle_depth(double depth) {
  // Written so that NaN fails too: every comparison with NaN is false.
  if (depth >= 0 && depth <= 1) return ok_status();
  return Status::invalid_argument("needle depth " + std::to_string(depth) +
                                  " is not a number within 0..1 (0 = start of the haystack, 1 = "
                                  "its end)");
}

NeedleCase make_needle_case(int64_t length, double depth, uint64_t seed) {
  std::mt19937_64 rng(seed);
  NeedleCase c;
  c.length = length;
  c.depth = depth;
  c.word = kWords[rng() % kWords.size()];
  c.code = std::to_string(100000 + rng() % 900000);
  return c;
}

namespace {

// Prompt tokens of case `c` with the first `chars` characters of the
// haystack (repeated as needed), cut at a sentence; the prompt itself into
// `out` when it is not null.
int64_t prompt_tokens(const Tokenizer& tokenizer, std::optional<int32_t> bos,
                      std::string_view haystack, const NeedleCase& c, size_t chars,
                      NeedlePrompt* out) {
  const int64_t extra = bos ? 1 : 0;
  std::string source(haystack);
  while (source.size() < chars)
    source += "\n\n" + std::string(haystack);
  size_t needle_char = 0;
  const std::string text =
      compose(std::string_view(source).substr(0, haystack_cut(source, chars)), c, &needle_char);
  auto ids = tokenizer.encode(text);
  if (out != nullptr) {
    out->ids.clear();
    if (bos) out->ids.push_back(*bos);
    out->ids.insert(out->ids.end(), ids.begin(), ids.end());
    out->needle_token =
        extra + static_cast<int64_t>(tokenizer.encode(text.substr(0, needle_char)).size());
  }
  return extra + static_cast<int64_t>(ids.size());
}

}  // namespace

Result<int64_t> needle_prompt_min_length(const Tokenizer& tokenizer, std::optional<int32_t> bos,
                                         std::string_view haystack, const NeedleCase& c) {
  PQKV_RETURN_IF_ERROR(check_needle_depth(c.depth));
  if (sentence_prefix(haystack, haystack.size()) == 0) {
    return Status::invalid_argument(
        "the haystack has no sentence end ('.', '!' or '?' followed by a space)");
  }
  return prompt_tokens(tokenizer, bos, haystack, c, 0, nullptr);
}

Result<NeedlePrompt> build_needle_prompt(const Tokenizer& tokenizer, std::optional<int32_t> bos,
                                         std::string_view haystack, const NeedleCase& c) {
  PQKV_ASSIGN_OR_RETURN(const int64_t bare, needle_prompt_min_length(tokenizer, bos, haystack, c));
  const auto count = [&](size_t chars, NeedlePrompt* out) {
    return prompt_tokens(tokenizer, bos, haystack, c, chars, out);
  };
  if (bare > c.length) {
    return Status::invalid_argument("a needle prompt needs at least " + std::to_string(bare) +
                                    " tokens; length " + std::to_string(c.length) +
                                    " is too short");
  }
  // The largest character budget whose prompt fits, by bisection (the token
  // count grows with it).
  size_t lo = 0;
  size_t hi = static_cast<size_t>(4 * c.length + 64);
  while (count(hi, nullptr) <= c.length) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    (count(mid, nullptr) <= c.length ? lo : hi) = mid;
  }
  NeedlePrompt prompt;
  count(lo, &prompt);
  return prompt;
}

bool needle_answer_correct(std::string_view answer, const NeedleCase& c) {
  return answer.find(c.code) != std::string_view::npos;
}

std::string needle_grid_svg(const NeedleGrid& g) {
  const int cell_w = 64;
  const int cell_h = 28;
  const int left = 70;
  const int top = 70;
  const int gap = 60;
  const int cols = static_cast<int>(g.lengths.size());
  const int rows = static_cast<int>(g.depths.size());
  const int panel_w = cols * cell_w;
  // Labels may be wider than a panel: about 7 px per character at 12 px, and
  // 9 px per character of the bold 14 px title, which starts at `left`.
  const int label_w = 7 * static_cast<int>(g.pqkv_label.size());
  const int title_w = 9 * static_cast<int>(g.title.size());
  const int width =
      std::max(left + panel_w + gap + std::max(panel_w, label_w), left + title_w) + 20;
  const int height = top + rows * cell_h + 50;
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
      width, height, left, xml_text(g.title));
  const auto panel = [&](int x0, const std::string& label,
                         const std::vector<std::vector<double>>& acc) {
    svg += fmt::format("<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n", x0, top - 28,
                       xml_text(label));
    for (int c = 0; c < cols; ++c) {
      svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                         x0 + c * cell_w + cell_w / 2, top - 8, g.lengths[c]);
    }
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) {
        const double a = acc[r][c];
        // Red (0) through yellow to green (1).
        const int red = a < 0.5 ? 220 : static_cast<int>(220 * (1 - a) * 2);
        const int green = a < 0.5 ? static_cast<int>(200 * a * 2) : 200;
        svg += fmt::format(
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"rgb({},{},60)\" "
            "stroke=\"white\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0f}%</text>\n",
            x0 + c * cell_w, top + r * cell_h, cell_w, cell_h, red, green,
            x0 + c * cell_w + cell_w / 2, top + r * cell_h + cell_h / 2 + 4, 100 * a);
      }
    }
  };
  for (int r = 0; r < rows; ++r) {
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2f}</text>\n", left - 8,
                       top + r * cell_h + cell_h / 2 + 4, g.depths[r]);
  }
  svg += fmt::format("<text x=\"10\" y=\"{}\">depth</text>\n", top - 8);
  panel(left, "exact attention", g.exact);
  panel(left + panel_w + gap, g.pqkv_label, g.pqkv);
  svg += fmt::format("<text x=\"{}\" y=\"{}\">prompt length (tokens)</text>\n", left,
                     top + rows * cell_h + 24);
  svg += "</svg>\n";
  return svg;
}

}  // namespace pqkv::model
