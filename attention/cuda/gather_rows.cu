#include <algorithm>
#include <bit>
#include <string>

#include "attention/cuda/gather_rows.cuh"
#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

constexpr int kGatherThreads = 256;
// 16-byte chunks each thread loads before it stores any: with every thread's
// loads issued together an SM keeps up to 2048 * 4 * 16 B = 128 KiB of reads
// in flight, far more than PCIe's latency times bandwidth needs.
constexpr int kChunksPerThread = 4;
constexpr int64_t kChunksPerBlock = int64_t{kGatherThreads} * kChunksPerThread;

// The row's 16-byte chunks are spread over consecutive threads, so a warp
// moves one 512 B row, two 256 B rows or four 128 B rows per load, each lane's
// access contiguous with its neighbours'. blockIdx.y is the KV head.
__global__ void __launch_bounds__(kGatherThreads)
    gather_rows_kernel(storage::RowTableView table, int chunk_shift,
                       const int32_t* __restrict__ positions, int64_t tokens,
                       const int64_t* device_tokens, uint4* __restrict__ out) {
  if (device_tokens != nullptr) tokens = *device_tokens;
  const int head = blockIdx.y;
  const int64_t head_chunks = tokens << chunk_shift;
  const int32_t* head_positions = positions + head * tokens;
  uint4* head_out = out + head * head_chunks;
  const int64_t chunk_mask = (int64_t{1} << chunk_shift) - 1;
  const int64_t first = blockIdx.x * kChunksPerBlock + threadIdx.x;

  uint4 v[kChunksPerThread];
#pragma unroll
  for (int k = 0; k < kChunksPerThread; ++k) {
    const int64_t c = first + k * kGatherThreads;
    if (c < head_chunks) {
      const int32_t token = __ldg(head_positions + (c >> chunk_shift));
      const auto* block = reinterpret_cast<const uint4*>(
          __ldg(reinterpret_cast<const unsigned long long*>(table.blocks) +
                table.block_index(head, token)));
      // Cache-global: the source is read once, so it skips L1.
      v[k] = __ldcg(block + ((table.row_in_block(token) << chunk_shift) | (c & chunk_mask)));
    }
  }
#pragma unroll
  for (int k = 0; k < kChunksPerThread; ++k) {
    const int64_t c = first + k * kGatherThreads;
    if (c < head_chunks) head_out[c] = v[k];
  }
}

}  // namespace

Status launch_gather_rows(const GatherRowsArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(args.validate());
  if (args.tokens == 0) return ok_status();
  const int chunk_shift = std::countr_zero(static_cast<uint64_t>(args.table.row_bytes / 16));
  const int64_t head_chunks = args.tokens << chunk_shift;
  const dim3 grid(static_cast<unsigned>((head_chunks + kChunksPerBlock - 1) / kChunksPerBlock),
                  static_cast<unsigned>(args.table.kv_heads));
  gather_rows_kernel<<<grid, kGatherThreads, 0, stream>>>(args.table, chunk_shift, args.positions,
                                                          args.tokens, args.device_tokens,
                                                          reinterpret_cast<uint4*>(args.out));
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::attention::cuda
