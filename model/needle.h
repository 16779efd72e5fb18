// Needle-in-a-haystack prompts and their scoring: "The secret code for WORD
// is NNNNNN." planted at a sentence boundary at a given depth of a haystack
// text, then the question; the answer is right when it contains the code.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.h"
#include "pqkv/status.h"

namespace pqkv::model {

struct NeedleCase {
  int64_t length = 4096;  // prompt tokens, BOS and question included (at most)
  double depth = 0.5;     // 0 = before the haystack, 1 = after it; else at the sentence end below
  std::string word;       // "WORD" in the needle
  std::string code;       // six digits
};

struct NeedlePrompt {
  std::vector<int32_t> ids;  // BOS (when the model has one), haystack with the needle, question
  int64_t needle_token = 0;  // about where the needle starts, in tokens
};

// OK when `depth` is a number within 0..1; NaN and Inf are InvalidArgument.
Status check_needle_depth(double depth);

// A word and a six-digit code drawn from `seed`.
NeedleCase make_needle_case(int64_t length, double depth, uint64_t seed);

// The fewest tokens a prompt of case `c` can have: BOS, the needle and the
// question around no haystack. InvalidArgument when the haystack has no
// sentence end or the depth is not within 0..1.
Result<int64_t> needle_prompt_min_length(const Tokenizer& tokenizer, std::optional<int32_t> bos,
                                         std::string_view haystack, const NeedleCase& c);

// Builds the prompt from `haystack` (repeated when too short): as much of it
// as fits into case.length tokens with the needle and the question, cut at a
// character, so that the prompt has case.length tokens (one fewer where the
// next character would add two tokens at once). InvalidArgument as
// needle_prompt_min_length, and when case.length is below that minimum.
Result<NeedlePrompt> build_needle_prompt(const Tokenizer& tokenizer, std::optional<int32_t> bos,
                                         std::string_view haystack, const NeedleCase& c);

// True when the generated answer contains the code.
bool needle_answer_correct(std::string_view answer, const NeedleCase& c);

// Accuracy grids (fractions in 0..1, [depth][length]) of exact attention and
// of pqkv, as an SVG document with two heat maps side by side.
struct NeedleGrid {
  std::vector<int64_t> lengths;
  std::vector<double> depths;
  std::vector<std::vector<double>> exact;
  std::vector<std::vector<double>> pqkv;
  std::string title;
  std::string pqkv_label;  // e.g. "pqkv (sink=32 window=5% top_k=5%, m=4,b=8)"
};
std::string needle_grid_svg(const NeedleGrid& grid);

}  // namespace pqkv::model
