#include "index/cpu/nearest_centroid_cpu.h"

#include <immintrin.h>

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
// Loads go through memcpy (the columns need not be 32-byte aligned) inside the
// cloned function: a helper returning a vector would change its ABI with the
// clone's target.
using F8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));

static_assert(kCentroidChunk == 16, "the scan below holds a chunk in two F8 registers");

// One chunk of 16 centroids accumulates in two registers over every
// dimension, then each lane keeps its running minimum and where it was found:
// no distance array is written, and no scalar pass looks for the minimum.
// Cloned for AVX2, picked at load time; the AVX2 clone does not enable FMA,
// which keeps the rounding of a separate multiply and add. File-local: a
// cloned function's resolver would otherwise be exported from libpqkv.
__attribute__((target_clones("avx2", "default"))) int nearest_centroid_cloned(
    const float* x, const float* transposed, int dim, int padded_k, float* sq_distance) {
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
      F8 c0;
      F8 c1;
      std::memcpy(&c0, col, sizeof(c0));
      std::memcpy(&c1, col + 8, sizeof(c1));
      const F8 diff0 = v - c0;
      const F8 diff1 = v - c1;
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

}  // namespace

int nearest_centroid(const float* x, const float* transposed, int dim, int padded_k,
                     float* sq_distance) {
  return nearest_centroid_cloned(x, transposed, dim, padded_k, sq_distance);
}

void prepare_dot_scan(const float* centroids, int k, int dim, float* transposed,
                      float* half_norms) {
  const int padded = padded_dot_centroids(k);
  for (int c = 0; c < padded; ++c) {
    double norm = 0;
    for (int d = 0; d < dim; ++d) {
      const float v = c < k ? centroids[int64_t{c} * dim + d] : 0.0f;
      transposed[int64_t{d} * padded + c] = v;
      norm += double(v) * v;
    }
    half_norms[c] = c < k ? static_cast<float>(norm / 2) : std::numeric_limits<float>::infinity();
  }
}

namespace {

// One chunk of 64 centroids in eight independent accumulators (enough to
// hide the add latency), written to `scores`; then the minimum over every
// score and the first place it occurs. Two builds: AVX2 with fused
// multiply-adds where the CPU has both, plain loops elsewhere.
__attribute__((target("avx2,fma"))) int nearest_dot_fma(const float* x, const float* transposed,
                                                        const float* half_norms, int dim,
                                                        int padded_k, float* scores) {
  for (int c0 = 0; c0 < padded_k; c0 += kDotChunk) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r)
      acc[r] = _mm256_loadu_ps(half_norms + c0 + 8 * r);
    const float* col = transposed + c0;
    for (int d = 0; d < dim; ++d, col += padded_k) {
      const __m256 v = _mm256_set1_ps(-x[d]);
      for (int r = 0; r < 8; ++r)
        acc[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(col + 8 * r), acc[r]);
    }
    for (int r = 0; r < 8; ++r)
      _mm256_storeu_ps(scores + c0 + 8 * r, acc[r]);
  }
  __m256 low = _mm256_loadu_ps(scores);
  for (int i = 8; i < padded_k; i += 8)
    low = _mm256_min_ps(low, _mm256_loadu_ps(scores + i));
  // Every lane to the minimum of the eight.
  low = _mm256_min_ps(low, _mm256_permute2f128_ps(low, low, 1));
  low = _mm256_min_ps(low, _mm256_shuffle_ps(low, low, _MM_SHUFFLE(1, 0, 3, 2)));
  low = _mm256_min_ps(low, _mm256_shuffle_ps(low, low, _MM_SHUFFLE(2, 3, 0, 1)));
  for (int i = 0; i < padded_k; i += 8) {
    const int mask =
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + i), low, _CMP_EQ_OQ));
    if (mask != 0) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  return 0;  // not reached for finite input
}

int nearest_dot_plain(const float* x, const float* transposed, const float* half_norms, int dim,
                      int padded_k, float* scores) {
  std::memcpy(scores, half_norms, sizeof(float) * padded_k);
  for (int d = 0; d < dim; ++d) {
    const float v = x[d];
    const float* col = transposed + int64_t{d} * padded_k;
    for (int c = 0; c < padded_k; ++c)
      scores[c] -= v * col[c];
  }
  int best = 0;
  for (int c = 1; c < padded_k; ++c) {
    if (scores[c] < scores[best]) best = c;
  }
  return best;
}

using NearestDot = int (*)(const float*, const float*, const float*, int, int, float*);

NearestDot pick_nearest_dot() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? nearest_dot_fma
                                                                         : nearest_dot_plain;
}

}  // namespace

int nearest_centroid_dot(const float* x, const float* transposed, const float* half_norms, int dim,
                         int padded_k) {
  static const NearestDot nearest = pick_nearest_dot();
  float scores[kMaxDotCentroids];
  return nearest(x, transposed, half_norms, dim, padded_k, scores);
}

}  // namespace pqkv::index::cpu
