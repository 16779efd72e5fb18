#include "index/cpu/pq_encode_cpu.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "index/cpu/catch_status.h"
#include "index/cpu/nearest_centroid_cpu.h"

namespace pqkv::index::cpu {

PqEncoder::PqEncoder(const LayerCodebook& codebook)
    : shape_(codebook.shape),
      padded_ksub_(padded_centroids(codebook.shape.ksub())),
      transposed_(static_cast<size_t>(codebook.num_kv_heads) * shape_.m * shape_.dsub() *
                  padded_ksub_) {
  for (int h = 0; h < codebook.num_kv_heads; ++h) {
    for (int j = 0; j < shape_.m; ++j) {
      transpose_centroids(
          codebook.sub(h, j), shape_.ksub(), shape_.dsub(),
          transposed_.data() + (int64_t{h} * shape_.m + j) * shape_.dsub() * padded_ksub_);
    }
  }
}

uint8_t PqEncoder::nearest(int kv_head, int j, const float* sub, float* sq_distance) const {
  const int dsub = shape_.dsub();
  const float* cols = transposed_.data() + (int64_t{kv_head} * shape_.m + j) * dsub * padded_ksub_;
  float d = 0;
  const int best = nearest_centroid(sub, cols, dsub, padded_ksub_, &d);
  if (sq_distance != nullptr) *sq_distance = d;
  return static_cast<uint8_t>(best);
}

void PqEncoder::encode(int kv_head, const float* key, uint8_t* code) const {
  const int dsub = shape_.dsub();
  for (int j = 0; j < shape_.m; ++j)
    code[j] = nearest(kv_head, j, key + int64_t{j} * dsub, nullptr);
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
                        for (int h = 0; h < keys.kv_heads; ++h) {
                          for (int64_t t = range.begin(); t < range.end(); ++t) {
                            keys.gather(h, 0, shape.head_dim, t, t + 1, key.data());
                            encoder.encode(h, key.data(), codes[h] + t * shape.m);
                          }
                        }
                        return ok_status();
                      });
                    });
  return errors.status();
}

}  // namespace pqkv::index::cpu
