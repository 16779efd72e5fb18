#include "index/cpu/pq_search_cpu.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <functional>
#include <string>

namespace pqkv::index::cpu {
namespace {

// A key whose unsigned order is (score descending, position ascending): the
// score's bits mapped to an order-preserving unsigned int in the high half,
// the complemented position in the low half.
uint64_t rank_key(float score, uint32_t position) {
  if (score == 0.0f) score = 0.0f;  // -0 ranks as +0, as float comparison has it
  const uint32_t bits = std::bit_cast<uint32_t>(score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t{ordered} << 32) | (0xffffffffu - position);
}

uint32_t key_position(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key);
}

}  // namespace

int64_t clamped_k(int64_t k, int64_t begin, int64_t end) {
  return std::clamp<int64_t>(k, 0, std::max<int64_t>(end - begin, 0));
}

std::vector<float> build_luts(const LayerCodebook& codebook, const float* queries, int q_heads) {
  const PqShape& shape = codebook.shape;
  assert(q_heads % codebook.num_kv_heads == 0);
  const int group = q_heads / codebook.num_kv_heads;
  const int ksub = shape.ksub();
  const int dsub = shape.dsub();
  std::vector<float> luts(static_cast<size_t>(q_heads) * shape.m * ksub);
  for (int h = 0; h < q_heads; ++h) {
    for (int j = 0; j < shape.m; ++j) {
      const float* q = queries + int64_t{h} * shape.head_dim + int64_t{j} * dsub;
      const float* centroids = codebook.sub(h / group, j);
      float* lut = luts.data() + (int64_t{h} * shape.m + j) * ksub;
      for (int c = 0; c < ksub; ++c) {
        const float* centroid = centroids + int64_t{c} * dsub;
        float dot = 0.0f;
        for (int d = 0; d < dsub; ++d)
          dot += q[d] * centroid[d];
        lut[c] = dot;
      }
    }
  }
  return luts;
}

void score_tokens(const PqShape& shape, const float* lut, const uint8_t* codes, int64_t begin,
                  int64_t end, float* scores) {
  const int m = shape.m;
  const int ksub = shape.ksub();
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* code = codes + t * m;
    float score = 0.0f;
    for (int j = 0; j < m; ++j)
      score += lut[int64_t{j} * ksub + code[j]];
    scores[t - begin] = score;
  }
}

void softmax_scores(float* scores, int64_t count, int head_dim) {
  if (count == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float max = *std::max_element(scores, scores + count);
  double z = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = std::exp((scores[i] - max) * scale);
    z += scores[i];
  }
  const float inv_z = static_cast<float>(1.0 / z);
  for (int64_t i = 0; i < count; ++i)
    scores[i] *= inv_z;
}

void aggregate_group(const float* probs, int group, int64_t count, GqaAggregation aggregation,
                     float* out) {
  std::copy(probs, probs + count, out);
  for (int g = 1; g < group; ++g) {
    const float* p = probs + int64_t{g} * count;
    if (aggregation == GqaAggregation::kMax) {
      for (int64_t i = 0; i < count; ++i)
        out[i] = std::max(out[i], p[i]);
    } else {
      for (int64_t i = 0; i < count; ++i)
        out[i] += p[i];
    }
  }
}

int64_t select_top_k(const float* scores, int64_t count, int64_t k, int64_t first_position,
                     std::vector<uint64_t>& scratch, int32_t* out) {
  const int64_t kept = clamped_k(k, 0, count);
  if (kept == 0) return 0;
  assert(first_position >= 0 && first_position + count - 1 <= INT32_MAX);
  scratch.resize(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    scratch[i] = rank_key(scores[i], static_cast<uint32_t>(first_position + i));
  }
  const auto first = scratch.begin();
  if (kept < count) std::nth_element(first, first + kept, scratch.end(), std::greater<>());
  std::sort(first, first + kept, std::greater<>());
  for (int64_t i = 0; i < kept; ++i)
    out[i] = static_cast<int32_t>(key_position(scratch[i]));
  return kept;
}

std::vector<float> score_layer(const SearchInputs& inputs) {
  const LayerCodebook& codebook = *inputs.codebook;
  const PqShape& shape = codebook.shape;
  const int kv_heads = codebook.num_kv_heads;
  const int group = inputs.q_heads / kv_heads;
  const int64_t count = std::max<int64_t>(inputs.end - inputs.begin, 0);
  const std::vector<float> luts = build_luts(codebook, inputs.queries, inputs.q_heads);
  std::vector<float> probs(static_cast<size_t>(group * count));
  std::vector<float> out(static_cast<size_t>(kv_heads * count));
  for (int kv = 0; kv < kv_heads; ++kv) {
    for (int g = 0; g < group; ++g) {
      const int h = kv * group + g;
      float* p = probs.data() + g * count;
      score_tokens(shape, luts.data() + int64_t{h} * shape.m * shape.ksub(), inputs.codes[kv],
                   inputs.begin, inputs.end, p);
      softmax_scores(p, count, shape.head_dim);
    }
    aggregate_group(probs.data(), group, count, inputs.aggregation, out.data() + kv * count);
  }
  return out;
}

std::vector<int32_t> search_layer(const SearchInputs& inputs, int64_t k) {
  const int kv_heads = inputs.codebook->num_kv_heads;
  const int64_t count = std::max<int64_t>(inputs.end - inputs.begin, 0);
  const int64_t kept = clamped_k(k, inputs.begin, inputs.end);
  const std::vector<float> scores = score_layer(inputs);
  std::vector<int32_t> out(static_cast<size_t>(kv_heads * kept));
  std::vector<uint64_t> scratch;
  for (int kv = 0; kv < kv_heads; ++kv) {
    select_top_k(scores.data() + kv * count, count, k, inputs.begin, scratch,
                 out.data() + kv * kept);
  }
  return out;
}

Status verify_top_k(const float* scores, int64_t count, int64_t first_position, int64_t k,
                    const int32_t* picked, float tolerance) {
  const int64_t kept = clamped_k(k, 0, count);
  if (kept == 0) return ok_status();
  std::vector<bool> chosen(static_cast<size_t>(count), false);
  float lowest_picked = INFINITY;
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t slot = int64_t{picked[i]} - first_position;
    if (slot < 0 || slot >= count) {
      return Status::invalid_argument("top-k entry " + std::to_string(i) + " is position " +
                                      std::to_string(picked[i]) + ", outside the searched [" +
                                      std::to_string(first_position) + ", " +
                                      std::to_string(first_position + count) + ")");
    }
    if (chosen[slot]) {
      return Status::invalid_argument("top-k holds position " + std::to_string(picked[i]) +
                                      " twice");
    }
    chosen[slot] = true;
    lowest_picked = std::min(lowest_picked, scores[slot]);
  }
  std::vector<float> sorted(scores, scores + count);
  std::nth_element(sorted.begin(), sorted.begin() + (kept - 1), sorted.end(), std::greater<>());
  const float kth = sorted[kept - 1];
  if (lowest_picked < kth - tolerance) {
    return Status::invalid_argument("top-k picked a token scoring " +
                                    std::to_string(lowest_picked) + ", below the k-th best score " +
                                    std::to_string(kth) + " by more than the tolerance " +
                                    std::to_string(tolerance));
  }
  for (int64_t i = 0; i < count; ++i) {
    if (!chosen[i] && scores[i] > kth + tolerance) {
      return Status::invalid_argument(
          "top-k left out position " + std::to_string(first_position + i) + " scoring " +
          std::to_string(scores[i]) + ", above the k-th best score " + std::to_string(kth) +
          " by more than the tolerance " + std::to_string(tolerance));
    }
  }
  return ok_status();
}

}  // namespace pqkv::index::cpu
