// The CPU backend of LayerIndex: Faiss k-means, our own encoder and the search
// reference of pq_search_cpu.h, parallel with TBB (training over (KV head,
// sub-space), encoding over token blocks, scoring over query heads, top-k over
// KV heads). Everything runs synchronously in the call; the Stream argument is
// ignored.
//
// search() results: rows of clamped_k(k, begin, end) positions per KV head,
// best first, equal scores by lower position (see select_top_k). Not safe for
// concurrent calls on one index (search reuses a workspace); distinct indexes
// are independent.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "index/cpu/host_keys.h"
#include "index/layer_index.h"

namespace pqkv::index {

class LayerIndexCpu final : public LayerIndex {
 public:
  // An empty index for keys of `kv_heads` heads; fails on an invalid shape.
  static Result<std::unique_ptr<LayerIndexCpu>> create(const PqShape& shape, int kv_heads);

  Device device() const override { return Device::cpu(); }
  const PqShape& shape() const override { return shape_; }
  int num_kv_heads() const override { return kv_heads_; }
  bool trained() const override { return codebook_.has_value(); }
  int64_t num_tokens() const override { return static_cast<int64_t>(codes_[0].size()) / shape_.m; }

  Status train(const TensorView& keys, const PqConfig& config, Stream stream) override;
  Status set_codebook(const LayerCodebook& codebook, Stream stream) override;
  Result<LayerCodebook> codebook() const override;
  Status add(const TensorView& keys, Stream stream) override;
  Status copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const override;
  Status search(const SearchRequest& request, int32_t* out_indices, Stream stream,
                SearchTimings* timings) override;

 private:
  LayerIndexCpu(const PqShape& shape, int kv_heads);

  // Makes `codebook` current and drops the codes of the previous one.
  void install(LayerCodebook codebook);
  Status validate_request(const SearchRequest& request, const int32_t* out_indices) const;

  PqShape shape_;
  int kv_heads_;
  std::optional<LayerCodebook> codebook_;
  std::vector<std::vector<uint8_t>> codes_;  // per KV head: [token][m]

  // Search workspace, kept between calls.
  std::vector<float> probs_;                         // [q_heads][count]
  std::vector<float> scores_;                        // [kv_heads][count]
  std::vector<std::vector<uint64_t>> topk_scratch_;  // per KV head
};

}  // namespace pqkv::index
