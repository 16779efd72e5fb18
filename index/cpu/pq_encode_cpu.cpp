#include "index/cpu/pq_encode_cpu.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>

#include "index/cpu/catch_status.h"

namespace pqkv::index::cpu {

PqEncoder::PqEncoder(const LayerCodebook& codebook)
    : shape_(codebook.shape),
      transposed_(static_cast<size_t>(codebook.num_kv_heads * codebook.floats_per_head())) {
  const int ksub = shape_.ksub();
  const int dsub = shape_.dsub();
  for (int h = 0; h < codebook.num_kv_heads; ++h) {
    for (int j = 0; j < shape_.m; ++j) {
      const float* src = codebook.sub(h, j);
      float* dst = transposed_.data() + (int64_t{h} * shape_.m + j) * ksub * dsub;
      for (int c = 0; c < ksub; ++c) {
        for (int d = 0; d < dsub; ++d)
          dst[int64_t{d} * ksub + c] = src[int64_t{c} * dsub + d];
      }
    }
  }
}

namespace {

// The nearest of `ksub` centroids stored transposed in `cols` ([dsub][ksub])
// to `sub`. Cloned for AVX2 (the loop over centroids vectorizes), picked at
// load time; a file-local function, since a cloned member function's resolver
// would be exported from libpqkv whatever its visibility.
__attribute__((target_clones("avx2", "default"))) int nearest_centroid(
    const float* cols, int ksub, int dsub, const float* sub, float* distances) {
  std::fill(distances, distances + ksub, 0.0f);
  for (int d = 0; d < dsub; ++d) {
    const float x = sub[d];
    const float* col = cols + int64_t{d} * ksub;
    for (int c = 0; c < ksub; ++c) {
      const float diff = x - col[c];
      distances[c] += diff * diff;
    }
  }
  int best = 0;
  for (int c = 1; c < ksub; ++c) {
    if (distances[c] < distances[best]) best = c;
  }
  return best;
}

}  // namespace

uint8_t PqEncoder::nearest(int kv_head, int j, const float* sub, float* distances,
                           float* sq_distance) const {
  const int ksub = shape_.ksub();
  const int dsub = shape_.dsub();
  const float* cols = transposed_.data() + (int64_t{kv_head} * shape_.m + j) * ksub * dsub;
  const int best = nearest_centroid(cols, ksub, dsub, sub, distances);
  if (sq_distance != nullptr) *sq_distance = distances[best];
  return static_cast<uint8_t>(best);
}

void PqEncoder::encode(int kv_head, const float* key, float* distances, uint8_t* code) const {
  const int dsub = shape_.dsub();
  for (int j = 0; j < shape_.m; ++j) {
    code[j] = nearest(kv_head, j, key + int64_t{j} * dsub, distances, nullptr);
  }
}

Status encode_keys(const PqEncoder& encoder, const HostKeys& keys,
                   const std::vector<uint8_t*>& codes) {
  const PqShape& shape = encoder.shape();
  constexpr int64_t kBlock = 256;
  TaskErrors errors;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, keys.n, kBlock),
                    [&](const tbb::blocked_range<int64_t>& range) {
                      errors.run("encoding keys", [&] {
                        std::vector<float> key(static_cast<size_t>(shape.head_dim));
                        std::vector<float> distances(static_cast<size_t>(shape.ksub()));
                        for (int h = 0; h < keys.kv_heads; ++h) {
                          for (int64_t t = range.begin(); t < range.end(); ++t) {
                            keys.gather(h, 0, shape.head_dim, t, t + 1, key.data());
                            encoder.encode(h, key.data(), distances.data(), codes[h] + t * shape.m);
                          }
                        }
                        return ok_status();
                      });
                    });
  return errors.status();
}

}  // namespace pqkv::index::cpu
