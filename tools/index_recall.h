// Selection recall of a saved sequence's index, recomputed offline
// (`pqkv inspect DIR --recall`): for sampled queries, the top-K positions the
// saved index selects against the top-K of exact dot products over the
// stored keys.
//
// Per layer: the stored keys are read from the segment file
// (SavedSequences::read_keys) and the index is reopened on the CPU from its
// saved codec state and codes (LayerIndex::restore: no training, the codes
// as saved, whichever backend saved them). Each query is a stored key of a
// random position (the same position for every KV head) plus Gaussian noise
// of standard deviation `perturb` times that key's RMS, since real queries
// correlate with keys. Queries are one per KV head (q_heads = kv_heads), so
// GQA aggregation plays no part and the index's top-K is that of its own
// scores for that head. Every token of the layer's index is searched.
//
// recall@K of one (query, KV head) = the selected positions whose exact score
// is at least the K-th largest exact score, divided by K; a score within
// 1e-5 relative of the K-th counts (ties and float rounding at the boundary),
// and so does any pick whose softmax weight, exp((score - best) / sqrt(head_dim))
// in fp32, underflows to 0 when the K-th's does too: the index ranks by that
// weight, and such tokens are alike to it (very peaked queries).
// Reported per (layer, KV head) and per layer: the mean and the minimum over
// queries (and heads).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "pqkv/status.h"

namespace pqkv::tools {

struct RecallOptions {
  // Bounds past which a run only takes longer (queries) or measures noise
  // alone (perturb), and whose products would overflow.
  static constexpr int kMaxQueries = 100000;
  static constexpr double kMaxPerturb = 1000.0;

  int queries = 32;   // queries per (layer, KV head), 1..kMaxQueries; default 32
  uint64_t seed = 1;  // seeds the positions and noise; default 1
  // Tokens selected per KV head, >= 1. Unset (the default): top_fraction of
  // the tokens when it is set, else the sequence's own top-K budget at its
  // length (BudgetPolicy::resolve), at least 1. (A 0 once meant unset, so an
  // explicit --top-k 0 ran as the default.)
  std::optional<int64_t> top_k;
  std::optional<double> top_fraction;  // in (0, 1]; unset (the default): unused
  double perturb = 0.5;  // noise sd relative to the key's RMS, 0..kMaxPerturb; default 0.5
};

// InvalidArgument naming the flag when an option is out of range.
Status check_recall_options(const RecallOptions& options);

struct HeadRecall {
  double mean = 0;
  double min = 0;
};

struct LayerRecall {
  int layer = 0;
  int64_t tokens = 0;  // tokens the index holds (all searched)
  int64_t k = 0;
  std::vector<HeadRecall> heads;  // [kv_head]
  double mean = 0;                // over queries and heads
  double min = 0;
};

struct SequenceRecall {
  std::string name;
  std::string selection;  // the saved index's selection (SelectionConfig::to_string)
  int queries = 0;
  uint64_t seed = 0;
  double perturb = 0;
  std::vector<LayerRecall> layers;  // layers with a saved index, in order
  double mean = 0;                  // over layers, queries and heads
  double min = 0;
};

// The K used for a layer of `tokens` tokens of sequence `info` under
// `options`; InvalidArgument when --top-k passes the tokens.
Result<int64_t> recall_k(const engine::SavedSequenceInfo& info, int64_t tokens,
                         const RecallOptions& options);

// Called after each layer: (layers done, layers to do).
using RecallProgress = std::function<void(int done, int total)>;

// Recall of every layer of saved sequence `name` that has an index.
// FailedPrecondition when none has (saved before finish_prefill); the errors
// of SavedSequences::info, read_keys, read_index and LayerIndex::restore.
Result<SequenceRecall> sequence_recall(const engine::SavedSequences& saved, const std::string& name,
                                       const RecallOptions& options,
                                       const RecallProgress& progress = {});

}  // namespace pqkv::tools
