// Reference metrics of selection quality for one decode step of one layer:
// how much exact attention the attended tokens capture compared with an
// oracle that has the same budget, how far the sparse attention output is from
// the full one, and whether a planted needle was attended. Everything is
// computed from fp32 inputs in double, on the host.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::workload {

// The tensors of one decode step of one layer, all fp32 in host memory.
struct StepTensors {
  const float* queries = nullptr;  // [q_heads, head_dim]
  const float* keys = nullptr;     // [num_tokens, kv_heads, head_dim]; the current token last
  const float* values = nullptr;   // [num_tokens, kv_heads, head_dim]
  int64_t num_tokens = 0;          // context length, the current token included
};

struct StepQuality {
  // Exact softmax mass (over all tokens) held by the attended set, mean over query heads.
  double attended_mass = 0;
  // The same for the oracle set.
  double oracle_mass = 0;
  // attended_mass / oracle_mass. 1 when the selection is as good as exact
  // top-K; may exceed 1 slightly, since the oracle ranks by the aggregated
  // group score, not by each head's own mass.
  double mass_recall = 0;
  // ||sparse - full|| / ||full|| over the attention outputs of all query heads.
  double output_error = 0;
  // Fraction of KV heads whose attended set holds the needle; empty when the
  // step targets none.
  std::optional<double> needle_hit;
};

// Exact logits q . k / sqrt(head_dim) of query head `q_head` against every
// token of its KV head, in double.
Result<std::vector<double>> exact_logits(const ModelSpec& spec, const StepTensors& step,
                                         int q_head);

// Softmax of `logits` in double (max-subtracted).
std::vector<double> softmax(std::span<const double> logits);

// The oracle's attended positions for `kv_head`, ascending: the sink tokens
// [0, sink), the window [num_tokens - window, num_tokens) (the current token
// is its newest), and the top_k tokens between them by exact score aggregated
// over the KV head's query heads as pqkv aggregates approximate scores: per
// query head a softmax of the logits over those middle tokens, then summed
// (kSoftmaxSum) or maxed (kMax) over the group. Ties go to the lower position.
Result<std::vector<int64_t>> oracle_positions(const ModelSpec& spec, const StepTensors& step,
                                              int kv_head, const BudgetPolicy::Counts& counts,
                                              GqaAggregation aggregation);

// Fraction of KV heads whose attended positions contain `needle_position`.
double needle_hit_fraction(std::span<const std::vector<int64_t>> attended, int64_t needle_position);

// All metrics of one step. `attended` holds, per KV head, the positions the
// engine attended to (sink + window + selected; any order, duplicates
// ignored). `needle_position` is the needle the step's query looks for, if any.
Result<StepQuality> evaluate_step(const ModelSpec& spec, const StepTensors& step,
                                  std::span<const std::vector<int64_t>> attended,
                                  const BudgetPolicy::Counts& counts, GqaAggregation aggregation,
                                  std::optional<int64_t> needle_position = std::nullopt);

}  // namespace pqkv::workload
