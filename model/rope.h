// Rotary position embeddings in Hugging Face's convention: dimension i pairs
// with i + head_dim/2 ("rotate_half"), with linear or Llama-3 frequency scaling.
#pragma once

#include <cstdint>
#include <vector>

#include "model/llama_config.h"

namespace pqkv::model {

// head_dim/2 inverse frequencies, scaled as config.rope_scaling says.
std::vector<double> rope_inv_freq(const LlamaConfig& config);

// cos and sin tables [n, head_dim/2] for positions start .. start + n - 1.
void rope_tables(const std::vector<double>& inv_freq, int64_t start, int64_t n,
                 std::vector<float>* cos, std::vector<float>* sin);

}  // namespace pqkv::model
