#include "attention/cuda/gather_tiered_rows.cuh"

#include <bit>
#include <string>

#include "core/cuda_check.h"

namespace pqkv::attention::cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kChunksPerThread = 4;  // as gather_rows.cu: loads in flight before stores
constexpr int64_t kChunksPerBlock = int64_t{kGatherThreads} * kChunksPerThread;
// A plan has at most four resident ranges: two in the sink's entries and two
// in the window's (sink slots, ring).
constexpr int kMaxResidentRanges = 4;

struct ResidentEntries {
  int count = 0;
  int64_t begin[kMaxResidentRanges] = {};
  int64_t end[kMaxResidentRanges] = {};

  __device__ bool contains(int64_t entry) const {
    bool in = false;
#pragma unroll
    for (int r = 0; r < kMaxResidentRanges; ++r)
      in |= r < count && entry >= begin[r] && entry < end[r];
    return in;
  }
};

// gather_rows_kernel with more sources: a chunk of a resident entry is read
// from HBM, a staged one (its block spilled) from its staged row, any other
// from its block's cache slot when the table names one, else from the row
// store. blockIdx.y is the KV head.
__global__ void __launch_bounds__(kGatherThreads)
    gather_tiered_rows_kernel(storage::RowTableView table, tiering::ResidentRowsView resident,
                              tiering::BlockCacheView cache, ResidentEntries entries,
                              const std::byte* const* __restrict__ staged, int chunk_shift,
                              const int32_t* __restrict__ positions, int64_t tokens,
                              const int64_t* device_tokens, const int64_t* device_length,
                              uint4* __restrict__ out) {
  if (device_tokens != nullptr) tokens = *device_tokens;
  const int64_t length = device_length != nullptr ? *device_length : 0;
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
      const int64_t entry = c >> chunk_shift;
      const int32_t token = __ldg(head_positions + entry);
      const uint4* row;
      const std::byte* staged_row = staged != nullptr ? staged[head * tokens + entry] : nullptr;
      const bool resident_row =
          device_length != nullptr ? resident.shape.holds(token, length) : entries.contains(entry);
      if (staged_row != nullptr) {
        row = reinterpret_cast<const uint4*>(staged_row);
      } else if (resident_row) {
        row = reinterpret_cast<const uint4*>(resident.row(head, token));
      } else if (const std::byte* cached = cache.row(head, token); cached != nullptr) {
        row = reinterpret_cast<const uint4*>(cached);
      } else {
        const auto* block = reinterpret_cast<const uint4*>(
            __ldg(reinterpret_cast<const unsigned long long*>(table.blocks) +
                  table.block_index(head, token)));
        row = block + (table.row_in_block(token) << chunk_shift);
      }
      v[k] = __ldcg(row + (c & chunk_mask));
    }
  }
#pragma unroll
  for (int k = 0; k < kChunksPerThread; ++k) {
    const int64_t c = first + k * kGatherThreads;
    if (c < head_chunks) head_out[c] = v[k];
  }
}

}  // namespace

Status GatherTieredRowsArgs::validate() const {
  PQKV_RETURN_IF_ERROR(dram.validate());
  if (!cache.empty() && (cache.row_bytes != dram.table.row_bytes || cache.slots == nullptr)) {
    return Status::invalid_argument("tiered gather: the block cache's rows are " +
                                    std::to_string(cache.row_bytes) + " bytes, the table's " +
                                    std::to_string(dram.table.row_bytes));
  }
  if (device_length != nullptr) {
    if (staged != nullptr) {
      return Status::invalid_argument(
          "tiered gather: staged rows from disk are for direct steps, not at a device length");
    }
    if (dram.device_tokens == nullptr || resident.rows == nullptr ||
        resident.row_bytes != dram.table.row_bytes || resident.kv_heads != dram.table.kv_heads) {
      return Status::invalid_argument(
          "tiered gather at a device length: needs device token counts and the layer's resident "
          "rows of its row shape");
    }
    return ok_status();
  }
  if (plan.rows_per_head != dram.tokens) {
    return Status::invalid_argument(
        "tiered gather: the fetch plan covers " + std::to_string(plan.rows_per_head) +
        " entries per KV head, the position lists " + std::to_string(dram.tokens));
  }
  if (plan.rows_from(tiering::RowSource::kResident) == 0) return ok_status();
  if (resident.rows == nullptr || resident.row_bytes != dram.table.row_bytes ||
      resident.kv_heads != dram.table.kv_heads) {
    return Status::invalid_argument(
        "tiered gather: the plan reads resident rows but the layer has none of its row shape");
  }
  int resident_ranges = 0;
  for (int r = 0; r < plan.num_ranges; ++r)
    resident_ranges += plan.ranges[r].source == tiering::RowSource::kResident ? 1 : 0;
  if (resident_ranges > kMaxResidentRanges) {
    return Status::invalid_argument("tiered gather: more than 4 resident ranges in the plan");
  }
  return ok_status();
}

Status launch_gather_tiered_rows(const GatherTieredRowsArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(args.validate());
  if (args.dram.tokens == 0) return ok_status();
  ResidentEntries entries;
  for (int r = 0; r < args.plan.num_ranges; ++r) {
    const tiering::FetchRange& range = args.plan.ranges[r];
    if (range.source != tiering::RowSource::kResident) continue;
    entries.begin[entries.count] = range.begin;
    entries.end[entries.count] = range.end;
    ++entries.count;
  }
  const int chunk_shift = std::countr_zero(static_cast<uint64_t>(args.dram.table.row_bytes / 16));
  const int64_t head_chunks = args.dram.tokens << chunk_shift;
  const dim3 grid(static_cast<unsigned>((head_chunks + kChunksPerBlock - 1) / kChunksPerBlock),
                  static_cast<unsigned>(args.dram.table.kv_heads));
  gather_tiered_rows_kernel<<<grid, kGatherThreads, 0, stream>>>(
      args.dram.table, args.resident, args.cache, entries, args.staged, chunk_shift,
      args.dram.positions, args.dram.tokens, args.dram.device_tokens, args.device_length,
      reinterpret_cast<uint4*>(args.dram.out));
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::attention::cuda
