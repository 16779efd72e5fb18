// One layer's search on the GPU, all on the caller's stream with no host
// synchronisation and no allocation (so it can be captured in a CUDA graph):
//
//   1. LUTs of every query head (one launch; it also clears the counters),
//   2. per query head, softmax statistics over tokens [begin, end): a scan of
//      the codes that keeps a running max and sum per block, folded by the last
//      block of each KV head into log-sum-exp,
//   3. a second scan: per token the GQA aggregate of the heads' softmax
//      probabilities (sum or max), stored as float bits, and a histogram of
//      their top 11 bits,
//   4. two more radix passes (11 and 10 bits) over the candidates of the chosen
//      bucket; after each, the last block to finish picks the bucket that holds
//      the k-th best score,
//   5. a count pass and a write pass that emit, per KV head, the positions that
//      beat the k-th score plus the lowest-positioned of those equal to it, in
//      increasing position.
//
// (The kernels of these passes: scan_pipeline.cuh.) The scans run as a few
// fat blocks per SM (every block pays for staging its
// LUT and for its histogram and counter traffic). Chaining them with
// programmatic dependent launches measured slower on an H100 (by about 15% at
// 1M tokens), so they are plain launches.
//
// The selected set is the CPU reference's (score descending, position
// ascending) for the scores computed here. Query head h belongs to KV head
// h / (q_heads / kv_heads), as in pq_search_cpu.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda_handles.h"
#include "index/layer_index.h"
#include "pqkv/dtype.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// Query heads per KV head that the search kernels are built for.
inline constexpr int kMaxGroup = 8;
// Blocks per KV head of every scan; longer ranges give each block more tokens.
inline constexpr int kMaxScanBlocks = 256;
// Candidates (scores in the bucket of the k-th best after the first radix
// pass) of one KV head that the fused search finishes from a list.
inline constexpr int kFusedCandidates = 16384;

struct SearchShape {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int m = 0;
  int ksub = 0;
};

// Running state of the radix selection of one KV head.
struct SelectState {
  uint32_t prefix;     // bits of the k-th best score found so far
  uint32_t remaining;  // how many of the tokens matching `prefix` still belong to the top-k
};

// Device pointers into a SearchWorkspace.
struct SearchWorkspaceView {
  float* lut = nullptr;        // [kv][m][ksub][group pad]
  float2* partial = nullptr;   // [kv][kMaxScanBlocks][group pad]: block (max, sum), log2 domain
  float* lse = nullptr;        // [kv][group pad]: log2 of each head's softmax denominator
  uint32_t* scores = nullptr;  // [kv][score_stride]: aggregated score bits of token begin + i
  int64_t score_stride = 0;
  uint32_t* hist = nullptr;  // [kv][3][2048], then counters [kv][4]: cleared per search
  uint32_t* counters = nullptr;
  SelectState* state = nullptr;   // [kv]
  uint2* block_counts = nullptr;  // [kv][kMaxScanBlocks]: (above, equal to) the k-th score
  int sm_count = 1;               // of the device the workspace lives on
  // Blocks of the tensor-core scans an SM holds at once, per (int8, head_dim
  // 128, group pad 8) as bits of the index; found when the workspace is
  // allocated, since the occupancy API may not be called during a capture.
  int tile_blocks_per_sm[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  // The persistent int4/int8 and PQ searches (sq_fused_search.cuh,
  // pq_fused_search.cuh): their radix histograms [kv][5][2048] and
  // per-KV-head barrier words [kv][2], zero between searches (a search clears
  // what it used before it ends), and the int4/int8 search's blocks per SM,
  // in the slots of tile_blocks_per_sm (0: not available).
  uint32_t* fused_hist = nullptr;
  uint32_t* fused_barrier = nullptr;
  // Their candidate lists [kv][kFusedCandidates] (score bits; 16-byte
  // aligned) and running counts [kv] (never reset: a search counts from the
  // value it finds).
  uint32_t* fused_candidates = nullptr;
  uint32_t* fused_candidate_count = nullptr;
  int fused_blocks_per_sm[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  // The persistent PQ search's (pq_fused_search.cuh) blocks per SM, for
  // groups padded to 4 and to 8 heads (0: not available).
  int pq_fused_blocks_per_sm[2] = {0, 0};
};

// The preallocated memory of searches over up to `max_tokens` tokens.
class SearchWorkspace {
 public:
  static Result<SearchWorkspace> allocate(int kv_heads, int m, int ksub, int64_t max_tokens,
                                          cudaStream_t stream);
  const SearchWorkspaceView& view() const { return view_; }
  int64_t max_tokens() const { return view_.score_stride; }

 private:
  gpu::DeviceArray<float> floats_;
  gpu::DeviceArray<uint32_t> words_;
  gpu::DeviceArray<float2> partial_;
  gpu::DeviceArray<uint2> block_counts_;
  SearchWorkspaceView view_;
};

struct SelectRequest {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t k = 0;  // already clamped to end - begin
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
  int32_t* out = nullptr;  // device [kv_heads][k]
  // When set (device memory), begin, end and k are read from it when the
  // kernels run; the fields above are then the largest range and k it will
  // hold (launches are sized for them) and `out` is [kv_heads][device k].
  // The scans split a range the same way either way, so both give the same
  // positions for the same counts.
  const DeviceSearchRange* range = nullptr;
};

// PQ search over codes [kv_head][head_stride] laid out [token][m] (uint8, or
// int64 for the original method's table in benchmarks; exactly one non-null).
struct PqSearchArgs {
  SearchShape shape;
  const void* queries = nullptr;  // device [q_heads][head_dim], fp32 or bf16
  DType query_dtype = DType::kF32;
  const float* centroids = nullptr;  // device [kv][m][ksub][dsub]
  const uint8_t* codes = nullptr;
  const int64_t* codes_int64 = nullptr;
  int64_t head_stride = 0;  // elements between KV heads' code tables
  SelectRequest request;
  // uint8 codes run as one persistent kernel where it covers the shape
  // (pq_fused_search.cuh); false keeps the multi-kernel path (the fallback,
  // the baseline of `pqkv micro`, and the one that leaves the aggregated
  // scores in SearchWorkspaceView::scores).
  bool fused = true;
};

Status launch_pq_search(const PqSearchArgs& args, const SearchWorkspaceView& ws,
                        cudaStream_t stream);

// Scalar-quantized (int8, int4) or exact fp32 codes [kv_head][head_stride
// bytes] laid out [token][code_size] (sq_scan.cuh), scored through per-query
// tables (int4 and int8 at head_dim 64 and 128 on tensor cores,
// sq_tile_scores.cuh; others with the arithmetic of the CPU codecs), then the
// same softmax, GQA aggregation and top-k as launch_pq_search.
//
// Entry point for the decode path: one call builds the tables (into
// `tables`, a workspace of [q_heads][head_dim + 1] floats), clears the
// selection counters and runs the scans, all on `stream`, with no host sync
// and no allocation (capturable). The range and k are kernel arguments
// (request); a caller that wants them read from device memory at replay
// extends SelectRequest, not this struct. Where sq_fused_covers() holds
// (int4/int8 at head_dim 64 or 128, ranges up to a few hundred thousand
// tokens per KV head), the whole search is one persistent kernel
// (sq_fused_search.cuh) that builds its own tables; `tables` is then unused.
struct SqSearchArgs {
  SearchShape shape;              // m and ksub unused
  int bits = 4;                   // 8, 4, or kExactBits (sq_scan.cuh)
  const void* queries = nullptr;  // device [q_heads][head_dim], fp32 or bf16
  DType query_dtype = DType::kF32;
  const float* scale = nullptr;   // device [kv][head_dim]; null for exact keys
  const float* offset = nullptr;  // device [kv][head_dim]; null for exact keys
  const uint8_t* codes = nullptr;
  int64_t head_stride = 0;  // bytes between KV heads' code tables
  float* tables = nullptr;  // device workspace [q_heads][head_dim + 1]
  SelectRequest request;
  // int4 and int8 codes at head_dim 64 or 128 are scored on tensor cores
  // (sq_tile_scores.cuh: the same scores up to the order of fp32 additions);
  // false scores them one thread per token with the CPU codec's exact order
  // of operations (the reference path, and the baseline of `pqkv micro`).
  bool tensor_cores = true;
  // With tensor cores, one persistent kernel does the whole search where it
  // covers the shape (sq_fused_search.cuh); false keeps the six-kernel path
  // (the fallback, and the baseline of `pqkv micro`).
  bool fused = true;
};

Status launch_sq_search(const SqSearchArgs& args, const SearchWorkspaceView& ws,
                        cudaStream_t stream);

// Two-stage selection's second stage (LayerIndexCuda with
// SelectionConfig::candidates > 0), run after the first stage's search
// (launch_pq_search or launch_sq_search, persistent or not) on the same
// workspace and stream: that search keeps `pool` candidates per KV head into
// `candidates` (in increasing position) and leaves each query head's
// log-sum-exp in ws.lse. This launch scores only those candidates with the
// rerank code, turns each head's scores into probabilities with the first
// stage's normaliser (exp2(score * log2(e) / sqrt(head_dim) - lse), the CPU
// index's exp((score - max) / sqrt(head_dim)) / Z), aggregates the GQA group,
// and writes the positions of the k best candidates per KV head to `out` in
// increasing position (equal scores: the lower position), as LayerIndexCpu's
// rerank picks them. Everything on `stream`, no host sync, no allocation.
struct RerankArgs {
  SearchShape shape;              // q_heads, kv_heads, head_dim; m and ksub of a PQ rerank code
  const void* queries = nullptr;  // device [q_heads][head_dim], fp32 or bf16
  DType query_dtype = DType::kF32;
  // The rerank code: PQ when centroids is set, else scalar or exact keys of `bits`.
  const float* centroids = nullptr;  // device [kv][m][ksub][dsub]
  int bits = 8;                      // 8, 4 or kExactBits (sq_scan.cuh)
  const float* scale = nullptr;      // device [kv][head_dim]; null for exact keys
  const float* offset = nullptr;     // device [kv][head_dim]; null for exact keys
  float* tables = nullptr;           // device workspace [q_heads][head_dim + 1] (not PQ)
  const uint8_t* codes = nullptr;    // device [kv][head_stride bytes], [token][code_size]
  int64_t head_stride = 0;
  const int32_t* candidates = nullptr;  // device [kv][pool] positions
  int64_t pool = 0;                     // candidates per KV head (the largest, with `range`)
  int64_t k = 0;                        // kept per KV head, <= pool
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;
  int32_t* out = nullptr;  // device [kv][k]
  // Device-side {0, pool, k} (written by launch_pool_ranges), or null: then
  // `candidates` is [kv][device pool] and `out` [kv][device k].
  const DeviceSearchRange* range = nullptr;
};

Status launch_rerank(const RerankArgs& args, const SearchWorkspaceView& ws, cudaStream_t stream);

// From a search's device-side counts `in`, writes out[0] = the first stage's
// {begin, end, pool} and out[1] = the rerank's {0, pool, k}, pool =
// min(end - begin, max(k, candidates * k)) with k clamped to the range (the
// CPU index's pool). One thread on `stream`; out is device memory of two.
Status launch_pool_ranges(const DeviceSearchRange* in, int candidates, DeviceSearchRange* out,
                          cudaStream_t stream);

// The same softmax, aggregation and top-k over exact scores raw [q_heads][end - begin]
// (device fp32, q.k before the 1/sqrt(head_dim) scale): the exact baseline.
Status launch_dense_select(const SearchShape& shape, const float* raw, const SelectRequest& request,
                           const SearchWorkspaceView& ws, cudaStream_t stream);

}  // namespace pqkv::index::cuda
