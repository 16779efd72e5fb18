// Synthetic keys, values and queries with the structure that decides how well
// a sparse-attention index selects tokens: RoPE, outlier channels, attention
// sinks, a recency bias, topical clusters and planted needles. Every element is
// a pure function of (seed, layer, head, token, dim), so any token range of any
// context length can be generated on demand, identically, in any order.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "pqkv/model_spec.h"
#include "pqkv/status.h"

namespace pqkv::workload {

// Rotary position embedding, Llama-3 style: rotary pair i joins dims i and
// i + head_dim/2 and turns by position * frequency(i).
struct RopeOptions {
  double theta = 500000.0;  // frequency base. Default 500000 (Llama 3).
  // Llama 3.1 long-context scaling: frequencies whose wavelength exceeds
  // original_context / low_freq_factor are divided by scaling_factor, those
  // below original_context / high_freq_factor are kept, and those between are
  // blended. scaling_factor 1 turns it off. Defaults: 8, 1, 4, 8192 tokens.
  double scaling_factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_context = 8192.0;

  Status validate() const;
};

class RotaryEmbedding {
 public:
  RotaryEmbedding(int head_dim, const RopeOptions& options);

  int head_dim() const { return head_dim_; }
  // Radians per token of rotary pair `pair` (0 = highest frequency).
  double frequency(int pair) const { return frequencies_[pair]; }
  // Rotates `count` consecutive vectors of head_dim floats, all at `position`.
  void rotate(int64_t position, float* vectors, int count) const;

 private:
  int head_dim_;
  std::vector<double> frequencies_;
};

// The knobs of the generator. Logits are contributions to q.k / sqrt(head_dim).
// Rotary pairs are split into disjoint bands by frequency: the highest
// `recency_pair_fraction` carries the recency bias; the lowest
// `needle_pair_fraction` carries the needles' class and the needles, so that
// they survive rotation over long distances and meet nothing but the
// isotropic residual there; the
// `semantic_pair_fraction` just above it carries topics, sinks and outlier
// channels; the pairs in between carry only the unstructured part. The defaults are
// calibrated on llama-3.1-8b at 32K tokens (docs/workload.md).
struct WorkloadOptions {
  uint64_t seed = 1;       // every element derives from it. Default 1.
  bool apply_rope = true;  // false yields the pre-rotation vectors. Default true.
  RopeOptions rope;        // default: Llama 3.1 (theta 500000, scaling 8).

  // Unstructured part. Real keys are strongly anisotropic: a few principal
  // directions hold most of their variance. So per (layer, KV head) the
  // unstructured key lies mostly in a random subspace of rank
  // round(key_rank_fraction * head_dim), spanning every band but the needle
  // band, whose directions' stds fall geometrically from the first to the
  // last by key_spectrum_ratio; an isotropic residual over all dims holds the
  // rest. Queries use the same subspace and spectrum: they read what keys
  // write. Values stay i.i.d. normal.
  float key_noise_std = 1.0f;       // per-dim RMS of the unstructured key part. Default 1.
  float query_noise_std = 0.25f;    // per-dim RMS of the unstructured query part. Default 0.25.
  float value_noise_std = 1.0f;     // per-dim std of values. Default 1.
  double key_rank_fraction = 0.25;  // subspace rank over head_dim. Default 0.25 (32 of 128).
  // Std of the subspace's last direction over its first. Default 0.1.
  float key_spectrum_ratio = 0.1f;
  // Isotropic residual std, as a fraction of key_noise_std (keys) and
  // query_noise_std (queries). Default 0.2 both.
  float key_residual = 0.2f;
  float query_residual = 0.2f;

  // Outlier channels: a few dims per KV head, chosen in the semantic band,
  // whose keys hold a large value of fixed sign at every token.
  int outlier_channels = 4;         // per KV head. Default 4.
  float outlier_magnitude = 12.0f;  // mean |value|, in key_noise_std units. Default 12.
  float outlier_jitter = 0.1f;      // per-token relative std of that value. Default 0.1.

  // Attention sinks: the first tokens draw a large logit from every query.
  int sink_tokens = 4;            // tokens. Default 4.
  float sink_logit = 11.0f;       // logit added to a sink for every query. Default 11.
  float sink_value_scale = 0.2f;  // sinks' values are scaled by this (near no-op). Default 0.2.

  // Recency: a vector shared by keys and queries in the high-frequency band,
  // so after RoPE its share of q.k is a mean of cos(frequency * distance): 1
  // at distance 0, fading within tens of tokens at the defaults.
  float recency_logit = 8.0f;            // logit at distance 0. Default 8.
  double recency_pair_fraction = 0.375;  // share of rotary pairs. Default 0.375 (24 of 64).

  // Topics: the context is a run of segments, each about one of num_topics
  // topics; a token's key leans toward its topic's direction, and every
  // decode query is about one topic, so attention concentrates on the tokens
  // of that topic wherever they are.
  int num_topics = 64;                   // topics. Default 64.
  int64_t topic_segment_tokens = 256;    // tokens per segment. Default 256.
  float topic_logit = 4.0f;              // logit a query gives its topic's tokens. Default 4.
  float topic_value_norm = 8.0f;         // norm of a topic's shared value component. Default 8.
  double semantic_pair_fraction = 0.25;  // share of rotary pairs. Default 0.25 (16 of 64).

  // Needles: single tokens that one later decode query looks for, like the
  // digits of "the secret code is 123456". A needle belongs to a rare token
  // class ("number-like tokens"): a fraction needle_class_fraction of all
  // tokens carries a shared class component in the needle band, along a
  // direction where ordinary keys have only the residual, so the class is a
  // small, low-variance feature that a fine quantizer can give centroids of
  // its own and a coarse one blurs into common centroids. The needle's key
  // adds a smaller component of its own, orthogonal to the class, that only
  // exact scoring resolves. The target query matches the class moderately
  // (needle_class_logit) and its needle strongly (needle_logit). Needle j sits
  // at depth needle_depth_min + (j + 0.5) / num_needles * (needle_depth_max -
  // needle_depth_min) of the prompt and is the target of the decode query at
  // position prompt_tokens + j * needle_query_interval.
  int num_needles = 8;                   // needles. Default 8.
  int64_t prompt_tokens = 32768;         // prompt length; needles lie inside it. Default 32768.
  double needle_depth_min = 0.05;        // fraction of the prompt. Default 0.05.
  double needle_depth_max = 0.9;         // fraction of the prompt. Default 0.9.
  int64_t needle_query_interval = 4;     // decode steps between needle queries. Default 4.
  double needle_class_fraction = 0.005;  // share of tokens in the needles' class. Default 0.005.
  // Norm of the class component of a class token's key, in key_noise_std
  // units: about the distance between two topics' keys. Default 14.
  float needle_class_key_norm = 14.0f;
  float needle_class_logit = 8.0f;  // logit a needle query gives every class token. Default 8.
  // The needle key's coordinate along its own direction, in key_noise_std
  // units; the residual along it is replaced. Default 4.
  float needle_key_norm = 4.0f;
  float needle_logit = 14.0f;           // logit the target query adds to its needle. Default 14.
  double needle_pair_fraction = 0.125;  // share of rotary pairs. Default 0.125 (8 of 64).
  // Query heads per GQA group that look for the needle (retrieval heads); the
  // first ones of each group. Clamped to the group size. Default 1.
  int needle_query_heads = 1;

  // Drift: from token drift_start on, the keys' distribution moves, as a long
  // generation wanders away from its prompt, so that a codec fit on the
  // prompt quantizes them worse. The shift grows linearly to its full size
  // over drift_tokens tokens, f = clamp((token - drift_start) /
  // drift_tokens, 0, 1), and stays there. Queries do not drift.
  int64_t drift_start = -1;     // first drifting token; -1: no drift. Default -1.
  int64_t drift_tokens = 8192;  // tokens until the full shift, >= 1. Default 8192.
  // The whole key (so every logit of the token) grows by 1 + drift_scale * f.
  // Default 0.
  float drift_scale = 0.0f;  // 0..1000
  // Every dim moves by drift_offset * f * key_noise_std, with a fixed random
  // sign per (layer, KV head, dim), before RoPE. Default 0.
  float drift_offset = 0.0f;
  // Outlier channels' magnitudes grow by 1 + drift_outlier_growth * f. Default 0.
  float drift_outlier_growth = 0.0f;

  Status validate(const ModelSpec& spec) const;
};

struct Needle {
  int64_t position = 0;         // the token whose key carries the needle
  int64_t target_position = 0;  // the decode position whose query looks for it
};

class SyntheticWorkload {
 public:
  static Result<SyntheticWorkload> create(const ModelSpec& spec,
                                          const WorkloadOptions& options = {});

  const ModelSpec& spec() const { return spec_; }
  const WorkloadOptions& options() const { return options_; }

  // Keys of tokens [begin, end) of `layer`: [end - begin, kv_heads, head_dim]
  // fp32 into host memory `out`, RoPE applied at each token's position.
  Status keys(int layer, int64_t begin, int64_t end, float* out) const;
  // Values of tokens [begin, end): same shape, no rotation.
  Status values(int layer, int64_t begin, int64_t end, float* out) const;
  // The query of the token at `position`, i.e. of the decode step whose
  // context is tokens [0, position]: [q_heads, head_dim] fp32 into host memory.
  Status query(int layer, int64_t position, float* out) const;

  // Needles in position order.
  const std::vector<Needle>& needles() const { return needles_; }
  // The needle that the query at `position` looks for, if any.
  std::optional<Needle> needle_for_query(int64_t position) const;
  // Whether query head `q_head` looks for needles at their target positions.
  bool is_needle_head(int q_head) const;
  // Whether the token at `position` belongs to the needles' class (every
  // needle does).
  bool is_class_token(int64_t position) const;
  // The topic of the token at `position` and of the query at `position`.
  int token_topic(int64_t position) const;
  int query_topic(int layer, int64_t position) const;

 private:
  // Per (layer, KV head) directions, drawn once from the seed.
  struct HeadBasis {
    std::vector<float> topic_dirs;    // [num_topics, head_dim], unit
    std::vector<float> topic_values;  // [num_topics, head_dim]
    std::vector<float> recency_dir;   // [head_dim], unit
    std::vector<float> sink_dir;      // [head_dim], unit
    std::vector<float> needle_dirs;   // [num_needles, head_dim], unit, orthogonal to class_dir
    std::vector<float> class_dir;     // [head_dim], unit
    // The subspace of the unstructured part: [rank, head_dim], orthonormal
    // rows times each direction's key std.
    std::vector<float> subspace;
    std::vector<int> outlier_dims;
    std::vector<float> outlier_values;
  };

  SyntheticWorkload(const ModelSpec& spec, const WorkloadOptions& options);
  Status check_range(int layer, int64_t begin, int64_t end, const float* out) const;
  const HeadBasis& basis(int layer, int kv_head) const {
    return bases_[static_cast<size_t>(layer) * spec_.num_kv_heads + kv_head];
  }
  int needle_index_at(int64_t position) const;
  void key_pre_rope(int layer, int kv_head, int64_t token, float* out) const;
  // The drift's share at `token`, 0..1 (see WorkloadOptions::drift_start).
  float drift_fraction(int64_t token) const;
  // Unstructured part: the subspace's directions times normals times
  // `subspace_scale`, plus an isotropic residual of std `residual_std`.
  void unstructured(const HeadBasis& b, uint64_t key, float subspace_scale, float residual_std,
                    float* out) const;

  ModelSpec spec_;
  WorkloadOptions options_;
  RotaryEmbedding rope_;
  std::vector<HeadBasis> bases_;
  std::vector<Needle> needles_;
  // Key and query norms of each structured component; their product over
  // sqrt(head_dim) is the component's logit.
  float topic_key_norm_ = 0, topic_query_norm_ = 0;
  float sink_key_norm_ = 0, sink_query_norm_ = 0;
  float recency_norm_ = 0;
  float needle_query_norm_ = 0;
  float class_key_norm_ = 0, class_query_norm_ = 0;
  // Query subspace scale relative to the key's: the same spectrum, scaled to
  // query_noise_std.
  float query_subspace_scale_ = 0;
};

}  // namespace pqkv::workload
