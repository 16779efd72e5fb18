#include "index/pq_codebook.h"

#include <cmath>
#include <string>

namespace pqkv::index {

Status PqShape::validate() const {
  if (head_dim < 1) {
    return Status::invalid_argument("PQ head_dim must be positive, got " +
                                    std::to_string(head_dim));
  }
  if (bits < 1 || bits > 8) {
    return Status::invalid_argument("PQ bits must be 1..8 (codes are one byte), got " +
                                    std::to_string(bits));
  }
  if (m < 1 || head_dim % m != 0) {
    return Status::invalid_argument("PQ sub-spaces m=" + std::to_string(m) +
                                    " must divide head_dim=" + std::to_string(head_dim));
  }
  // The same bound as PqConfig::validate, so that every shape a config can name is valid here.
  if (head_dim / m < 2) {
    return Status::invalid_argument(
        "PQ m=" + std::to_string(m) +
        " leaves fewer than 2 dims per sub-space; use m <= " + std::to_string(head_dim / 2));
  }
  return ok_status();
}

Status LayerCodebook::validate() const {
  PQKV_RETURN_IF_ERROR(shape.validate().with_context("codebook"));
  if (num_kv_heads < 1) {
    return Status::invalid_argument("codebook must have at least one KV head, got " +
                                    std::to_string(num_kv_heads));
  }
  const int64_t want = int64_t{num_kv_heads} * floats_per_head();
  if (static_cast<int64_t>(centroids.size()) != want) {
    return Status::invalid_argument(
        "codebook holds " + std::to_string(centroids.size()) + " centroid floats but " +
        std::to_string(num_kv_heads) + " KV heads x m=" + std::to_string(shape.m) + " x " +
        std::to_string(shape.ksub()) + " centroids x dsub=" + std::to_string(shape.dsub()) +
        " need " + std::to_string(want));
  }
  const int64_t objectives = int64_t{num_kv_heads} * shape.m;
  if (!objective.empty() && static_cast<int64_t>(objective.size()) != objectives) {
    return Status::invalid_argument(
        "codebook objective must be empty or hold one value per (KV "
        "head, sub-space) = " +
        std::to_string(objectives) + ", got " + std::to_string(objective.size()));
  }
  for (size_t i = 0; i < centroids.size(); ++i) {
    if (!std::isfinite(centroids[i])) {
      const int64_t head = static_cast<int64_t>(i) / floats_per_head();
      return Status::invalid_argument("codebook centroid of KV head " + std::to_string(head) +
                                      " holds NaN or Inf (float " + std::to_string(i) +
                                      "); retrain it from finite keys");
    }
  }
  return ok_status();
}

Status PqShape::check_config(const PqConfig& config) const {
  PQKV_RETURN_IF_ERROR(config.validate(head_dim));
  if (from_config(head_dim, config) == *this) return ok_status();
  return Status::invalid_argument(
      "PQ config " + config.to_string() +
      " differs from this index's shape m=" + std::to_string(m) + ",b=" + std::to_string(bits) +
      "; make the index with the config's shape (PqShape::from_config)");
}

Status LayerCodebook::check_fits(const PqShape& want, int kv_heads) const {
  PQKV_RETURN_IF_ERROR(validate());
  if (shape == want && num_kv_heads == kv_heads) return ok_status();
  return Status::invalid_argument(
      "codebook of head_dim " + std::to_string(shape.head_dim) + ", m=" + std::to_string(shape.m) +
      ",b=" + std::to_string(shape.bits) + " for " + std::to_string(num_kv_heads) +
      " KV heads does not fit this index (head_dim " + std::to_string(want.head_dim) +
      ", m=" + std::to_string(want.m) + ",b=" + std::to_string(want.bits) + ", " +
      std::to_string(kv_heads) + " KV heads)");
}

}  // namespace pqkv::index
