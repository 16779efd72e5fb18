// Faiss's own IndexPQ search over the same codes as a pqkv layer index: the
// baseline that `pqkv bench --compare-faiss` measures beside pqkv's search.
#pragma once

#include <faiss/IndexPQ.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "index/layer_index.h"
#include "pqkv/status.h"

namespace pqkv::tools {

class FaissPqBaseline {
 public:
  // One IndexPQ (inner product) per KV head with `index`'s codebook, holding
  // the codes of tokens [begin, end). The codes are loaded by adding each
  // token's reconstruction, which Faiss encodes back to the same code.
  static Result<FaissPqBaseline> build(const index::LayerIndex& index, int64_t begin, int64_t end);

  // For each KV head: the group's query heads search with IndexPQ, and the k
  // tokens in [begin, search_end) with the highest inner product over the
  // group are kept. queries [q_heads, head_dim] fp32.
  Status search(const float* queries, int q_heads, int64_t k, int64_t search_end,
                std::vector<std::vector<int64_t>>* selected) const;

 private:
  int64_t begin_ = 0;
  int head_dim_ = 0;
  std::vector<std::unique_ptr<faiss::IndexPQ>> heads_;
};

}  // namespace pqkv::tools
