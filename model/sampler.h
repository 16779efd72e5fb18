// Picks the next token from logits: greedy argmax, or sampling from
// softmax(logits / temperature) with a seeded generator.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace pqkv::model {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id on ties). Default 0.
  uint64_t seed = 0;         // seeds temperature sampling. Default 0.
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}
  int32_t next(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

int32_t argmax(std::span<const float> logits);

}  // namespace pqkv::model
