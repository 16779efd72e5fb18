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
    gather_rows_kernel(const uint4* const* __restrict__ slab_table, int kv_heads, int chunk_shift,
                       int slab_shift, const int32_t* __restrict__ positions, int64_t tokens,
                       uint4* __restrict__ out) {
  const int head = blockIdx.y;
  const int64_t head_chunks = tokens << chunk_shift;
  const int32_t* head_positions = positions + head * tokens;
  uint4* head_out = out + head * head_chunks;
  const int64_t chunk_mask = (int64_t{1} << chunk_shift) - 1;
  const int32_t slab_mask = (int32_t{1} << slab_shift) - 1;
  const int64_t first = blockIdx.x * kChunksPerBlock + threadIdx.x;

  uint4 v[kChunksPerThread];
#pragma unroll
  for (int k = 0; k < kChunksPerThread; ++k) {
    const int64_t c = first + k * kGatherThreads;
    if (c < head_chunks) {
      const int32_t token = __ldg(head_positions + (c >> chunk_shift));
      const auto* slab = reinterpret_cast<const uint4*>(
          __ldg(reinterpret_cast<const unsigned long long*>(slab_table) +
                (int64_t{token >> slab_shift} * kv_heads + head)));
      // Cache-global: the source is read once, so it skips L1.
      v[k] = __ldcg(slab + ((int64_t{token & slab_mask} << chunk_shift) | (c & chunk_mask)));
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
  const int chunk_shift = std::countr_zero(static_cast<uint64_t>(args.row_bytes / 16));
  const int slab_shift = std::countr_zero(static_cast<uint64_t>(args.tokens_per_slab));
  const int64_t head_chunks = args.tokens << chunk_shift;
  const dim3 grid(static_cast<unsigned>((head_chunks + kChunksPerBlock - 1) / kChunksPerBlock),
                  static_cast<unsigned>(args.kv_heads));
  gather_rows_kernel<<<grid, kGatherThreads, 0, stream>>>(
      reinterpret_cast<const uint4* const*>(args.slab_table), args.kv_heads, chunk_shift,
      slab_shift, args.positions, args.tokens, reinterpret_cast<uint4*>(args.out));
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Result<DeviceSlabTable> DeviceSlabTable::create(const storage::KvRowStore& kv, int layer,
                                                int64_t max_tokens) {
  if (!kv.allocator().device_readable()) {
    return Status::failed_precondition(
        "slab table: the row store's slabs are not device readable; create the store with "
        "make_pinned_slab_allocator()");
  }
  if (layer < 0 || layer >= kv.spec().num_layers) {
    return Status::invalid_argument("slab table: no layer " + std::to_string(layer));
  }
  int device = 0;
  int unified = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&unified, cudaDevAttrUnifiedAddressing, device));
  if (unified == 0) {
    // Without unified addressing a mapped slab has a different device address.
    return Status::unavailable("slab table: the GPU lacks unified addressing");
  }
  constexpr int64_t tps = storage::KvRowStore::kTokensPerSlab;
  const int64_t capacity = std::max((max_tokens + tps - 1) / tps, kv.num_slabs(layer));
  const size_t bytes = static_cast<size_t>(capacity) * kv.spec().num_kv_heads * sizeof(void*);
  PQKV_ASSIGN_OR_RETURN(gpu::PinnedBuffer host, gpu::PinnedBuffer::allocate(bytes));
  PQKV_ASSIGN_OR_RETURN(gpu::DeviceBuffer dev, gpu::DeviceBuffer::allocate(bytes));
  return DeviceSlabTable(&kv, layer, capacity, std::move(host), std::move(dev));
}

Status DeviceSlabTable::update(cudaStream_t stream) {
  const int64_t slabs = kv_->num_slabs(layer_);
  if (slabs > capacity_) {
    return Status::out_of_range("slab table: layer " + std::to_string(layer_) + " holds " +
                                std::to_string(slabs) + " slabs, the table was created for " +
                                std::to_string(capacity_) + "; create it with a larger max_tokens");
  }
  if (slabs == synced_) return ok_status();
  const int kv_heads = kv_->spec().num_kv_heads;
  auto** host = host_.as<const std::byte*>();
  fill_slab_table(*kv_, layer_, synced_, slabs, host + synced_ * kv_heads);
  const size_t offset = static_cast<size_t>(synced_) * kv_heads * sizeof(void*);
  const size_t bytes = static_cast<size_t>(slabs - synced_) * kv_heads * sizeof(void*);
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_.as<std::byte>() + offset,
                                            host_.as<std::byte>() + offset, bytes,
                                            cudaMemcpyHostToDevice, stream));
  synced_ = slabs;
  return ok_status();
}

GatherRowsArgs DeviceSlabTable::gather_args(const int32_t* positions, int64_t tokens,
                                            std::byte* out) const {
  GatherRowsArgs a;
  a.slab_table = device_table();
  a.kv_heads = kv_->spec().num_kv_heads;
  a.row_bytes = kv_->spec().row_bytes();
  a.tokens_per_slab = storage::KvRowStore::kTokensPerSlab;
  a.positions = positions;
  a.tokens = tokens;
  a.out = out;
  return a;
}

}  // namespace pqkv::attention::cuda
