#include "index/cuda/sq_fused_search.cuh"

#include <algorithm>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "index/cuda/fused_select.cuh"
#include "index/cuda/search_select.cuh"
#include "index/cuda/sq_tile_scores.cuh"

namespace pqkv::index::cuda {

namespace {

using fused::cooperative_occupancy;
using fused::FusedSelect;
using fused::kThreads;
using fused::launch_cooperative;
using fused::make_fused_select;
// Two blocks an SM: 16 warps keep enough code loads in flight, and each
// block gets 92 KB of shared memory for its tables and raw scores, next to
// the 20 KB of static shared memory (16 KB the first radix histogram).
constexpr int kBlocksPerSm = 2;
constexpr size_t kSmemBytes = 92 * 1024;

// The query side of a search: the group's tables are built from these.
struct SqQueries {
  const void* queries;  // [q_heads][head_dim]
  DType query_dtype;
  const float* scale;   // [kv][head_dim]
  const float* offset;  // [kv][head_dim]
};

template <int kBits, int kHeadDim, int kGroupPad>
using Tile = SqTileSource<kBits, kHeadDim, kGroupPad>;

// Floats of the staged tables, rounded to 16 bytes; the raw scores follow.
template <class T>
__host__ __device__ constexpr int table_floats() {
  return static_cast<int>((T::smem_bytes() / sizeof(float) + 3) / 4 * 4);
}

// Tokens of raw scores a block keeps for `group` heads, in whole tiles.
template <class T>
int capacity_of(int group) {
  const size_t bytes = kSmemBytes - sizeof(float) * table_floats<T>();
  return static_cast<int>(bytes / (sizeof(float) * group) / kTileTokens * kTileTokens);
}

// The group's tables as launch_sq_tables makes them (q[c] * scale[c], then
// the offset term summed in channel order, unfused), staged as
// SqTileSource::prepare stages them; `scratch` holds group * head_dim floats.
template <class T, int kHeadDim>
__device__ void stage_tables(const SqQueries& q, int group, int kv, float* smem, float* scratch) {
  constexpr int kTableFloats = table_floats<T>();
  for (int i = threadIdx.x; i < kTableFloats; i += kThreads)
    smem[i] = 0.0f;
  __syncthreads();
  for (int i = threadIdx.x; i < group * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim;
    const int c = i % kHeadDim;
    const float x =
        gpu::load_as_float(q.queries, q.query_dtype, int64_t{kv * group + g} * kHeadDim + c);
    smem[g * T::kRow + c] = __fmul_rn(x, q.scale[kv * kHeadDim + c]);
    scratch[i] = __fmul_rn(x, q.offset[kv * kHeadDim + c]);
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float bias = 0.0f;
#pragma unroll 16
    for (int c = 0; c < kHeadDim; ++c)
      bias = __fadd_rn(bias, scratch[threadIdx.x * kHeadDim + c]);
    smem[threadIdx.x * T::kRow + kHeadDim] = bias;
  }
  __syncthreads();
  T::scale_tables(smem);
}

template <int kBits, int kHeadDim, int kGroupPad>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fused_search_kernel(Tile<kBits, kHeadDim, kGroupPad> src, SqQueries q, FusedSelect p,
                        SearchWorkspaceView ws) {
  using T = Tile<kBits, kHeadDim, kGroupPad>;
  // Tiles of 16 tokens whose code rows a warp loads ahead of the two it
  // scores: at 128K tokens the scan then reads the codes at about 3 TB/s, and
  // four measured no faster.
  constexpr int kDepth = 2;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  constexpr int kTableFloats = table_floats<T>();
  float* raw = smem + kTableFloats;  // [group][capacity] raw scores, then aggregated bits

  // The range: the same in every block, so all of them return here or none.
  fused::BlockRange r;
  if (!fused::resolve_block_range(p, &r)) return;
  PQKV_STAMP(0);
  const int kv = blockIdx.y;
  const int64_t t0 = r.t0;
  const int64_t t1 = r.t1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;

  // The first code rows are in flight while the tables are staged.
  constexpr int kStride = fused::kWarps * kTileTokens;
  typename T::Rows rows[kDepth + 2];
  int64_t base = t0 + warp * kTileTokens;
#pragma unroll
  for (int i = 0; i < kDepth; ++i) {
    if (base + i * kStride < t1) src.load(kv, base + i * kStride, t1, t0, &rows[i]);
  }
  stage_tables<T, kHeadDim>(q, p.group, kv, smem, raw);
  typename T::Fragments frag;
  src.template load_fragments<true>(smem, &frag);
  PQKV_STAMP(1);

  // 1. Dot products of the block's tokens, kept in shared memory: a lane
  //    holds head nt * 4 + quad of two tokens of a tile. Each trip first
  //    loads the rows of the two tiles kDepth ahead, then scores the two
  //    loaded earlier, so that kDepth to kDepth + 2 tiles' loads are in
  //    flight. The loop does no more than that (and the extremes of each
  //    lane's scores, for the softmax statistics), as its instructions, not
  //    the code bytes, bound it.
  float hi[T::kNt];
  float lo[T::kNt];
#pragma unroll
  for (int nt = 0; nt < T::kNt; ++nt) {
    hi[nt] = -INFINITY;
    lo[nt] = INFINITY;
  }
  for (; base < t1; base += 2 * kStride) {
#pragma unroll
    for (int i = kDepth; i < kDepth + 2; ++i) {
      const int64_t ahead = base + i * kStride;
      if (ahead < t1) src.load(kv, ahead, t1, t0, &rows[i]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t tile = base + i * kStride;
      if (tile >= t1) break;
      float d[T::kNt][2];
      src.paired_dots(rows[i], frag, d);
      const int at = static_cast<int>(tile - t0) + lane / 4;
      // Rows past the block's tokens score too; their scores are not counted.
      const bool first = at < r.n_local;
      const bool second = at + 8 < r.n_local;
#pragma unroll
      for (int nt = 0; nt < T::kNt; ++nt) {
        const int head = nt * 4 + quad;
        if (head < p.group) {
          raw[head * p.capacity + at] = d[nt][0];
          raw[head * p.capacity + at + 8] = d[nt][1];
        }
        hi[nt] = fmaxf(hi[nt], first ? d[nt][0] : -INFINITY);
        lo[nt] = fminf(lo[nt], first ? d[nt][0] : INFINITY);
        hi[nt] = fmaxf(hi[nt], second ? d[nt][1] : -INFINITY);
        lo[nt] = fminf(lo[nt], second ? d[nt][1] : INFINITY);
      }
    }
#pragma unroll
    for (int i = 0; i < kDepth; ++i)
      rows[i] = rows[i + 2];
  }
  __syncthreads();
  float bias[kGroupPad];
  float unscale[kGroupPad];
  float raw_hi[kGroupPad];  // the lane's extremes, of its heads only
  float raw_lo[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    bias[g] = smem[g * T::kRow + kHeadDim];
    unscale[g] = smem[T::kUnscale + g];
    raw_hi[g] = g % 4 == quad ? hi[g / 4] : -INFINITY;
    raw_lo[g] = g % 4 == quad ? lo[g / 4] : INFINITY;
  }
  fused::finish_search<kGroupPad>(p, r, ws, raw, bias, unscale, raw_hi, raw_lo);
}

// Runs f.template operator()<kBits, kHeadDim, kGroupPad>() for the shape.
template <class F>
auto dispatch(int bits, int head_dim, int group, F&& f) {
  const auto pad = [&]<int kBits, int kHeadDim>() {
    if (group <= 4) return f.template operator()<kBits, kHeadDim, 4>();
    return f.template operator()<kBits, kHeadDim, 8>();
  };
  if (bits == 4) {
    return head_dim == 128 ? pad.template operator()<4, 128>() : pad.template operator()<4, 64>();
  }
  return head_dim == 128 ? pad.template operator()<8, 128>() : pad.template operator()<8, 64>();
}

// Blocks per KV head the fused kernel launches for this shape, 0 if none.
int blocks_per_head(const SqSearchArgs& a, const SearchWorkspaceView& ws) {
  if (a.shape.kv_heads < 1 || a.shape.q_heads % a.shape.kv_heads != 0) return 0;
  const int group = a.shape.q_heads / a.shape.kv_heads;
  if (group < 1 || group > kMaxGroup || !sq_tile_supported(a.bits, a.shape.head_dim)) return 0;
  return dispatch(a.bits, a.shape.head_dim, group, [&]<int kBits, int kHeadDim, int kGroupPad>() {
    using T = Tile<kBits, kHeadDim, kGroupPad>;
    const int per_sm = ws.fused_blocks_per_sm[T::kOccupancySlot];
    const int blocks = std::min(per_sm * ws.sm_count / a.shape.kv_heads, kMaxScanBlocks);
    if (blocks < 1) return 0;
    const int64_t chunk = fused::fused_chunk(a.request.end - a.request.begin, blocks);
    return chunk <= capacity_of<T>(group) ? blocks : 0;
  });
}

}  // namespace

bool sq_fused_covers(const SqSearchArgs& args, const SearchWorkspaceView& ws) {
  return ws.fused_hist != nullptr && args.scale != nullptr && args.offset != nullptr &&
         blocks_per_head(args, ws) > 0;
}

Status launch_sq_fused_search(const SqSearchArgs& a, const SearchWorkspaceView& ws,
                              cudaStream_t stream) {
  const int blocks = ws.fused_hist != nullptr ? blocks_per_head(a, ws) : 0;
  if (blocks == 0 || a.scale == nullptr || a.offset == nullptr) {
    return Status::invalid_argument(
        "the fused search does not cover this shape or range (int" + std::to_string(a.bits) +
        ", head_dim " + std::to_string(a.shape.head_dim) + ", " +
        std::to_string(a.request.end - a.request.begin) +
        " tokens): call launch_sq_search, which falls back to the six-kernel search");
  }
  const SelectRequest& r = a.request;
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  PQKV_STAMP_REPORT();
  const int group = a.shape.q_heads / a.shape.kv_heads;
  return dispatch(
      a.bits, a.shape.head_dim, group, [&]<int kBits, int kHeadDim, int kGroupPad>() -> Status {
        using T = Tile<kBits, kHeadDim, kGroupPad>;
        const FusedSelect p =
            make_fused_select(r, blocks, capacity_of<T>(group), group, a.shape.head_dim);
        const SqQueries q{a.queries, a.query_dtype, a.scale, a.offset};
        const T src{a.codes, nullptr, a.head_stride, group};
        return launch_cooperative(fused_search_kernel<kBits, kHeadDim, kGroupPad>, blocks,
                                  a.shape.kv_heads, kSmemBytes, stream, src, q, p, ws);
      });
}

Status sq_fused_occupancies(int* out) {
  const auto one = [&]<int kBits, int kHeadDim, int kGroupPad>() -> Status {
    using T = Tile<kBits, kHeadDim, kGroupPad>;
    return cooperative_occupancy(fused_search_kernel<kBits, kHeadDim, kGroupPad>, kSmemBytes,
                                 kBlocksPerSm, &out[T::kOccupancySlot]);
  };
  for (int group : {4, 8}) {
    for (int bits : {4, 8}) {
      for (int head_dim : {64, 128}) {
        PQKV_RETURN_IF_ERROR(dispatch(bits, head_dim, group, one));
      }
    }
  }
  return ok_status();
}

}  // namespace pqkv::index::cuda
