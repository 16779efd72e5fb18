// Autoregressive generation with a LlamaModel on a ModelBackend, its keys and
// values kept either in the backend's own cache or in a pqkv Sequence.
//
// With a Sequence, prefill runs exact causal attention over the prompt and
// appends each layer's keys (after RoPE) and values to the Sequence; with
// the last prompt chunk, each layer's index build starts right after its
// append (Sequence::finish_prefill_layer), under the layers above, and
// finish_prefill() closes the prompt; every decode step appends the new token's keys and values
// per layer and attends through Sequence::attend (the Sequence's budget) or
// Sequence::attend_exact.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "model/backend.h"
#include "model/sampler.h"
#include "pqkv/sequence.h"

namespace pqkv::model {

enum class AttentionPath : uint8_t {
  kBackendCache = 0,  // exact, over the backend's own KV cache; no Sequence
  kStoreExact = 1,    // a Sequence holds the keys and values; Sequence::attend_exact
  kStoreSparse = 2,   // a Sequence holds them; Sequence::attend with its budget
};
const char* attention_path_name(AttentionPath path);

// The Sequence of the store paths: empty, with the geometry of
// LlamaConfig::kv_spec. Its Store's memory is on `device`: the backend's
// device, or the CPU (activations are then staged through the host).
struct StoreTarget {
  Sequence* sequence = nullptr;
  Device device = Device::cpu();
};

struct GenerateOptions {
  int max_new_tokens = 64;   // tokens to generate at most. Default 64.
  SamplingOptions sampling;  // default: greedy
  bool stop_at_eos = true;   // stop after an EOS token of config.json. Default on.
  // Prefill all but the last prompt token, which then runs as the first decode
  // step: every generated token then comes out of decode attention (the
  // needle test measures retrieval this way). Default off.
  bool decode_last_prompt_token = false;
  // Prompt tokens per prefill pass; 0 = the whole prompt in one pass. Smaller
  // chunks bound the activation memory of long prompts. Default 0.
  int64_t prefill_chunk = 0;
  // Per-layer attention recall at the first decode step of kStoreSparse: the
  // share of exact attention probability that falls on the attended tokens,
  // averaged over query heads. Keeps a host copy of every key. Default off.
  bool measure_recall = false;
  // Called during the sequence's index build (Sequence::finish_prefill), e.g.
  // for a progress line; empty: none. Default empty.
  BuildProgressCallback on_index_build;
  // Start each layer's index build as soon as the last prompt chunk has
  // appended that layer (Sequence::finish_prefill_layer), so that it runs
  // while the layers above compute; off: every build starts in
  // finish_prefill, after the whole prefill. The indexes and the generated
  // tokens are the same either way. Default on.
  bool overlap_index_builds = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the generated tokens
  int64_t prompt_tokens = 0;
  double ttft_ms = 0;            // start to the first generated token (prefill included)
  double tpot_ms = 0;            // mean time per generated token after the first; 0 with one
  double finish_prefill_ms = 0;  // of ttft_ms: in Sequence::finish_prefill (0 without one)
  // Of ttft_ms: host time in Sequence::append during the prefill passes (0
  // without a sequence). On a CUDA store the appends are enqueued, so this is
  // their host side (taking row blocks, the row table), not the copies.
  double prefill_append_ms = 0;
  std::vector<double> layer_recall;  // with measure_recall: one value per layer
};

class Generator {
 public:
  // `model` and `backend` must outlive the generator.
  Generator(const LlamaModel& model, ModelBackend& backend) : model_(model), backend_(backend) {}

  // Generates after `prompt` (which already holds any BOS). `on_token` sees each
  // token as it is produced. The backend is reset first.
  Result<GenerateResult> generate(std::span<const int32_t> prompt, AttentionPath path,
                                  const StoreTarget& store, const GenerateOptions& options,
                                  const std::function<void(int32_t)>& on_token = {});

 private:
  struct PassContext;
  Status run_pass(std::span<const int32_t> tokens, int64_t start, bool prefill, PassContext& ctx,
                  std::vector<float>* logits);
  Status attend_layer(int layer, const QkvViews& qkv, bool prefill, PassContext& ctx);

  const LlamaModel& model_;
  ModelBackend& backend_;
};

}  // namespace pqkv::model
