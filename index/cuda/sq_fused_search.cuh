// The whole search of int4 or int8 keys at head_dim 64 or 128 in one
// persistent kernel: the same tables, tensor-core scores (sq_tile_scores.cuh),
// per-head softmax, GQA aggregation and top-k as launch_sq_search's six
// kernels, with the codes read once.
//
// Why: at 128K tokens the six-kernel path spends more time on its launches
// and last-block reductions than on reading the codes, and reads the codes
// twice (statistics, then scores). Here every KV head gets `blocks` blocks,
// all resident at once (a cooperative launch); a block scores its slice of
// tokens once, keeps the raw scores of every head of the group in shared
// memory, and meets the other blocks of its KV head at barriers: after the
// softmax statistics, after the first radix pass over the aggregated scores
// (their top 12 bits), and after every block has appended its scores in the
// bucket of the k-th best (the candidates) to a list of the KV head
// (fused_select.cuh, shared with the persistent PQ search). From that list
// (up to kFusedCandidates scores) each block finishes the selection and
// places its positions in the output on its own. Where the list overflows
// (many near-equal scores), two more radix passes and a count of each block
// run with a barrier each.
//
// The selected set is launch_sq_search's (score descending, position
// ascending), for the same scores up to the order of fp32 additions in the
// softmax denominators (the blocks split the tokens differently).
#pragma once

#include <cuda_runtime_api.h>

#include "index/cuda/pq_search.cuh"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// True when the fused kernel takes this search: int4 or int8 codes at
// head_dim 64 or 128 on tensor cores, a workspace allocated outside a stream
// capture on a device with room for the kernel's shared memory, and a range
// (or, with device-side counts, the largest range) whose slice per block fits
// that memory: up to about 190K tokens per KV head for Llama-3.1-8B's 8 KV
// heads and groups of 4 on an H200. Host only; no CUDA calls.
bool sq_fused_covers(const SqSearchArgs& args, const SearchWorkspaceView& ws);

// The search of launch_sq_search (same arguments, same output) as one
// cooperative kernel on `stream`: no host sync, no allocation, capturable.
// Call only where sq_fused_covers() holds (else InvalidArgument). It uses
// ws.fused_hist, ws.fused_barrier, ws.partial and ws.block_counts, so two
// searches on one workspace must be ordered (one stream). Internal for a CUDA
// error.
Status launch_sq_fused_search(const SqSearchArgs& args, const SearchWorkspaceView& ws,
                              cudaStream_t stream);

// Blocks per SM of each instantiation of the fused kernel on the current
// device, into out[SqTileSource::kOccupancySlot] (8 slots; 0 where it cannot
// run). Makes occupancy and function-attribute calls: not during a capture.
Status sq_fused_occupancies(int* out);

}  // namespace pqkv::index::cuda
