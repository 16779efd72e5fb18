#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pqkv::model {

int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::next(std::span<const float> logits) {
  if (options_.temperature <= 0.0f) return argmax(logits);
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
