// k-means training of the PQ codebooks of one layer on the CPU.
#pragma once

#include <faiss/Clustering.h>

#include "index/cpu/host_keys.h"
#include "index/pq_codebook.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index::cpu {

// The Faiss k-means parameters of a PqConfig: niter = kmeans_iters, seed
// folded to Faiss's int, max_points_per_centroid = the config's (0: no
// sampling), min_points_per_centroid = 1, quiet. For comparing with Faiss
// (tests, `pqkv micro`).
faiss::ClusteringParameters clustering_parameters(const PqConfig& config);

// Trains one codebook per KV head on keys (n >= 1 tokens). Sub-space j of KV
// head h is clustered on dims [j * dsub, (j + 1) * dsub) of that head's keys
// with our own Lloyd k-means (L2; a training sample of at most
// max_train_points_per_centroid keys per centroid drawn with the seed, as
// faiss::Clustering does; k-means++ seeding where Faiss starts from random
// rows; empty clusters split from the largest), every (head, sub-space) with
// the same parameters and seed, as faiss::ProductQuantizer::train does for its
// sub-spaces. It stops early once no assignment changes (later iterations
// would change nothing). Its objective stays within 2% of Faiss's
// (tests/index/pq_train_cpu_test.cpp) at a small fraction of the time: no BLAS
// call per iteration; each assignment is one vectorized scan of every centroid
// (nearest_centroid_dot in nearest_centroid_cpu.h: a fused multiply-add per
// dimension and centroid where the CPU has FMA); k-means++ seeding is one
// vectorized sweep over the points per centroid; one TBB task per (head,
// sub-space) with no threads nested inside.
//
// With n <= ksub there is nothing to cluster (Faiss refuses n < ksub):
// centroid c is key c mod n, so that every centroid is a real key, the
// codebook is full, and the objective is 0.
//
// objective[h * m + j] is the sum, over all n keys (also those k-means did not
// sample), of the squared distance to the nearest centroid.
Result<LayerCodebook> train_codebook(const HostKeys& keys, const PqShape& shape,
                                     const PqConfig& config);

}  // namespace pqkv::index::cpu
