// The nearest-centroid scan shared by k-means training and PQ encoding on the
// CPU: squared L2 distances of one point to every centroid of a small
// codebook, and the index of the nearest, in one vectorized sweep.
#pragma once

#include <cstdint>

namespace pqkv::index::cpu {

// Centroids are scanned in chunks of this many; a transposed codebook holds
// padded_centroids(k) columns, the ones past k set to +Inf (never nearest).
inline constexpr int kCentroidChunk = 16;

inline int padded_centroids(int k) {
  return (k + kCentroidChunk - 1) / kCentroidChunk * kCentroidChunk;
}

// Writes centroids [k][dim] to out [dim][padded_centroids(k)], the padding
// columns +Inf. `out` holds dim * padded_centroids(k) floats.
void transpose_centroids(const float* centroids, int k, int dim, float* out);

// The index of the centroid of `transposed` ([dim][padded_k], from
// transpose_centroids) nearest to x (dim floats); the lowest index wins a tie.
// Each distance is the fp32 sum over d = 0, 1, ... of (x[d] - c[d])^2 without
// fused multiply-adds, the order and rounding of the CUDA encoder, so that
// both pick the same centroid. Writes the squared distance to *sq_distance.
// x must be finite. Thread-safe.
int nearest_centroid(const float* x, const float* transposed, int dim, int padded_k,
                     float* sq_distance);

// k-means assignment, where only the nearest index matters and the rounding
// need not match the encoder's: argmin over c of ||c||^2 / 2 - x . c (the
// squared distance less ||x||^2, halved), one fused multiply-add per
// dimension and centroid where the CPU has FMA. A codebook for it holds the
// centroids transposed to [dim][padded_dot_centroids(k)] (zero padding) and
// half_norms [padded_dot_centroids(k)] (+Inf padding: never nearest).
inline constexpr int kDotChunk = 64;
inline constexpr int kMaxDotCentroids = 256;  // codes are one byte

inline int padded_dot_centroids(int k) {
  return (k + kDotChunk - 1) / kDotChunk * kDotChunk;
}

// Fills `transposed` (dim * padded_dot_centroids(k) floats) and `half_norms`
// (padded_dot_centroids(k) floats) from centroids [k][dim].
void prepare_dot_scan(const float* centroids, int k, int dim, float* transposed, float* half_norms);

// The index of the centroid nearest to x (dim finite floats); ties go to the
// lowest index. padded_k <= kMaxDotCentroids. Thread-safe.
int nearest_centroid_dot(const float* x, const float* transposed, const float* half_norms, int dim,
                         int padded_k);

}  // namespace pqkv::index::cpu
