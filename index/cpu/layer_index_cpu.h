// The CPU backend of LayerIndex: a code index over the key codecs of
// key_codec.h (PQ with Faiss k-means, int8, int4, exact keys), in one or two
// stages, parallel with TBB (encoding over KV heads, scoring over query heads,
// top-k over KV heads). Everything runs synchronously in the call; the Stream
// argument is ignored.
//
// Search, one stage: the code scores tokens [begin, end) for every query head,
// per-head softmax(score / sqrt(head_dim)), GQA aggregation, top-k per KV head;
// for PQ these are exactly the stages of pq_search_cpu.h. Two stages
// (SelectionConfig::candidates = C): the first stage keeps min(C * k, count)
// candidates per KV head, the rerank code scores them again, each head's
// scores become probabilities with the first stage's softmax maximum and
// normaliser (so heads keep their weight in the group as over all tokens),
// and the aggregated top-k of the candidates is kept (equal scores: the lower
// position, as in one stage).
//
// Drift: every add after the first one that follows train measures each new
// key's quantization error (the key against its decoded code) per stage and
// KV head; train measures the fit's own keys (a sample). refit builds new
// codecs and codes from the keys it is given through the caller's runner and
// publishes them; the owner's next add or search swaps them in (encoding the
// keys added meanwhile first), so searches never see a half-built state.
//
// search() results: rows of clamped_k(k, begin, end) positions per KV head,
// best first, equal scores by lower position (see select_top_k). Not safe for
// concurrent calls on one index (search reuses a workspace); distinct indexes
// are independent.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "index/cpu/host_keys.h"
#include "index/key_codec.h"
#include "index/layer_index.h"

namespace pqkv::index {

class LayerIndexCpu final : public LayerIndex {
 public:
  // An empty one-stage PQ index for keys of `kv_heads` heads; fails on an
  // invalid shape.
  static Result<std::unique_ptr<LayerIndexCpu>> create(const PqShape& shape, int kv_heads);
  // An empty index that scores with `selection` (PQ codes shaped by `pq`).
  static Result<std::unique_ptr<LayerIndexCpu>> create(int head_dim, int kv_heads,
                                                       const PqConfig& pq,
                                                       const SelectionConfig& selection);

  Device device() const override { return Device::cpu(); }
  const PqShape& shape() const override { return shape_; }
  const SelectionConfig& selection() const override { return selection_; }
  int64_t code_bytes_per_token() const override;
  int num_kv_heads() const override { return kv_heads_; }
  bool trained() const override;
  int64_t num_tokens() const override {
    return static_cast<int64_t>(stages_[0].codes[0].size()) / stages_[0].codec->code_size();
  }

  Status train(const TensorView& keys, const PqConfig& config, Stream stream) override;
  Status set_codebook(const LayerCodebook& codebook, Stream stream) override;
  Result<LayerCodebook> codebook() const override;
  Status add(const TensorView& keys, Stream stream) override;
  Status copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const override;
  Status search(const SearchRequest& request, int32_t* out_indices, Stream stream,
                SearchTimings* timings) override;
  Status wait_ready(Stream /*stream*/) const override { return ok_status(); }
  Stream background_stream() const override { return Stream::host(); }
  Result<IndexSnapshot> snapshot() const override;
  Status restore(const IndexSnapshot& snapshot, Stream stream) override;
  DriftStats drift_stats() const override;
  Status refit(std::vector<float> keys, int64_t fit_begin, const PqConfig& config,
               const BackgroundRunner& run) override;

 private:
  // One code of the index: its codec and codes per KV head, [token][code_size],
  // and per KV head the mean squared error of a fit key, the error below
  // which a key counts as exact (added to both means of a ratio) and the
  // summed squared error of the keys encoded since the fit.
  struct Stage {
    std::unique_ptr<KeyCodec> codec;
    std::vector<std::vector<uint8_t>> codes;
    std::vector<double> fit_error;
    std::vector<double> error_floor;
    std::vector<double> since_error;
  };
  // A refit being built off to the side (defined in layer_index_cpu_refit.cpp).
  struct RefitJob;

  LayerIndexCpu(const PqShape& shape, int kv_heads, const SelectionConfig& selection);

  // The stage whose codec is PQ, or null.
  const Stage* pq_stage() const;
  void drop_codes();
  Status validate_request(const SearchRequest& request, const int32_t* out_indices) const;
  // First-stage probabilities of every query head into probs_, with each
  // head's softmax maximum and normaliser.
  Status score_first_stage(const float* queries, int q_heads, int64_t begin, int64_t end);
  Status rerank(const SearchRequest& request, int64_t kept, int32_t* out_indices);
  // Measures each stage's fit error on a sample of `keys` and restarts the
  // drift counts: the next add encodes the fit's context.
  void start_drift_tracking(const cpu::HostKeys& keys);
  // Stops tracking and drops a refit still running (a codec installed from
  // elsewhere has no fit keys to compare with).
  void stop_drift_tracking();
  // Swaps in a finished refit, if any; a failure is kept for drift_stats.
  void install_refit();

  PqShape shape_;
  int kv_heads_;
  SelectionConfig selection_;
  std::vector<Stage> stages_;  // the first, then the rerank stage if any

  // Drift tracking (see drift_stats).
  bool tracking_ = false;
  bool fit_context_pending_ = false;  // the next add encodes the fit's own context
  int64_t fit_tokens_ = 0;
  int64_t tokens_since_fit_ = 0;
  int refits_ = 0;
  double last_refit_ms_ = 0;
  double total_refit_ms_ = 0;
  std::string last_refit_error_;
  std::shared_ptr<RefitJob> refit_;  // shared with the job's task
  std::vector<float> refit_keys_;    // keys added while refit_ is built, [n][kv_heads][head_dim]

  // Search workspace, kept between calls.
  std::vector<float> probs_;                         // [q_heads][count]
  std::vector<float> scores_;                        // [kv_heads][count]
  std::vector<float> head_max_;                      // [q_heads] raw maximum
  std::vector<float> head_inv_z_;                    // [q_heads] 1 / softmax normaliser
  std::vector<int32_t> candidates_;                  // [kv_heads][C * k]
  std::vector<std::vector<uint64_t>> topk_scratch_;  // per KV head
};

}  // namespace pqkv::index
