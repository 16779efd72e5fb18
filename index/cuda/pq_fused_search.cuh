// The whole PQ search in one persistent kernel: the same LUTs, scores,
// per-head softmax, GQA aggregation and top-k as launch_pq_search's LUT, scan
// and select kernels, with the scores kept in shared memory.
//
// Why: the codes of a 128K-token layer at m=4 are 4 MB, 1.4 us of HBM time,
// while the seven kernels take about 60 us, nearly all of it launches, the
// second pass over the codes and the last-block reductions between the
// select passes. Here every KV head gets `blocks` blocks, all resident at
// once (a cooperative launch). A block builds its KV head's LUTs in shared
// memory from the centroids and the queries (each entry the in-order,
// unfused dot product of lut_kernel, so the scores are the multi-kernel
// path's bit for bit), scores its slice of tokens once (one thread a token,
// the sub-spaces summed in order), and then runs the selection of the int4
// search (fused_select.cuh) with the other blocks of its KV head.
//
// The selected set is launch_pq_search's for the same scores, up to the
// order of fp32 additions in the softmax denominators (the blocks split the
// tokens differently).
#pragma once

#include <cuda_runtime_api.h>

#include "index/cuda/pq_search.cuh"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// True when the persistent kernel takes this search: uint8 codes with m of 2,
// 4, 8 or 16 sub-spaces, a workspace allocated outside a stream capture on a
// device with room for the kernel's shared memory, and a range (or, with
// device-side counts, the largest range) whose slice per block fits that
// memory next to the LUTs: up to about 160K tokens per KV head for
// Llama-3.1-8B's 8 KV heads, groups of 4 and m=4, b=8 on an H200. Host only;
// no CUDA calls.
bool pq_fused_covers(const PqSearchArgs& args, const SearchWorkspaceView& ws);

// The search of launch_pq_search (same arguments, same output) as one
// cooperative kernel on `stream`: no host sync, no allocation, capturable.
// Call only where pq_fused_covers() holds (else InvalidArgument). It uses
// ws.fused_hist, ws.fused_barrier, ws.fused_candidates, ws.partial and
// ws.block_counts (as the int4 search does), so two searches on one
// workspace must be ordered (one stream); it writes no ws.scores. Internal
// for a CUDA error.
Status launch_pq_fused_search(const PqSearchArgs& args, const SearchWorkspaceView& ws,
                              cudaStream_t stream);

// Blocks per SM of the persistent PQ kernel for groups padded to 4 and to 8
// heads (out[0], out[1]; the fewest over its sub-space counts; 0 where it
// cannot run) on the current device. Makes occupancy and function-attribute
// calls: not during a capture.
Status pq_fused_occupancies(int* out);

}  // namespace pqkv::index::cuda
