#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace pqkv::model {
namespace {

// Index of the largest value, the lowest on ties.
int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

}  // namespace

Status SamplingOptions::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    return Status::invalid_argument(
        "sampling temperature must be a finite number >= 0 (0 = greedy), got " +
        std::to_string(temperature));
  }
  return ok_status();
}

Result<Sampler> Sampler::create(const SamplingOptions& options) {
  PQKV_RETURN_IF_ERROR(options.validate());
  return Sampler(options);
}

Result<int32_t> Sampler::next(std::span<const float> logits) {
  if (logits.empty()) return Status::invalid_argument("no logits to sample from");
  // A NaN breaks both the argmax's order and the sampling's sum; +Inf makes
  // exp(logit - max) NaN; all -Inf leaves no token to pick.
  bool any_finite = false;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]) || logits[i] == INFINITY) {
      return Status::invalid_argument(
          "logit " + std::to_string(i) + " of " + std::to_string(logits.size()) + " is " +
          std::to_string(logits[i]) + ": the model produced non-finite logits");
    }
    any_finite = any_finite || logits[i] != -INFINITY;
  }
  if (!any_finite) {
    return Status::invalid_argument("every one of the " + std::to_string(logits.size()) +
                                    " logits is -inf: no token can be picked");
  }
  if (options_.temperature == 0.0f) return argmax(logits);
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<double> cdf(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    sum += std::exp((static_cast<double>(logits[i]) - max_logit) / options_.temperature);
    cdf[i] = sum;
  }
  const double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
  const auto it = std::upper_bound(cdf.begin(), cdf.end(), u);
  return static_cast<int32_t>(std::min<size_t>(it - cdf.begin(), logits.size() - 1));
}

}  // namespace pqkv::model
