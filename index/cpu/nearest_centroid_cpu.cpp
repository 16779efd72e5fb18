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

// The argmin of scores[0, n) (n a multiple of 8), the lowest index on a tie.
int argmin(const float* scores, int n) {
  F8 low = load8(scores);
  for (int i = 8; i < n; i += 8) {
    const F8 v = load8(scores + i);
    low = v < low ? v : low;
  }
  float lanes[8];
  std::memcpy(lanes, &low, sizeof(low));
  float best = lanes[0];
  for (int l = 1; l < 8; ++l)
    best = lanes[l] < best ? lanes[l] : best;
  for (int i = 0; i < n; ++i) {
    if (scores[i] == best) return i;
  }
  return 0;  // every score NaN: cannot happen for finite input
}

// One chunk of 64 centroids in eight independent accumulators (enough to
// hide the add latency), written out per chunk; the argmin runs once at the
// end. Two builds: fused multiply-adds where the CPU has AVX2 and FMA, plain
// vector code elsewhere.
__attribute__((target("avx2,fma"))) void dot_scores_fma(const float* x, const float* transposed,
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
}

void dot_scores_plain(const float* x, const float* transposed, const float* half_norms, int dim,
                      int padded_k, float* scores) {
  for (int c0 = 0; c0 < padded_k; c0 += kDotChunk) {
    F8 acc[8];
    for (int r = 0; r < 8; ++r)
      acc[r] = load8(half_norms + c0 + 8 * r);
    const float* col = transposed + c0;
    for (int d = 0; d < dim; ++d, col += padded_k) {
      const F8 v = F8{} - x[d];
      for (int r = 0; r < 8; ++r)
        acc[r] += v * load8(col + 8 * r);
    }
    std::memcpy(scores + c0, acc, sizeof(acc));
  }
}

using DotScores = void (*)(const float*, const float*, const float*, int, int, float*);

DotScores pick_dot_scores() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? dot_scores_fma
                                                                         : dot_scores_plain;
}

}  // namespace

int nearest_centroid_dot(const float* x, const float* transposed, const float* half_norms, int dim,
                         int padded_k) {
  static const DotScores dot_scores = pick_dot_scores();
  float scores[kMaxDotCentroids];
  dot_scores(x, transposed, half_norms, dim, padded_k, scores);
  return argmin(scores, padded_k);
}

}  // namespace pqkv::index::cpu
