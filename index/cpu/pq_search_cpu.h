// The search reference: PQ scoring, GQA aggregation and top-k on the host, as
// free functions so that a GPU test can compare each stage of its kernels with
// them. LayerIndexCpu::search runs exactly these stages.
//
// A search of tokens [begin, end) with queries [q_heads][head_dim] goes:
//   1. build_luts:      lut[h][j][c] = <q_h sub-vector j, centroid c of sub-space j>
//   2. score_tokens:    raw[h][t] = sum over j = 0..m-1 of lut[h][j][code[t][j]]
//   3. softmax_scores:  p[h][t] = softmax over t of raw[h][t] / sqrt(head_dim)
//   4. aggregate_group: per KV head, sum (kSoftmaxSum) or max (kMax) of p over its group
//   5. select_top_k:    the min(k, end - begin) best positions per KV head
// Query head h belongs to KV head h / (q_heads / kv_heads). All arithmetic is
// fp32 in the order written here, except the softmax denominator (double).
// All pointers are host memory; preconditions are the caller's (asserted).
#pragma once

#include <cstdint>
#include <vector>

#include "index/pq_codebook.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index::cpu {

// Tokens a search of [begin, end) keeps per KV head: min(k, end - begin).
// Results are dense rows of this many positions: out[kv_head * clamped_k + i].
int64_t clamped_k(int64_t k, int64_t begin, int64_t end);

// LUTs of every query head, [q_heads][m][ksub]. queries: [q_heads][head_dim]
// fp32; q_heads is a multiple of codebook.num_kv_heads.
std::vector<float> build_luts(const LayerCodebook& codebook, const float* queries, int q_heads);

// Raw scores of one query head for tokens [begin, end): scores[t - begin].
// lut: that head's [m][ksub]; codes: its KV head's [token][m] table starting at
// position 0, holding at least `end` tokens.
void score_tokens(const PqShape& shape, const float* lut, const uint8_t* codes, int64_t begin,
                  int64_t end, float* scores);

// In place: scores[i] becomes exp((scores[i] - max) / sqrt(head_dim)) / Z over
// the `count` scores, Z summed in double; the result is each token's softmax
// probability for this query head.
void softmax_scores(float* scores, int64_t count, int head_dim);

// One score per token of a GQA group from its heads' probabilities
// probs[g * count + i] (g < group): their sum (kSoftmaxSum) or max (kMax).
void aggregate_group(const float* probs, int group, int64_t count, GqaAggregation aggregation,
                     float* out);

// Writes the positions first_position + i of the min(k, count) best scores
// to out, best first; equal scores put the lower position first, so the
// selected set and its order are fully determined. Returns how many were
// written. `scratch` is reused between calls (resized to count).
int64_t select_top_k(const float* scores, int64_t count, int64_t k, int64_t first_position,
                     std::vector<uint64_t>& scratch, int32_t* out);

// Everything one layer's search reads.
struct SearchInputs {
  const LayerCodebook* codebook = nullptr;
  std::vector<const uint8_t*> codes;  // per KV head: [token][m] from position 0
  const float* queries = nullptr;     // [q_heads][head_dim] fp32
  int q_heads = 0;
  int64_t begin = 0;
  int64_t end = 0;
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
};

// Stages 1-4 for every KV head: aggregated scores [kv_heads][end - begin].
std::vector<float> score_layer(const SearchInputs& inputs);

// The whole search: [kv_heads][clamped_k(k, begin, end)] positions, each row
// best first (see select_top_k).
std::vector<int32_t> search_layer(const SearchInputs& inputs, int64_t k);

// OK when `picked` (clamped_k(k, 0, count) positions, any order) is a top-k of
// scores[count] (positions first_position + i) up to `tolerance`: distinct, in
// range, none scoring below the k-th best score - tolerance, and no token left
// out scoring above it + tolerance. Otherwise says which token breaks what.
// For checking a backend that sums in another order against this reference.
Status verify_top_k(const float* scores, int64_t count, int64_t first_position, int64_t k,
                    const int32_t* picked, float tolerance);

}  // namespace pqkv::index::cpu
