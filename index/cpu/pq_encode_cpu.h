// Nearest-centroid (L2) encoding of keys with a trained codebook: one uint8
// code per (token, sub-space), stored per KV head as [token][m]. Gives the
// codes of Faiss's ProductQuantizer::compute_codes for the same centroids,
// except where two centroids are equally near up to float rounding.
#pragma once

#include <cstdint>
#include <vector>

#include "index/cpu/host_keys.h"
#include "index/pq_codebook.h"

namespace pqkv::index::cpu {

// A codebook rearranged for encoding: per (KV head, sub-space) the centroids
// transposed to [dsub][padded ksub] (nearest_centroid_cpu.h), so that the
// distances to all centroids of one sub-space accumulate dimension by
// dimension in one vectorized sweep.
class PqEncoder {
 public:
  explicit PqEncoder(const LayerCodebook& codebook);

  const PqShape& shape() const { return shape_; }

  // The nearest centroid of sub-space j of `kv_head` to `sub` (dsub floats);
  // the lowest index wins a tie. When `sq_distance` is non-null it receives
  // the squared distance. Thread-safe.
  uint8_t nearest(int kv_head, int j, const float* sub, float* sq_distance) const;

  // Encodes one key of `kv_head` (head_dim floats) into m codes. Thread-safe.
  void encode(int kv_head, const float* key, uint8_t* code) const;

 private:
  PqShape shape_;
  int padded_ksub_;
  std::vector<float> transposed_;  // [kv_head][j][dsub][padded_ksub_]
};

// Encodes tokens [0, keys.n) of every KV head into codes[h][t * m + j], in
// parallel over token blocks. codes[h] must hold keys.n * m bytes. Fails only
// when scratch memory cannot be had.
Status encode_keys(const PqEncoder& encoder, const HostKeys& keys,
                   const std::vector<uint8_t*>& codes);

}  // namespace pqkv::index::cpu
