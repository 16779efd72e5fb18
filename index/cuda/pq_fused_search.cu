#include "index/cuda/pq_fused_search.cuh"

#include <algorithm>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "index/cuda/fused_select.cuh"
#include "index/cuda/search_select.cuh"

namespace pqkv::index::cuda {
namespace {

using fused::cooperative_occupancy;
using fused::FusedSelect;
using fused::kThreads;
using fused::launch_cooperative;
using fused::make_fused_select;
// As the int4 search: two blocks an SM, 92 KB of shared memory each for the
// LUTs and the raw scores (next to 20 KB of static shared memory).
constexpr int kBlocksPerSm = 2;
constexpr size_t kSmemBytes = 92 * 1024;
// Tokens a thread has in flight at once in the scan (one code row each).
constexpr int kScanUnroll = 8;

struct PqFusedArgs {
  const void* queries;  // [q_heads][head_dim]
  DType query_dtype;
  const float* centroids;  // [kv][m][ksub][dsub]
  const uint8_t* codes;    // [kv][head_stride], [token][m]
  int64_t head_stride;
  int head_dim;
  int ksub;
};

// Floats of the LUTs [m][ksub][kGroupPad] in shared memory, rounded to 16
// bytes; the raw scores follow.
template <int kGroupPad>
__host__ __device__ constexpr int lut_floats(int m, int ksub) {
  return (m * ksub * kGroupPad + 3) / 4 * 4;
}

// Tokens of raw scores a block keeps for `group` heads next to the LUTs, in
// whole slices (0 if the LUTs leave no room).
template <int kGroupPad>
int capacity_of(int m, int ksub, int group) {
  const int64_t bytes =
      static_cast<int64_t>(kSmemBytes) - int64_t{sizeof(float)} * lut_floats<kGroupPad>(m, ksub);
  if (bytes <= 0) return 0;
  return static_cast<int>(bytes / (int64_t{sizeof(float)} * group) / fused::kSliceTokens *
                          fused::kSliceTokens);
}

// A token's code row of kM bytes, loaded in one access.
template <int kM>
struct CodeRow {
  uint32_t w[(kM + 3) / 4];

  __device__ __forceinline__ void load(const uint8_t* p) {
    if constexpr (kM == 2) {
      w[0] = *reinterpret_cast<const uint16_t*>(p);
    } else if constexpr (kM == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else if constexpr (kM == 8) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x;
      w[1] = v.y;
    } else {
      static_assert(kM == 16, "rows of 2, 4, 8 or 16 codes");
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x;
      w[1] = v.y;
      w[2] = v.z;
      w[3] = v.w;
    }
  }
  __device__ __forceinline__ int code(int j) const { return (w[j / 4] >> (8 * (j % 4))) & 0xff; }
};

// Centroid floats build_luts stages in shared memory at a time.
constexpr int kStagedFloats = 2048;

// Floats of scratch build_luts needs past the LUTs: the group's queries (rows
// padded by one float), then kStagedFloats of centroids (also padded).
__host__ __device__ constexpr int lut_scratch_floats(int group, int head_dim, int dsub) {
  return (group * (head_dim + 1) + 3) / 4 * 4 + kStagedFloats / dsub * (dsub + 1);
}

// The KV head's LUTs in shared memory, lut[(j * ksub + c) * kGroupPad + g] =
// q_g . centroid c of sub-space j, each dot in order and unfused as
// lut_kernel (and the CPU reference) computes it; heads past the group 0.
// The blocks of the KV head build them once between them: each computes its
// share of the entries (a thread a head of an entry, from centroids staged
// in shared memory with coalesced loads) into the workspace's LUTs, and
// after a barrier every block copies all of them from L2. Built in every
// block, they cost 9.6 us of the search at 128K (each block read all the KV
// head's centroids, 128 KB at m=4, b=8). `scratch` holds lut_scratch_floats()
// floats. Ends with a barrier of the block.
template <int kGroupPad, int kM>
__device__ void build_luts(const PqFusedArgs& a, const fused::FusedSelect& p, float* global_lut,
                           uint32_t* bar, float* lut, float* scratch) {
  const int kv = blockIdx.y;
  const int group = p.group;
  const int head_dim = a.head_dim;
  const int dsub = head_dim / kM;
  const int row = dsub + 1;
  const int entries = kM * a.ksub;
  float* q = scratch;  // [group][head_dim + 1]
  float* staged = scratch + (group * (head_dim + 1) + 3) / 4 * 4;
  for (int i = threadIdx.x; i < group * head_dim; i += kThreads) {
    q[(i / head_dim) * (head_dim + 1) + i % head_dim] =
        gpu::load_as_float(a.queries, a.query_dtype, int64_t{kv * group} * head_dim + i);
  }
  const int share = (entries + p.blocks - 1) / p.blocks;
  const int e_begin = min(entries, static_cast<int>(blockIdx.x) * share);
  const int e_end = min(entries, e_begin + share);
  const int chunk = kStagedFloats / dsub;  // entries staged at a time
  for (int c0 = e_begin; c0 < e_end; c0 += chunk) {
    const int rows = min(chunk, e_end - c0);
    const float* src = a.centroids + (int64_t{kv} * entries + c0) * dsub;
    __syncthreads();  // the queries are written, the previous chunk read
    constexpr int kInFlight = kStagedFloats / kThreads;
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int i = u * kThreads + threadIdx.x;
      if (i < rows * dsub) staged[(i / dsub) * row + i % dsub] = __ldg(src + i);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < rows * kGroupPad; t += kThreads) {
      const int e = c0 + t / kGroupPad;
      const int g = t % kGroupPad;
      float dot = 0.0f;
      if (g < group) {
        const float* x = q + g * (head_dim + 1) + (e / a.ksub) * dsub;
        const float* y = staged + (t / kGroupPad) * row;
#pragma unroll 8
        for (int d = 0; d < dsub; ++d)
          dot = __fadd_rn(dot, __fmul_rn(x[d], y[d]));
      }
      global_lut[e * kGroupPad + g] = dot;
    }
  }
  fused::kv_barrier(bar, p.blocks);
  // entries * kGroupPad is a multiple of 4 and both ends are 16-byte aligned.
  const float4* from = reinterpret_cast<const float4*>(global_lut);
  float4* to = reinterpret_cast<float4*>(lut);
  for (int i = threadIdx.x; i < entries * kGroupPad / 4; i += kThreads)
    to[i] = __ldcg(from + i);
  __syncthreads();
}

template <int kGroupPad, int kM>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    pq_fused_kernel(PqFusedArgs a, FusedSelect p, SearchWorkspaceView ws) {
  extern __shared__ float4 smem_raw[];
  float* lut = reinterpret_cast<float*>(smem_raw);
  float* raw = lut + lut_floats<kGroupPad>(kM, a.ksub);  // [group][capacity] raw scores

  // The range: the same in every block, so all of them return here or none.
  fused::BlockRange r;
  if (!fused::resolve_block_range(p, &r)) return;
  PQKV_STAMP(0);
  const int kv = blockIdx.y;
  const uint8_t* codes = a.codes + kv * a.head_stride + r.t0 * kM;
  const int n = r.n_local;

  // The first code rows are in flight while the LUTs are built.
  CodeRow<kM> rows[kScanUnroll];
#pragma unroll
  for (int u = 0; u < kScanUnroll; ++u) {
    const int i = u * kThreads + threadIdx.x;
    if (i < n) rows[u].load(codes + int64_t{i} * kM);
  }
  build_luts<kGroupPad, kM>(a, p, ws.lut + int64_t{kv} * kM * a.ksub * kGroupPad,
                            ws.fused_barrier + 2 * kv, lut, raw);
  PQKV_STAMP(1);

  // Raw scores, one thread a token, summed over the sub-spaces in order as
  // PqSource::scores does, and their extremes per head. Each trip first loads
  // the next kScanUnroll rows of the thread, then scores the ones loaded
  // before.
  float hi[kGroupPad];
  float lo[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    hi[g] = -INFINITY;
    lo[g] = INFINITY;
  }
  for (int from = 0; from < n; from += kScanUnroll * kThreads) {
    CodeRow<kM> next[kScanUnroll];
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      const int i = from + (kScanUnroll + u) * kThreads + threadIdx.x;
      if (i < n) next[u].load(codes + int64_t{i} * kM);
    }
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      const int i = from + u * kThreads + threadIdx.x;
      if (i >= n) break;
      float s[kGroupPad];
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g)
        s[g] = 0.0f;
#pragma unroll
      for (int j = 0; j < kM; ++j) {
        const float4* e =
            reinterpret_cast<const float4*>(lut + (j * a.ksub + rows[u].code(j)) * kGroupPad);
#pragma unroll
        for (int g4 = 0; g4 < kGroupPad / 4; ++g4) {
          const float4 v = e[g4];
          s[4 * g4 + 0] += v.x;
          s[4 * g4 + 1] += v.y;
          s[4 * g4 + 2] += v.z;
          s[4 * g4 + 3] += v.w;
        }
      }
#pragma unroll
      for (int g = 0; g < kGroupPad; ++g) {
        if (g < p.group) raw[g * p.capacity + i] = s[g];
        hi[g] = fmaxf(hi[g], s[g]);
        lo[g] = fminf(lo[g], s[g]);
      }
    }
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u)
      rows[u] = next[u];
  }
  __syncthreads();
  float bias[kGroupPad];
  float unscale[kGroupPad];
#pragma unroll
  for (int g = 0; g < kGroupPad; ++g) {
    bias[g] = 0.0f;
    unscale[g] = 1.0f;
  }
  fused::finish_search<kGroupPad>(p, r, ws, raw, bias, unscale, hi, lo);
}

// Sub-space counts the persistent kernel is built for (code rows of one load).
bool m_supported(int m) {
  return m == 2 || m == 4 || m == 8 || m == 16;
}

// Runs f.template operator()<kGroupPad, kM>() for the shape (m_supported(m)).
template <class F>
Status dispatch(int m, int group, F&& f) {
  const auto pad = [&]<int kM>() -> Status {
    if (group <= 4) return f.template operator()<4, kM>();
    return f.template operator()<8, kM>();
  };
  switch (m) {
    case 2:
      return pad.template operator()<2>();
    case 4:
      return pad.template operator()<4>();
    case 8:
      return pad.template operator()<8>();
    case 16:
      return pad.template operator()<16>();
    default:
      return Status::invalid_argument("the persistent PQ search takes m of 2, 4, 8 or 16, got " +
                                      std::to_string(m));
  }
}

// Blocks per KV head the persistent kernel launches for this search, 0 if none.
int blocks_per_head(const PqSearchArgs& a, const SearchWorkspaceView& ws) {
  const SearchShape& s = a.shape;
  if (a.codes == nullptr || s.kv_heads < 1 || s.q_heads % s.kv_heads != 0) return 0;
  const int group = s.q_heads / s.kv_heads;
  if (group < 1 || group > kMaxGroup || s.m < 1 || s.head_dim % s.m != 0) return 0;
  if (s.ksub < 1 || s.ksub > 256) return 0;
  const int per_sm = ws.pq_fused_blocks_per_sm[group <= 4 ? 0 : 1];
  const int blocks = std::min(per_sm * ws.sm_count / s.kv_heads, kMaxScanBlocks);
  if (blocks < 1) return 0;
  if (!m_supported(s.m) || s.head_dim / s.m > kStagedFloats) return 0;
  const int capacity =
      group <= 4 ? capacity_of<4>(s.m, s.ksub, group) : capacity_of<8>(s.m, s.ksub, group);
  const int64_t chunk = fused::fused_chunk(a.request.end - a.request.begin, blocks);
  // The raw scores' room first holds build_luts' scratch.
  const int64_t room = int64_t{capacity} * group;
  const int64_t scratch = lut_scratch_floats(group, s.head_dim, s.head_dim / s.m);
  return room >= scratch && chunk <= capacity ? blocks : 0;
}

}  // namespace

bool pq_fused_covers(const PqSearchArgs& args, const SearchWorkspaceView& ws) {
  return ws.fused_hist != nullptr && blocks_per_head(args, ws) > 0;
}

Status launch_pq_fused_search(const PqSearchArgs& a, const SearchWorkspaceView& ws,
                              cudaStream_t stream) {
  const int blocks = ws.fused_hist != nullptr ? blocks_per_head(a, ws) : 0;
  if (blocks == 0) {
    return Status::invalid_argument(
        "the persistent PQ search does not cover this shape or range (m=" +
        std::to_string(a.shape.m) + ", ksub " + std::to_string(a.shape.ksub) + ", " +
        std::to_string(a.request.end - a.request.begin) +
        " tokens, uint8 codes needed): call launch_pq_search, which falls back to the "
        "multi-kernel search");
  }
  const SelectRequest& r = a.request;
  if (r.k == 0 || r.end <= r.begin) return ok_status();
  PQKV_STAMP_REPORT();
  const int group = a.shape.q_heads / a.shape.kv_heads;
  return dispatch(a.shape.m, group, [&]<int kGroupPad, int kM>() -> Status {
    const FusedSelect p = make_fused_select(
        r, blocks, capacity_of<kGroupPad>(kM, a.shape.ksub, group), group, a.shape.head_dim);
    const PqFusedArgs args{a.queries,     a.query_dtype,    a.centroids, a.codes,
                           a.head_stride, a.shape.head_dim, a.shape.ksub};
    return launch_cooperative(pq_fused_kernel<kGroupPad, kM>, blocks, a.shape.kv_heads, kSmemBytes,
                              stream, args, p, ws);
  });
}

Status pq_fused_occupancies(int* out) {
  out[0] = out[1] = kBlocksPerSm;
  for (int group : {4, 8}) {
    for (int m : {2, 4, 8, 16}) {
      PQKV_RETURN_IF_ERROR(dispatch(m, group, [&]<int kGroupPad, int kM>() -> Status {
        int blocks = 0;
        PQKV_RETURN_IF_ERROR(cooperative_occupancy(pq_fused_kernel<kGroupPad, kM>, kSmemBytes,
                                                   kBlocksPerSm, &blocks));
        int& slot = out[kGroupPad == 4 ? 0 : 1];
        slot = std::min(slot, blocks);
        return ok_status();
      }));
    }
  }
  return ok_status();
}

}  // namespace pqkv::index::cuda
