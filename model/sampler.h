// Picks the next token from logits: greedy argmax, or sampling from
// softmax(logits / temperature) with a seeded generator.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "pqkv/status.h"

namespace pqkv::model {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id on ties); finite, >= 0. Default 0.
  uint64_t seed = 0;         // seeds temperature sampling. Default 0.

  // InvalidArgument, naming the value, for a temperature that is NaN,
  // infinite or negative.
  Status validate() const;
};

class Sampler {
 public:
  // InvalidArgument when `options` do not validate().
  static Result<Sampler> create(const SamplingOptions& options);

  // The next token id. InvalidArgument for empty logits, a NaN or +Inf
  // logit, or logits that are all -Inf (-Inf alone masks a token).
  Result<int32_t> next(std::span<const float> logits);

 private:
  explicit Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

}  // namespace pqkv::model
