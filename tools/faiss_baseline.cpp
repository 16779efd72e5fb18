#include "tools/faiss_baseline.h"

#include <faiss/impl/FaissException.h>

#include <algorithm>
#include <unordered_map>

namespace pqkv::tools {

Result<FaissPqBaseline> FaissPqBaseline::build(const index::LayerIndex& index, int64_t begin,
                                               int64_t end) {
  PQKV_ASSIGN_OR_RETURN(index::LayerCodebook book, index.codebook());
  const index::PqShape& shape = book.shape;
  FaissPqBaseline b;
  b.begin_ = begin;
  b.head_dim_ = shape.head_dim;
  const int64_t n = end - begin;
  std::vector<uint8_t> codes(static_cast<size_t>(n) * shape.m);
  std::vector<float> recon(static_cast<size_t>(n) * shape.head_dim);
  try {
    for (int h = 0; h < book.num_kv_heads; ++h) {
      auto pq = std::make_unique<faiss::IndexPQ>(shape.head_dim, shape.m, shape.bits,
                                                 faiss::METRIC_INNER_PRODUCT);
      pq->pq.centroids.assign(book.head(h), book.head(h) + book.floats_per_head());
      pq->is_trained = true;
      PQKV_RETURN_IF_ERROR(index.copy_codes(h, begin, end, codes.data()));
      for (int64_t t = 0; t < n; ++t) {
        for (int j = 0; j < shape.m; ++j) {
          const float* c = book.sub(h, j) + int64_t{codes[t * shape.m + j]} * shape.dsub();
          std::copy_n(c, shape.dsub(), recon.data() + t * shape.head_dim + j * shape.dsub());
        }
      }
      pq->add(n, recon.data());
      b.heads_.push_back(std::move(pq));
    }
  } catch (const faiss::FaissException& e) {
    return Status::internal(std::string("Faiss IndexPQ baseline: ") + e.what());
  }
  return b;
}

Status FaissPqBaseline::search(const float* queries, int q_heads, int64_t k, int64_t search_end,
                               std::vector<std::vector<int64_t>>* selected) const {
  const int kv_heads = static_cast<int>(heads_.size());
  const int group = q_heads / kv_heads;
  selected->assign(kv_heads, {});
  std::vector<float> dist(static_cast<size_t>(group) * k);
  std::vector<faiss::Index::idx_t> labels(dist.size());
  try {
    for (int h = 0; h < kv_heads; ++h) {
      heads_[h]->search(group, queries + static_cast<size_t>(h) * group * head_dim_, k, dist.data(),
                        labels.data());
      std::unordered_map<int64_t, float> best;
      for (size_t i = 0; i < labels.size(); ++i) {
        const int64_t t = labels[i] + begin_;
        if (labels[i] < 0 || t >= search_end) continue;
        auto [it, fresh] = best.emplace(t, dist[i]);
        if (!fresh) it->second = std::max(it->second, dist[i]);
      }
      std::vector<std::pair<float, int64_t>> ranked;
      ranked.reserve(best.size());
      for (auto [t, s] : best)
        ranked.emplace_back(-s, t);
      const auto keep = std::min<size_t>(static_cast<size_t>(k), ranked.size());
      std::partial_sort(ranked.begin(), ranked.begin() + keep, ranked.end());
      for (size_t i = 0; i < keep; ++i)
        (*selected)[h].push_back(ranked[i].second);
    }
  } catch (const faiss::FaissException& e) {
    return Status::internal(std::string("Faiss IndexPQ search: ") + e.what());
  }
  return ok_status();
}

}  // namespace pqkv::tools
