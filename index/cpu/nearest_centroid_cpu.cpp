#include "index/cpu/nearest_centroid_cpu.h"

#include <cstring>
#include <limits>

namespace pqkv::index::cpu {

void transpose_centroids(const float* centroids, int k, int dim, float* out) {
  const int padded = padded_centroids(k);
  for (int d = 0; d < dim; ++d) {
    float* row = out + int64_t{d} * padded;
    for (int c = 0; c < k; ++c)
      row[c] = centroids[int64_t{c} * dim + d];
    for (int c = k; c < padded; ++c)
      row[c] = std::numeric_limits<float>::infinity();
  }
}

namespace {

// Eight floats / int32s: GCC vector types, so that the loops below are
// vectorized as written (8 lanes: one AVX2 register, two SSE registers).
// Loads and stores go through memcpy: the columns need not be 32-byte aligned.
using F8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));

inline F8 load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static_assert(kCentroidChunk == 16, "the scan below holds a chunk in two F8 registers");

}  // namespace

// One chunk of 16 centroids accumulates in two registers over every
// dimension, then each lane keeps its running minimum and where it was found:
// no distance array is written, and no scalar pass looks for the minimum.
// Cloned for AVX2, picked at load time; the AVX2 clone does not enable FMA,
// which keeps the rounding of a separate multiply and add.
__attribute__((target_clones("avx2", "default"))) int nearest_centroid(const float* x,
                                                                       const float* transposed,
                                                                       int dim, int padded_k,
                                                                       float* sq_distance) {
  const float inf = std::numeric_limits<float>::infinity();
  F8 best0 = F8{} + inf;
  F8 best1 = best0;
  I8 at0 = {0, 1, 2, 3, 4, 5, 6, 7};
  I8 at1 = at0 + 8;
  I8 index0 = at0;
  I8 index1 = at1;
  for (int c0 = 0; c0 < padded_k; c0 += kCentroidChunk) {
    F8 acc0 = {};
    F8 acc1 = {};
    const float* col = transposed + c0;
    for (int d = 0; d < dim; ++d, col += padded_k) {
      const F8 v = F8{} + x[d];
      const F8 diff0 = v - load8(col);
      const F8 diff1 = v - load8(col + 8);
      acc0 += diff0 * diff0;
      acc1 += diff1 * diff1;
    }
    const I8 closer0 = acc0 < best0;
    const I8 closer1 = acc1 < best1;
    best0 = closer0 ? acc0 : best0;
    best1 = closer1 ? acc1 : best1;
    index0 = closer0 ? at0 : index0;
    index1 = closer1 ? at1 : index1;
    at0 += kCentroidChunk;
    at1 += kCentroidChunk;
  }
  float best[kCentroidChunk];
  int32_t best_index[kCentroidChunk];
  std::memcpy(best, &best0, sizeof(best0));
  std::memcpy(best + 8, &best1, sizeof(best1));
  std::memcpy(best_index, &index0, sizeof(index0));
  std::memcpy(best_index + 8, &index1, sizeof(index1));
  int lane = 0;
  for (int l = 1; l < kCentroidChunk; ++l) {
    if (best[l] < best[lane] || (best[l] == best[lane] && best_index[l] < best_index[lane])) {
      lane = l;
    }
  }
  *sq_distance = best[lane];
  return best_index[lane];
}

}  // namespace pqkv::index::cpu
