#include "model/rope.h"

#include <cmath>
#include <numbers>

namespace pqkv::model {

std::vector<double> rope_inv_freq(const LlamaConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = 1.0 / std::pow(config.rope_theta, 2.0 * i / config.head_dim);
  }
  const RopeScaling& rs = config.rope_scaling;
  if (rs.type == RopeScaling::Type::kLinear) {
    for (double& f : inv)
      f /= rs.factor;
  } else if (rs.type == RopeScaling::Type::kLlama3) {
    // Long wavelengths are slowed by `factor`, short ones kept, and the band
    // between the two cut-offs blends both (Llama 3.1's published rule).
    const double old_len = static_cast<double>(rs.original_max_position_embeddings);
    const double low_wavelen = old_len / rs.low_freq_factor;
    const double high_wavelen = old_len / rs.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f /= rs.factor;
        continue;
      }
      const double smooth =
          (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
      f = (1.0 - smooth) * f / rs.factor + smooth * f;
    }
  }
  return inv;
}

void rope_tables(const std::vector<double>& inv_freq, int64_t start, int64_t n,
                 std::vector<float>* cos, std::vector<float>* sin) {
  const size_t half = inv_freq.size();
  cos->resize(static_cast<size_t>(n) * half);
  sin->resize(static_cast<size_t>(n) * half);
  for (int64_t t = 0; t < n; ++t) {
    const double pos = static_cast<double>(start + t);
    for (size_t i = 0; i < half; ++i) {
      const double angle = pos * inv_freq[i];
      (*cos)[t * half + i] = static_cast<float>(std::cos(angle));
      (*sin)[t * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

}  // namespace pqkv::model
