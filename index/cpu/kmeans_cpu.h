// k-means training of the PQ codebooks of one layer on the CPU, with Faiss.
#pragma once

#include <faiss/Clustering.h>

#include "index/cpu/host_keys.h"
#include "index/pq_codebook.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index::cpu {

// The Faiss k-means parameters of a PqConfig: niter = kmeans_iters, seed
// folded to Faiss's int, max_points_per_centroid = the config's (0: no
// sampling), min_points_per_centroid = 1 (small training sets are expected
// here, not warned about), quiet.
faiss::ClusteringParameters clustering_parameters(const PqConfig& config);

// Trains one codebook per KV head on keys (n >= 1 tokens). Sub-space j of KV
// head h is clustered on dims [j * dsub, (j + 1) * dsub) of that head's keys
// with faiss::Clustering, every (head, sub-space) with the same parameters and
// seed, as faiss::ProductQuantizer::train does for its sub-spaces: a head's
// centroids are the ones a ProductQuantizer trained on that head's keys gets.
//
// With n <= ksub there is nothing to cluster (Faiss refuses n < ksub):
// centroid c is key c mod n, so that every centroid is a real key, the
// codebook is full, and the objective is 0.
//
// objective[h * m + j] is the sum, over all n keys (also those k-means did not
// sample), of the squared distance to the nearest centroid.
//
// Runs the (head, sub-space) pairs in parallel with TBB, each with one OpenMP
// thread inside Faiss.
Result<LayerCodebook> train_codebook(const HostKeys& keys, const PqShape& shape,
                                     const PqConfig& config);

}  // namespace pqkv::index::cpu
