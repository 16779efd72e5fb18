#include "workload/quality_metrics.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

namespace pqkv::workload {
namespace {

Status check_step(const ModelSpec& spec, const StepTensors& step) {
  PQKV_RETURN_IF_ERROR(spec.validate());
  if (step.num_tokens < 1) {
    return Status::invalid_argument("a step needs at least one token (the current one)");
  }
  if (step.queries == nullptr || step.keys == nullptr) {
    return Status::invalid_argument("queries and keys must not be null");
  }
  return ok_status();
}

Status check_counts(const BudgetPolicy::Counts& counts) {
  if (counts.sink < 0 || counts.window < 0 || counts.top_k < 0) {
    return Status::invalid_argument("budget counts must be >= 0");
  }
  return ok_status();
}

// Logits q . k / sqrt(d) of query head `q_head` against every token.
std::vector<double> head_logits(const ModelSpec& spec, const StepTensors& step, int q_head) {
  const int d = spec.head_dim;
  const int kv_head = q_head / spec.group_size();
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  const float* q = step.queries + static_cast<int64_t>(q_head) * d;
  std::vector<double> logits(static_cast<size_t>(step.num_tokens));
  for (int64_t t = 0; t < step.num_tokens; ++t) {
    const float* k = step.keys + (t * spec.num_kv_heads + kv_head) * d;
    double dot = 0;
    for (int i = 0; i < d; ++i)
      dot += static_cast<double>(q[i]) * k[i];
    logits[static_cast<size_t>(t)] = dot * inv_sqrt_d;
  }
  return logits;
}

// Logits of every query head of `kv_head`'s group: [group][num_tokens].
std::vector<std::vector<double>> group_logits(const ModelSpec& spec, const StepTensors& step,
                                              int kv_head) {
  std::vector<std::vector<double>> logits;
  for (int j = 0; j < spec.group_size(); ++j) {
    logits.push_back(head_logits(spec, step, kv_head * spec.group_size() + j));
  }
  return logits;
}

std::vector<int64_t> oracle_from_logits(const std::vector<std::vector<double>>& logits,
                                        int64_t num_tokens, const BudgetPolicy::Counts& counts,
                                        GqaAggregation aggregation) {
  const int64_t sink_end = std::min(counts.sink, num_tokens);
  const int64_t window_begin = std::max(sink_end, num_tokens - counts.window);
  std::vector<int64_t> positions;
  for (int64_t t = 0; t < sink_end; ++t)
    positions.push_back(t);
  const int64_t middle = window_begin - sink_end;
  const int64_t k = std::min(counts.top_k, middle);
  if (k > 0) {
    std::vector<double> score(static_cast<size_t>(middle), 0.0);
    for (const auto& head : logits) {
      const std::vector<double> p = softmax(std::span<const double>(head).subspan(
          static_cast<size_t>(sink_end), static_cast<size_t>(middle)));
      for (size_t i = 0; i < p.size(); ++i) {
        score[i] = aggregation == GqaAggregation::kMax ? std::max(score[i], p[i]) : score[i] + p[i];
      }
    }
    std::vector<int64_t> order(static_cast<size_t>(middle));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::nth_element(order.begin(), order.begin() + k - 1, order.end(), [&](int64_t a, int64_t b) {
      const double sa = score[static_cast<size_t>(a)];
      const double sb = score[static_cast<size_t>(b)];
      return sa != sb ? sa > sb : a < b;
    });
    order.resize(static_cast<size_t>(k));
    std::sort(order.begin(), order.end());
    for (int64_t i : order)
      positions.push_back(sink_end + i);
  }
  for (int64_t t = window_begin; t < num_tokens; ++t)
    positions.push_back(t);
  return positions;
}

// Per KV head: attended mass and oracle mass summed over its query heads, and
// the squared norms of (sparse - full) and of full over its query heads.
struct HeadSums {
  double attended_mass = 0;
  double oracle_mass = 0;
  double error2 = 0;
  double full2 = 0;
};

}  // namespace

std::vector<double> softmax(std::span<const double> logits) {
  std::vector<double> p(logits.size());
  if (logits.empty()) return p;
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    p[i] = std::exp(logits[i] - m);
    sum += p[i];
  }
  for (double& x : p)
    x /= sum;
  return p;
}

Result<std::vector<double>> exact_logits(const ModelSpec& spec, const StepTensors& step,
                                         int q_head) {
  PQKV_RETURN_IF_ERROR(check_step(spec, step));
  if (q_head < 0 || q_head >= spec.num_q_heads) {
    return Status::out_of_range("query head " + std::to_string(q_head) + " outside [0, " +
                                std::to_string(spec.num_q_heads) + ")");
  }
  return head_logits(spec, step, q_head);
}

Result<std::vector<int64_t>> oracle_positions(const ModelSpec& spec, const StepTensors& step,
                                              int kv_head, const BudgetPolicy::Counts& counts,
                                              GqaAggregation aggregation) {
  PQKV_RETURN_IF_ERROR(check_step(spec, step));
  PQKV_RETURN_IF_ERROR(check_counts(counts));
  if (kv_head < 0 || kv_head >= spec.num_kv_heads) {
    return Status::out_of_range("KV head " + std::to_string(kv_head) + " outside [0, " +
                                std::to_string(spec.num_kv_heads) + ")");
  }
  return oracle_from_logits(group_logits(spec, step, kv_head), step.num_tokens, counts,
                            aggregation);
}

double needle_hit_fraction(std::span<const std::vector<int64_t>> attended,
                           int64_t needle_position) {
  if (attended.empty()) return 0.0;
  int hits = 0;
  for (const auto& positions : attended) {
    hits += std::find(positions.begin(), positions.end(), needle_position) != positions.end();
  }
  return static_cast<double>(hits) / static_cast<double>(attended.size());
}

Result<StepQuality> evaluate_step(const ModelSpec& spec, const StepTensors& step,
                                  std::span<const std::vector<int64_t>> attended,
                                  const BudgetPolicy::Counts& counts, GqaAggregation aggregation,
                                  std::optional<int64_t> needle_position) {
  PQKV_RETURN_IF_ERROR(check_step(spec, step));
  PQKV_RETURN_IF_ERROR(check_counts(counts));
  if (step.values == nullptr) return Status::invalid_argument("values must not be null");
  if (static_cast<int>(attended.size()) != spec.num_kv_heads) {
    return Status::invalid_argument("attended positions are needed for each of the " +
                                    std::to_string(spec.num_kv_heads) + " KV heads, got " +
                                    std::to_string(attended.size()));
  }
  for (const auto& positions : attended) {
    for (int64_t t : positions) {
      if (t < 0 || t >= step.num_tokens) {
        return Status::out_of_range("attended position " + std::to_string(t) + " outside [0, " +
                                    std::to_string(step.num_tokens) + ")");
      }
    }
  }

  const int d = spec.head_dim;
  const int group = spec.group_size();
  const auto n = static_cast<size_t>(step.num_tokens);
  std::vector<HeadSums> sums(static_cast<size_t>(spec.num_kv_heads));
  tbb::parallel_for(0, spec.num_kv_heads, [&](int g) {
    const auto logits = group_logits(spec, step, g);
    std::vector<char> in_attended(n, 0);
    std::vector<char> in_oracle(n, 0);
    for (int64_t t : attended[static_cast<size_t>(g)])
      in_attended[static_cast<size_t>(t)] = 1;
    for (int64_t t : oracle_from_logits(logits, step.num_tokens, counts, aggregation)) {
      in_oracle[static_cast<size_t>(t)] = 1;
    }
    HeadSums& s = sums[static_cast<size_t>(g)];
    std::vector<double> full(static_cast<size_t>(d));
    std::vector<double> sparse(static_cast<size_t>(d));
    for (int j = 0; j < group; ++j) {
      const std::vector<double> p = softmax(logits[static_cast<size_t>(j)]);
      std::fill(full.begin(), full.end(), 0.0);
      std::fill(sparse.begin(), sparse.end(), 0.0);
      double captured = 0;
      for (size_t t = 0; t < n; ++t) {
        const float* v = step.values + (static_cast<int64_t>(t) * spec.num_kv_heads + g) * d;
        for (int i = 0; i < d; ++i)
          full[static_cast<size_t>(i)] += p[t] * v[i];
        if (in_attended[t]) {
          captured += p[t];
          for (int i = 0; i < d; ++i)
            sparse[static_cast<size_t>(i)] += p[t] * v[i];
        }
        if (in_oracle[t]) s.oracle_mass += p[t];
      }
      s.attended_mass += captured;
      // Attention restricted to the attended set renormalises its weights.
      for (int i = 0; i < d; ++i) {
        const double sp = captured > 0 ? sparse[static_cast<size_t>(i)] / captured : 0.0;
        const double diff = sp - full[static_cast<size_t>(i)];
        s.error2 += diff * diff;
        s.full2 += full[static_cast<size_t>(i)] * full[static_cast<size_t>(i)];
      }
    }
  });

  HeadSums total;
  for (const HeadSums& s : sums) {
    total.attended_mass += s.attended_mass;
    total.oracle_mass += s.oracle_mass;
    total.error2 += s.error2;
    total.full2 += s.full2;
  }
  StepQuality q;
  q.attended_mass = total.attended_mass / spec.num_q_heads;
  q.oracle_mass = total.oracle_mass / spec.num_q_heads;
  q.mass_recall = q.oracle_mass > 0 ? q.attended_mass / q.oracle_mass : 0.0;
  q.output_error = std::sqrt(total.error2 / std::max(total.full2, 1e-300));
  if (needle_position) q.needle_hit = needle_hit_fraction(attended, *needle_position);
  return q;
}

}  // namespace pqkv::workload
