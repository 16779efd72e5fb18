#include "workload/synthetic_workload.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>

namespace pqkv::workload {
namespace {

// Independent random streams: each element hashes (seed, stream, indices).
enum class Stream : uint64_t {
  kKeyNoise = 1,
  kValueNoise,
  kQueryNoise,
  kOutlierJitter,
  kTokenTopic,
  kQueryTopic,
  kTopicDir,
  kTopicValue,
  kRecencyDir,
  kSinkDir,
  kNeedleDir,
  kOutlierDims,
  kSubspace,
  kClassDir,
  kClassToken,
  kDriftSign,
};

// How a structured component's logit splits between key and query norms
// (key norm = share * sqrt(logit * sqrt(d))): sinks and topics live mostly in
// the keys, as in real models, which keeps the query's share of the noise low.
constexpr float kSinkKeyShare = 2.0f;
constexpr float kTopicKeyShare = 1.5f;

// Bounds the topic tables built at creation: 2 * topics * head_dim floats per
// (layer, KV head), 8 MB per layer of llama-3.1-8b at the bound.
constexpr int kMaxTopics = 1024;

// splitmix64's finalizer: a bijective 64-bit mix.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline uint64_t hash_key(uint64_t seed, Stream stream, uint64_t a, uint64_t b, uint64_t c) {
  uint64_t h = mix64(seed ^ mix64(static_cast<uint64_t>(stream)));
  h = mix64(h ^ a);
  h = mix64(h ^ b);
  return mix64(h ^ c);
}

// Two independent standard normals from one hash (Box-Muller on two 24-bit
// uniforms, in float: generation speed decides how fast a long context fills;
// the tails reach about 5.9 sigma).
inline std::pair<float, float> normal_pair(uint64_t h) {
  constexpr float kScale = 1.0f / 16777216.0f;
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * kScale;
  const float u2 = (static_cast<float>(h & 0xffffffu) + 0.5f) * kScale;
  const float r = std::sqrt(-2.0f * std::log(u1));
  const float a = 2.0f * std::numbers::pi_v<float> * u2;
  return {r * std::cos(a), r * std::sin(a)};
}

int pairs_of(double fraction, int half) {
  return std::clamp(static_cast<int>(std::lround(fraction * half)), 1, half);
}

// A random unit vector over rotary pairs [first_pair, first_pair + num_pairs).
void unit_in_band(uint64_t key, int head_dim, int first_pair, int num_pairs, float* out) {
  const int half = head_dim / 2;
  std::fill(out, out + head_dim, 0.0f);
  double norm2 = 0;
  for (int p = first_pair; p < first_pair + num_pairs; ++p) {
    const auto [a, b] = normal_pair(mix64(key + static_cast<uint64_t>(p)));
    out[p] = a;
    out[p + half] = b;
    norm2 += static_cast<double>(a) * a + static_cast<double>(b) * b;
  }
  const auto inv = static_cast<float>(1.0 / std::sqrt(std::max(norm2, 1e-30)));
  for (int i = 0; i < head_dim; ++i)
    out[i] *= inv;
}

// Removes from `v` its components along the `count` orthonormal rows of
// `rows` ([count, n]) and renormalizes it.
void orthogonalize(const float* rows, int count, int n, float* v) {
  for (int r = 0; r < count; ++r) {
    const float* u = rows + static_cast<int64_t>(r) * n;
    double along = 0;
    for (int i = 0; i < n; ++i)
      along += static_cast<double>(u[i]) * v[i];
    for (int i = 0; i < n; ++i)
      v[i] -= static_cast<float>(along) * u[i];
  }
  double norm2 = 0;
  for (int i = 0; i < n; ++i)
    norm2 += static_cast<double>(v[i]) * v[i];
  const auto inv = static_cast<float>(1.0 / std::sqrt(std::max(norm2, 1e-30)));
  for (int i = 0; i < n; ++i)
    v[i] *= inv;
}

inline void add_scaled(const float* v, float scale, int n, float* out) {
  for (int i = 0; i < n; ++i)
    out[i] += scale * v[i];
}

Status check_fraction(double f, const char* name) {
  if (!(f > 0.0 && f <= 1.0)) {
    return Status::invalid_argument(std::string(name) + " must be in (0, 1], got " +
                                    std::to_string(f));
  }
  return ok_status();
}

}  // namespace

Status RopeOptions::validate() const {
  if (!(theta > 1.0)) return Status::invalid_argument("rope theta must be > 1");
  if (!(scaling_factor >= 1.0)) return Status::invalid_argument("rope scaling_factor must be >= 1");
  if (!(high_freq_factor > low_freq_factor && low_freq_factor > 0.0)) {
    return Status::invalid_argument("rope needs 0 < low_freq_factor < high_freq_factor");
  }
  if (!(original_context > 0.0))
    return Status::invalid_argument("rope original_context must be > 0");
  return ok_status();
}

RotaryEmbedding::RotaryEmbedding(int head_dim, const RopeOptions& options)
    : head_dim_(head_dim), frequencies_(static_cast<size_t>(head_dim / 2)) {
  const double low_freq_wavelength = options.original_context / options.low_freq_factor;
  const double high_freq_wavelength = options.original_context / options.high_freq_factor;
  for (int i = 0; i < head_dim / 2; ++i) {
    const double f = std::pow(options.theta, -2.0 * i / head_dim);
    const double wavelength = 2.0 * std::numbers::pi / f;
    double scaled = f;
    if (wavelength > low_freq_wavelength) {
      scaled = f / options.scaling_factor;
    } else if (wavelength >= high_freq_wavelength) {
      const double smooth = (options.original_context / wavelength - options.low_freq_factor) /
                            (options.high_freq_factor - options.low_freq_factor);
      scaled = (1.0 - smooth) * f / options.scaling_factor + smooth * f;
    }
    frequencies_[static_cast<size_t>(i)] = scaled;
  }
}

void RotaryEmbedding::rotate(int64_t position, float* vectors, int count) const {
  const int half = head_dim_ / 2;
  for (int i = 0; i < half; ++i) {
    // The angle in double: position * frequency reaches 1e6 radians at 1M tokens.
    const double angle = static_cast<double>(position) * frequencies_[static_cast<size_t>(i)];
    const auto c = static_cast<float>(std::cos(angle));
    const auto s = static_cast<float>(std::sin(angle));
    for (int v = 0; v < count; ++v) {
      float* x = vectors + static_cast<int64_t>(v) * head_dim_;
      const float a = x[i];
      const float b = x[i + half];
      x[i] = a * c - b * s;
      x[i + half] = a * s + b * c;
    }
  }
}

Status WorkloadOptions::validate(const ModelSpec& spec) const {
  PQKV_RETURN_IF_ERROR(spec.validate());
  PQKV_RETURN_IF_ERROR(rope.validate());
  if (!(key_noise_std > 0 && query_noise_std >= 0 && value_noise_std >= 0)) {
    return Status::invalid_argument("noise stds must be >= 0 (key_noise_std > 0)");
  }
  if (!(key_residual >= 0 && key_residual < 1 && query_residual >= 0 && query_residual <= 1)) {
    return Status::invalid_argument("key_residual must be in [0, 1) and query_residual in [0, 1]");
  }
  if (!(key_spectrum_ratio > 0 && key_spectrum_ratio <= 1)) {
    return Status::invalid_argument("key_spectrum_ratio must be in (0, 1]");
  }
  if (!(needle_class_fraction >= 0 && needle_class_fraction <= 1)) {
    return Status::invalid_argument("needle_class_fraction must be in [0, 1]");
  }
  for (const auto& [f, name] : {std::pair{key_rank_fraction, "key_rank_fraction"},
                                std::pair{recency_pair_fraction, "recency_pair_fraction"},
                                std::pair{semantic_pair_fraction, "semantic_pair_fraction"},
                                std::pair{needle_pair_fraction, "needle_pair_fraction"}}) {
    PQKV_RETURN_IF_ERROR(check_fraction(f, name));
  }
  const int half = spec.head_dim / 2;
  const int semantic = pairs_of(semantic_pair_fraction, half);
  if (pairs_of(recency_pair_fraction, half) + semantic + pairs_of(needle_pair_fraction, half) >
      half) {
    return Status::invalid_argument(
        "recency, semantic and needle bands must be disjoint: their pair fractions must sum to "
        "at most 1");
  }
  if (outlier_channels < 0 || outlier_channels > 2 * semantic) {
    return Status::invalid_argument("outlier_channels must be in [0, dims of the semantic band = " +
                                    std::to_string(2 * semantic) + "]");
  }
  if (!(outlier_magnitude >= 0 && outlier_jitter >= 0)) {
    return Status::invalid_argument("outlier_magnitude and outlier_jitter must be >= 0");
  }
  if (sink_tokens < 0 || !(sink_logit >= 0) || !(sink_value_scale >= 0)) {
    return Status::invalid_argument("sink_tokens, sink_logit and sink_value_scale must be >= 0");
  }
  if (!(recency_logit >= 0 && topic_logit >= 0 && topic_value_norm >= 0)) {
    return Status::invalid_argument("recency_logit, topic_logit, topic_value_norm must be >= 0");
  }
  if (num_topics < 1 || num_topics > kMaxTopics) {
    return Status::invalid_argument("num_topics must be in [1, " + std::to_string(kMaxTopics) +
                                    "], got " + std::to_string(num_topics));
  }
  if (topic_segment_tokens < 1)
    return Status::invalid_argument("topic_segment_tokens must be >= 1");
  if (drift_tokens < 1 || drift_start < -1) {
    return Status::invalid_argument("drift needs drift_tokens >= 1 and drift_start >= -1 (off)");
  }
  // The bound keeps drifted keys inside fp32 and bf16: past it they overflow to
  // Inf, and the append's refusal named no option.
  constexpr float kMaxDrift = 1000.0f;
  for (const auto& [name, v] : {std::pair<const char*, float>{"drift_scale", drift_scale},
                                {"drift_offset", drift_offset},
                                {"drift_outlier_growth", drift_outlier_growth}}) {
    if (!(v >= 0 && v <= kMaxDrift)) {
      return Status::invalid_argument(std::string(name) + " must be in 0..1000 (larger drifts " +
                                      "overflow the keys), got " + std::to_string(v));
    }
  }
  if (num_needles < 0 || prompt_tokens < 1) {
    return Status::invalid_argument("num_needles must be >= 0 and prompt_tokens >= 1");
  }
  if (num_needles > 0) {
    if (!(0.0 <= needle_depth_min && needle_depth_min < needle_depth_max &&
          needle_depth_max <= 1.0)) {
      return Status::invalid_argument("needle depths need 0 <= min < max <= 1");
    }
    if (!(needle_key_norm > 0 && needle_logit >= 0 && needle_class_key_norm > 0 &&
          needle_class_logit >= 0) ||
        needle_query_interval < 1 || needle_query_heads < 0) {
      return Status::invalid_argument(
          "needles need needle_key_norm > 0, needle_class_key_norm > 0, needle_logit >= 0, "
          "needle_class_logit >= 0, needle_query_interval >= 1, needle_query_heads >= 0");
    }
    const auto lo =
        std::max<int64_t>(sink_tokens, static_cast<int64_t>(needle_depth_min * prompt_tokens));
    const auto hi = static_cast<int64_t>(needle_depth_max * prompt_tokens);
    if (hi - lo < num_needles) {
      return Status::invalid_argument("prompt_tokens " + std::to_string(prompt_tokens) +
                                      " leaves no room for " + std::to_string(num_needles) +
                                      " needles between the sinks and depth needle_depth_max");
    }
  }
  return ok_status();
}

SyntheticWorkload::SyntheticWorkload(const ModelSpec& spec, const WorkloadOptions& options)
    : spec_(spec), options_(options), rope_(spec.head_dim, options.rope) {}

Result<SyntheticWorkload> SyntheticWorkload::create(const ModelSpec& spec,
                                                    const WorkloadOptions& options) {
  if (Status s = options.validate(spec); !s.ok()) return s.with_context("synthetic workload");
  SyntheticWorkload w(spec, options);
  const int d = spec.head_dim;
  const int half = d / 2;
  const float sqrt_d = std::sqrt(static_cast<float>(d));
  const int recency_pairs = pairs_of(options.recency_pair_fraction, half);
  const int semantic_pairs = pairs_of(options.semantic_pair_fraction, half);
  const int needle_pairs = pairs_of(options.needle_pair_fraction, half);
  // Bands from high to low frequency: recency, noise only, semantic, needle.
  const int semantic_begin = half - needle_pairs - semantic_pairs;

  const auto split = [&](float logit, float key_share) {
    const float base = std::sqrt(logit * sqrt_d);
    return std::pair{base * key_share, key_share > 0 ? base / key_share : 0.0f};
  };
  std::tie(w.topic_key_norm_, w.topic_query_norm_) = split(options.topic_logit, kTopicKeyShare);
  std::tie(w.sink_key_norm_, w.sink_query_norm_) = split(options.sink_logit, kSinkKeyShare);
  w.recency_norm_ = split(options.recency_logit, 1.0f).first;
  if (options.num_needles > 0) {
    w.needle_query_norm_ =
        options.needle_logit * sqrt_d / (options.needle_key_norm * options.key_noise_std);
    w.class_key_norm_ = options.needle_class_key_norm * options.key_noise_std;
    w.class_query_norm_ = options.needle_class_logit * sqrt_d / w.class_key_norm_;
  }
  const int free_pairs = half - needle_pairs;
  const int rank =
      std::clamp(static_cast<int>(std::lround(options.key_rank_fraction * d)), 1, 2 * free_pairs);
  // Key stds of the subspace's directions: geometric from first to last, and
  // together the unstructured variance less the residual's.
  std::vector<double> stds(static_cast<size_t>(rank));
  double sum2 = 0;
  for (int i = 0; i < rank; ++i) {
    const double s =
        rank > 1 ? std::pow(options.key_spectrum_ratio, static_cast<double>(i) / (rank - 1)) : 1.0;
    stds[static_cast<size_t>(i)] = s;
    sum2 += s * s;
  }
  const double key_kr = 1.0 - static_cast<double>(options.key_residual) * options.key_residual;
  const double query_kr =
      1.0 - static_cast<double>(options.query_residual) * options.query_residual;
  for (double& s : stds)
    s *= options.key_noise_std * std::sqrt(d * key_kr / sum2);
  w.query_subspace_scale_ = static_cast<float>(options.query_noise_std / options.key_noise_std *
                                               std::sqrt(query_kr / key_kr));

  const uint64_t seed = options.seed;
  const int topics = options.num_topics;
  w.bases_.resize(static_cast<size_t>(spec.num_layers) * spec.num_kv_heads);
  tbb::parallel_for(0, static_cast<int>(w.bases_.size()), [&](int index) {
    const int layer = index / spec.num_kv_heads;
    const int head = index % spec.num_kv_heads;
    HeadBasis& b = w.bases_[static_cast<size_t>(index)];
    b.topic_dirs.resize(static_cast<size_t>(topics) * d);
    b.topic_values.resize(b.topic_dirs.size());
    for (int t = 0; t < topics; ++t) {
      unit_in_band(hash_key(seed, Stream::kTopicDir, layer, head, t), d, semantic_begin,
                   semantic_pairs, b.topic_dirs.data() + static_cast<int64_t>(t) * d);
      float* value = b.topic_values.data() + static_cast<int64_t>(t) * d;
      unit_in_band(hash_key(seed, Stream::kTopicValue, layer, head, t), d, 0, half, value);
      for (int i = 0; i < d; ++i)
        value[i] *= options.topic_value_norm;
    }
    b.recency_dir.resize(static_cast<size_t>(d));
    unit_in_band(hash_key(seed, Stream::kRecencyDir, layer, head, 0), d, 0, recency_pairs,
                 b.recency_dir.data());
    b.sink_dir.resize(static_cast<size_t>(d));
    unit_in_band(hash_key(seed, Stream::kSinkDir, layer, head, 0), d, semantic_begin,
                 semantic_pairs, b.sink_dir.data());
    b.class_dir.resize(static_cast<size_t>(d));
    unit_in_band(hash_key(seed, Stream::kClassDir, layer, head, 0), d, free_pairs, needle_pairs,
                 b.class_dir.data());
    b.needle_dirs.resize(static_cast<size_t>(options.num_needles) * d);
    for (int n = 0; n < options.num_needles; ++n) {
      float* dir = b.needle_dirs.data() + static_cast<int64_t>(n) * d;
      unit_in_band(hash_key(seed, Stream::kNeedleDir, layer, head, n), d, free_pairs, needle_pairs,
                   dir);
      orthogonalize(b.class_dir.data(), 1, d, dir);
    }
    // The subspace: Gram-Schmidt over random vectors outside the needle band.
    b.subspace.resize(static_cast<size_t>(rank) * d);
    for (int i = 0; i < rank; ++i) {
      float* row = b.subspace.data() + static_cast<int64_t>(i) * d;
      unit_in_band(hash_key(seed, Stream::kSubspace, layer, head, i), d, 0, free_pairs, row);
      orthogonalize(b.subspace.data(), i, d, row);
    }
    for (int i = 0; i < rank; ++i) {
      for (int j = 0; j < d; ++j)
        b.subspace[static_cast<size_t>(i * d + j)] *=
            static_cast<float>(stds[static_cast<size_t>(i)]);
    }
    // Outlier dims: a partial shuffle of the semantic band's dims.
    std::vector<int> dims;
    for (int p = semantic_begin; p < semantic_begin + semantic_pairs; ++p) {
      dims.push_back(p);
      dims.push_back(p + half);
    }
    const uint64_t key = hash_key(seed, Stream::kOutlierDims, layer, head, 0);
    for (int c = 0; c < options.outlier_channels; ++c) {
      const uint64_t h = mix64(key + static_cast<uint64_t>(c));
      std::swap(dims[static_cast<size_t>(c)],
                dims[static_cast<size_t>(c) + h % (dims.size() - static_cast<size_t>(c))]);
      b.outlier_dims.push_back(dims[static_cast<size_t>(c)]);
      const float sign = (h >> 63) != 0 ? -1.0f : 1.0f;
      b.outlier_values.push_back(sign * options.outlier_magnitude * options.key_noise_std);
    }
  });

  if (options.num_needles > 0) {
    const int64_t lo =
        std::max<int64_t>(options.sink_tokens,
                          static_cast<int64_t>(options.needle_depth_min * options.prompt_tokens));
    const auto hi = static_cast<int64_t>(options.needle_depth_max * options.prompt_tokens);
    for (int j = 0; j < options.num_needles; ++j) {
      const auto offset =
          static_cast<int64_t>((j + 0.5) * static_cast<double>(hi - lo) / options.num_needles);
      w.needles_.push_back(
          {lo + offset,
           options.prompt_tokens + static_cast<int64_t>(j) * options.needle_query_interval});
    }
  }
  return w;
}

Status SyntheticWorkload::check_range(int layer, int64_t begin, int64_t end,
                                      const float* out) const {
  if (layer < 0 || layer >= spec_.num_layers) {
    return Status::out_of_range("layer " + std::to_string(layer) + " outside [0, " +
                                std::to_string(spec_.num_layers) + ")");
  }
  if (begin < 0 || end < begin) {
    return Status::invalid_argument("token range [" + std::to_string(begin) + ", " +
                                    std::to_string(end) + ") must have 0 <= begin <= end");
  }
  if (end > begin && out == nullptr) return Status::invalid_argument("output buffer is null");
  return ok_status();
}

int SyntheticWorkload::token_topic(int64_t position) const {
  const auto segment = static_cast<uint64_t>(position / options_.topic_segment_tokens);
  return static_cast<int>(hash_key(options_.seed, Stream::kTokenTopic, segment, 0, 0) %
                          static_cast<uint64_t>(options_.num_topics));
}

int SyntheticWorkload::query_topic(int layer, int64_t position) const {
  return static_cast<int>(hash_key(options_.seed, Stream::kQueryTopic, static_cast<uint64_t>(layer),
                                   static_cast<uint64_t>(position), 0) %
                          static_cast<uint64_t>(options_.num_topics));
}

int SyntheticWorkload::needle_index_at(int64_t position) const {
  const auto it = std::lower_bound(needles_.begin(), needles_.end(), position,
                                   [](const Needle& n, int64_t p) { return n.position < p; });
  if (it == needles_.end() || it->position != position) return -1;
  return static_cast<int>(it - needles_.begin());
}

std::optional<Needle> SyntheticWorkload::needle_for_query(int64_t position) const {
  for (const Needle& n : needles_) {
    if (n.target_position == position) return n;
  }
  return std::nullopt;
}

bool SyntheticWorkload::is_class_token(int64_t position) const {
  if (needle_index_at(position) >= 0) return true;
  // A uniform in [0, 1) from the token's hash, 53 bits.
  const auto u = static_cast<double>(hash_key(options_.seed, Stream::kClassToken,
                                              static_cast<uint64_t>(position), 0, 0) >>
                                     11) *
                 0x1.0p-53;
  return u < options_.needle_class_fraction;
}

void SyntheticWorkload::unstructured(const HeadBasis& b, uint64_t key, float subspace_scale,
                                     float residual_std, float* out) const {
  const int d = spec_.head_dim;
  const int half = d / 2;
  for (int p = 0; p < half; ++p) {
    const auto [a, c] = normal_pair(mix64(key + static_cast<uint64_t>(p)));
    out[p] = residual_std * a;
    out[p + half] = residual_std * c;
  }
  const int rank = static_cast<int>(b.subspace.size()) / d;
  for (int i = 0; i < rank; i += 2) {
    const auto [a, c] = normal_pair(mix64(key + static_cast<uint64_t>(half + i / 2)));
    add_scaled(b.subspace.data() + static_cast<int64_t>(i) * d, subspace_scale * a, d, out);
    if (i + 1 < rank)
      add_scaled(b.subspace.data() + static_cast<int64_t>(i + 1) * d, subspace_scale * c, d, out);
  }
}

bool SyntheticWorkload::is_needle_head(int q_head) const {
  return q_head % spec_.group_size() < std::min(options_.needle_query_heads, spec_.group_size());
}

float SyntheticWorkload::drift_fraction(int64_t token) const {
  if (options_.drift_start < 0 || token < options_.drift_start) return 0.0f;
  return std::min(1.0f, static_cast<float>(token - options_.drift_start) /
                            static_cast<float>(options_.drift_tokens));
}

void SyntheticWorkload::key_pre_rope(int layer, int kv_head, int64_t token, float* out) const {
  const int d = spec_.head_dim;
  const HeadBasis& b = basis(layer, kv_head);
  const float sigma = options_.key_noise_std;
  const uint64_t key = hash_key(options_.seed, Stream::kKeyNoise, static_cast<uint64_t>(layer),
                                static_cast<uint64_t>(kv_head), static_cast<uint64_t>(token));
  const float drift = drift_fraction(token);
  unstructured(b, key, 1.0f, options_.key_residual * sigma, out);
  add_scaled(b.topic_dirs.data() + static_cast<int64_t>(token_topic(token)) * d, topic_key_norm_, d,
             out);
  add_scaled(b.recency_dir.data(), recency_norm_, d, out);
  const uint64_t jitter_key =
      hash_key(options_.seed, Stream::kOutlierJitter, static_cast<uint64_t>(layer),
               static_cast<uint64_t>(kv_head), static_cast<uint64_t>(token));
  for (size_t c = 0; c < b.outlier_dims.size(); ++c) {
    const float z = normal_pair(mix64(jitter_key + c)).first;
    out[b.outlier_dims[c]] += b.outlier_values[c] * (1.0f + options_.outlier_jitter * z) *
                              (1.0f + options_.drift_outlier_growth * drift);
  }
  if (token < options_.sink_tokens) add_scaled(b.sink_dir.data(), sink_key_norm_, d, out);
  if (options_.num_needles > 0 && is_class_token(token))
    add_scaled(b.class_dir.data(), class_key_norm_, d, out);
  if (const int n = needle_index_at(token); n >= 0) {
    // The needle's coordinate along its direction is exactly needle_key_norm:
    // the residual there is replaced, so the needle's lead does not hang on one draw.
    const float* dir = b.needle_dirs.data() + static_cast<int64_t>(n) * d;
    float along = 0;
    for (int i = 0; i < d; ++i)
      along += dir[i] * out[i];
    add_scaled(dir, options_.needle_key_norm * sigma - along, d, out);
  }
  if (drift > 0) {
    // The whole key grows (every logit of a drifted token with it), then moves.
    const float grow = 1.0f + options_.drift_scale * drift;
    const uint64_t signs = hash_key(options_.seed, Stream::kDriftSign, static_cast<uint64_t>(layer),
                                    static_cast<uint64_t>(kv_head), 0);
    for (int i = 0; i < d; ++i) {
      const float sign = (mix64(signs + static_cast<uint64_t>(i)) >> 63) != 0 ? -1.0f : 1.0f;
      out[i] = out[i] * grow + sign * options_.drift_offset * drift * sigma;
    }
  }
}

Status SyntheticWorkload::keys(int layer, int64_t begin, int64_t end, float* out) const {
  PQKV_RETURN_IF_ERROR(check_range(layer, begin, end, out));
  const int heads = spec_.num_kv_heads;
  const int64_t row = static_cast<int64_t>(heads) * spec_.head_dim;
  tbb::parallel_for(tbb::blocked_range<int64_t>(begin, end, 256),
                    [&](const tbb::blocked_range<int64_t>& r) {
                      for (int64_t t = r.begin(); t < r.end(); ++t) {
                        float* dst = out + (t - begin) * row;
                        for (int g = 0; g < heads; ++g) {
                          key_pre_rope(layer, g, t, dst + static_cast<int64_t>(g) * spec_.head_dim);
                        }
                        if (options_.apply_rope) rope_.rotate(t, dst, heads);
                      }
                    });
  return ok_status();
}

Status SyntheticWorkload::values(int layer, int64_t begin, int64_t end, float* out) const {
  PQKV_RETURN_IF_ERROR(check_range(layer, begin, end, out));
  const int d = spec_.head_dim;
  const int half = d / 2;
  const int heads = spec_.num_kv_heads;
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(begin, end, 256), [&](const tbb::blocked_range<int64_t>& r) {
        for (int64_t t = r.begin(); t < r.end(); ++t) {
          const int topic = token_topic(t);
          // Sinks carry little value: attending to them is close to a no-op.
          const float scale = t < options_.sink_tokens ? options_.sink_value_scale : 1.0f;
          for (int g = 0; g < heads; ++g) {
            float* v = out + ((t - begin) * heads + g) * d;
            const uint64_t key =
                hash_key(options_.seed, Stream::kValueNoise, static_cast<uint64_t>(layer),
                         static_cast<uint64_t>(g), static_cast<uint64_t>(t));
            for (int p = 0; p < half; ++p) {
              const auto [a, c] = normal_pair(mix64(key + static_cast<uint64_t>(p)));
              v[p] = options_.value_noise_std * a;
              v[p + half] = options_.value_noise_std * c;
            }
            add_scaled(basis(layer, g).topic_values.data() + static_cast<int64_t>(topic) * d, 1.0f,
                       d, v);
            for (int i = 0; i < d; ++i)
              v[i] *= scale;
          }
        }
      });
  return ok_status();
}

Status SyntheticWorkload::query(int layer, int64_t position, float* out) const {
  PQKV_RETURN_IF_ERROR(check_range(layer, position, position + 1, out));
  const int d = spec_.head_dim;
  const int topic = query_topic(layer, position);
  const std::optional<Needle> needle = needle_for_query(position);
  const int needle_index = needle ? needle_index_at(needle->position) : -1;
  for (int h = 0; h < spec_.num_q_heads; ++h) {
    const int g = h / spec_.group_size();
    const HeadBasis& b = basis(layer, g);
    float* q = out + static_cast<int64_t>(h) * d;
    const uint64_t key = hash_key(options_.seed, Stream::kQueryNoise, static_cast<uint64_t>(layer),
                                  static_cast<uint64_t>(h), static_cast<uint64_t>(position));
    unstructured(b, key, query_subspace_scale_, options_.query_residual * options_.query_noise_std,
                 q);
    add_scaled(b.topic_dirs.data() + static_cast<int64_t>(topic) * d, topic_query_norm_, d, q);
    add_scaled(b.recency_dir.data(), recency_norm_, d, q);
    add_scaled(b.sink_dir.data(), sink_query_norm_, d, q);
    if (needle_index >= 0 && is_needle_head(h)) {
      add_scaled(b.class_dir.data(), class_query_norm_, d, q);
      add_scaled(b.needle_dirs.data() + static_cast<int64_t>(needle_index) * d, needle_query_norm_,
                 d, q);
    }
  }
  if (options_.apply_rope) rope_.rotate(position, out, spec_.num_q_heads);
  return ok_status();
}

}  // namespace pqkv::workload
