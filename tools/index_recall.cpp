#include "tools/index_recall.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "index/layer_index.h"

namespace pqkv::tools {
namespace {

// Boundary ties and float rounding: a selected score this close to the K-th
// exact score counts as a hit.
constexpr double kTieTolerance = 1e-5;

struct LayerInput {
  const std::vector<float>& keys;  // [tokens][kv_heads][head_dim]
  int kv_heads = 0;
  int head_dim = 0;
  int64_t tokens = 0;  // searched: [0, tokens)
};

// Scores of every token of `head` against `query`, in double.
void exact_scores(const LayerInput& in, int head, const float* query, std::vector<double>* out) {
  out->resize(static_cast<size_t>(in.tokens));
  const int64_t stride = int64_t{in.kv_heads} * in.head_dim;
  for (int64_t t = 0; t < in.tokens; ++t) {
    const float* key = in.keys.data() + t * stride + int64_t{head} * in.head_dim;
    double dot = 0;
    for (int c = 0; c < in.head_dim; ++c)
      dot += static_cast<double>(query[c]) * key[c];
    (*out)[t] = dot;
  }
}

Result<LayerRecall> layer_recall(const engine::SavedSequences& saved,
                                 const engine::SavedSequenceInfo& info, int layer,
                                 const RecallOptions& options) {
  const ModelSpec& spec = info.spec;
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  PQKV_ASSIGN_OR_RETURN(index::IndexSnapshot snap, saved.read_index(info.name, layer));
  PQKV_ASSIGN_OR_RETURN(std::vector<float> keys, saved.read_keys(info.name, layer));
  const int64_t tokens = snap.num_tokens;
  if (tokens < 1 || tokens > info.lengths[layer]) {
    return Status::corruption("sequence '" + info.name + "' layer " + std::to_string(layer) +
                              " has an index of " + std::to_string(tokens) + " tokens over " +
                              std::to_string(info.lengths[layer]) + " stored rows");
  }
  PQKV_ASSIGN_OR_RETURN(int64_t k, recall_k(info, tokens, options));
  PQKV_ASSIGN_OR_RETURN(auto index, index::make_layer_index(Device::cpu(), d, kv, info.options.pq,
                                                            info.options.selection));
  PQKV_RETURN_IF_ERROR(index->restore(snap, Stream::host()));

  LayerRecall out;
  out.layer = layer;
  out.tokens = tokens;
  out.k = k;
  out.heads.assign(static_cast<size_t>(kv), HeadRecall{0, 1});
  std::seed_seq seq{static_cast<uint32_t>(options.seed), static_cast<uint32_t>(options.seed >> 32),
                    static_cast<uint32_t>(layer)};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<int64_t> pick(0, tokens - 1);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  const LayerInput in{keys, kv, d, tokens};
  std::vector<float> queries(static_cast<size_t>(kv) * d);
  std::vector<int32_t> selected(static_cast<size_t>(kv * k));
  std::vector<double> scores, sorted;
  for (int q = 0; q < options.queries; ++q) {
    const int64_t pos = pick(rng);
    for (int h = 0; h < kv; ++h) {
      const float* key = keys.data() + (pos * kv + h) * d;
      double sq = 0;
      for (int c = 0; c < d; ++c)
        sq += double{key[c]} * key[c];
      const auto sigma = static_cast<float>(options.perturb * std::sqrt(sq / d));
      for (int c = 0; c < d; ++c)
        queries[static_cast<size_t>(h) * d + c] = key[c] + sigma * noise(rng);
    }
    index::SearchRequest request;
    request.queries = TensorView(queries.data(), DType::kF32, Device::cpu(), {kv, d});
    request.begin = 0;
    request.end = tokens;
    request.k = k;
    request.aggregation = info.options.aggregation;
    PQKV_RETURN_IF_ERROR(index->search(request, selected.data(), Stream::host(), nullptr));
    for (int h = 0; h < kv; ++h) {
      exact_scores(in, h, queries.data() + static_cast<size_t>(h) * d, &scores);
      sorted = scores;
      std::nth_element(sorted.begin(), sorted.begin() + (tokens - k), sorted.end());
      const double kth = sorted[tokens - k];
      const double top = *std::max_element(sorted.begin() + (tokens - k), sorted.end());
      const double threshold = kth - kTieTolerance * std::max(1.0, std::abs(kth));
      // The index ranks by softmax weight: tokens whose weight underflows
      // fp32 are all alike to it.
      const auto weight = [&](double score) {
        return std::exp(static_cast<float>((score - top) / std::sqrt(static_cast<double>(d))));
      };
      const bool kth_underflows = weight(kth) == 0.0f;
      int64_t hits = 0;
      for (int64_t i = 0; i < k; ++i) {
        const int32_t p = selected[h * k + i];
        if (p < 0 || p >= tokens) continue;
        if (scores[p] >= threshold || (kth_underflows && weight(scores[p]) == 0.0f)) ++hits;
      }
      const double r = static_cast<double>(hits) / static_cast<double>(k);
      out.heads[h].mean += r / options.queries;
      out.heads[h].min = std::min(out.heads[h].min, r);
    }
  }
  out.min = 1;
  for (const HeadRecall& h : out.heads) {
    out.mean += h.mean / kv;
    out.min = std::min(out.min, h.min);
  }
  return out;
}

}  // namespace

Status check_recall_options(const RecallOptions& o) {
  if (o.queries < 1 || o.queries > RecallOptions::kMaxQueries) {
    return Status::invalid_argument("--queries must be in 1.." +
                                    std::to_string(RecallOptions::kMaxQueries) + ", got " +
                                    std::to_string(o.queries));
  }
  if (o.top_k && *o.top_k < 1) {
    return Status::invalid_argument("--top-k must be at least 1, got " + std::to_string(*o.top_k));
  }
  if (o.top_fraction && !(*o.top_fraction > 0 && *o.top_fraction <= 1)) {
    return Status::invalid_argument("--top-fraction must be in (0, 1], got " +
                                    std::to_string(*o.top_fraction));
  }
  if (o.top_k && o.top_fraction) {
    return Status::invalid_argument("give --top-k or --top-fraction, not both");
  }
  if (!(o.perturb >= 0 && o.perturb <= RecallOptions::kMaxPerturb)) {
    return Status::invalid_argument(
        "--perturb must be a finite value in 0.." + std::to_string(RecallOptions::kMaxPerturb) +
        " (noise relative to each key's RMS; past that the queries are noise alone), got " +
        std::to_string(o.perturb));
  }
  return ok_status();
}

Result<int64_t> recall_k(const engine::SavedSequenceInfo& info, int64_t tokens,
                         const RecallOptions& options) {
  if (options.top_k) {
    if (*options.top_k > tokens) {
      return Status::invalid_argument("--top-k " + std::to_string(*options.top_k) + " passes the " +
                                      std::to_string(tokens) + " tokens of sequence '" + info.name +
                                      "'; give at most that many");
    }
    return *options.top_k;
  }
  int64_t k = 0;
  if (options.top_fraction) {
    k = std::llround(*options.top_fraction * static_cast<double>(tokens));
  } else {
    k = info.options.budget.resolve(tokens, info.prefill_length).top_k;
  }
  return std::clamp<int64_t>(k, 1, tokens);
}

Result<SequenceRecall> sequence_recall(const engine::SavedSequences& saved, const std::string& name,
                                       const RecallOptions& options,
                                       const RecallProgress& progress) {
  PQKV_RETURN_IF_ERROR(check_recall_options(options));
  PQKV_ASSIGN_OR_RETURN(engine::SavedSequenceInfo info, saved.info(name));
  std::vector<int> layers;
  for (int l = 0; l < info.spec.num_layers; ++l) {
    if (!info.layer_codes[l].empty()) layers.push_back(l);
  }
  if (layers.empty()) {
    return Status::failed_precondition("sequence '" + name +
                                       "' was saved without an index (before finish_prefill): "
                                       "there is no selection to measure");
  }
  SequenceRecall out;
  out.name = name;
  out.selection = info.options.selection.to_string();
  out.queries = options.queries;
  out.seed = options.seed;
  out.perturb = options.perturb;
  out.min = 1;
  for (size_t i = 0; i < layers.size(); ++i) {
    Result<LayerRecall> r = layer_recall(saved, info, layers[i], options);
    if (!r.ok()) {
      return r.status().with_context("recall of sequence '" + name + "' layer " +
                                     std::to_string(layers[i]));
    }
    out.mean += r->mean / static_cast<double>(layers.size());
    out.min = std::min(out.min, r->min);
    out.layers.push_back(std::move(*r));
    if (progress) progress(static_cast<int>(i) + 1, static_cast<int>(layers.size()));
  }
  return out;
}

}  // namespace pqkv::tools
