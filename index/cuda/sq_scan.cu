#include "index/cuda/sq_scan.cuh"

#include <algorithm>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_dtype.cuh"
#include "index/key_range.h"

namespace pqkv::index::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = kSqMaxHeadDim;
// Fitting: a block covers 32 channels of one KV head, its warps taking rows
// in turn.
constexpr int kFitChannels = 32;
constexpr int kFitWarps = 8;

__device__ __forceinline__ uint8_t quantize(float x, float scale, float offset, int levels) {
  const float q = rintf((x - offset) / scale);
  return static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), static_cast<float>(levels)));
}

// blockIdx.x: KV head; blockIdx.y: a slice of kFitChannels channels.
__global__ void __launch_bounds__(kFitChannels* kFitWarps) sq_fit_kernel(SqFitArgs a) {
  __shared__ float lo_part[kFitWarps][kFitChannels];
  __shared__ float hi_part[kFitWarps][kFitChannels];
  const int head = blockIdx.x;
  const int lane = threadIdx.x % kFitChannels;
  const int warp = threadIdx.x / kFitChannels;
  const int c = blockIdx.y * kFitChannels + lane;
  const int d = a.geo.head_dim;
  float lo = INFINITY;
  float hi = -INFINITY;
  if (c < d) {
    for (int64_t row = warp; row < a.n; row += kFitWarps) {
      const float x =
          gpu::load_as_float(a.keys, a.dtype, (row * a.geo.kv_heads + head) * int64_t{d} + c);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
  }
  lo_part[warp][lane] = lo;
  hi_part[warp][lane] = hi;
  __syncthreads();
  if (warp != 0 || c >= d) return;
  for (int w = 1; w < kFitWarps; ++w) {
    lo = fminf(lo, lo_part[w][lane]);
    hi = fmaxf(hi, hi_part[w][lane]);
  }
  const float range = hi - lo;
  if (!isfinite(range) && a.report != nullptr && atomicCAS(&a.report->found, 0, 1) == 0) {
    a.report->pq = 0;
    a.report->kv_head = head;
    a.report->channel = c;
    a.report->lo = lo;
    a.report->hi = hi;
    __threadfence_system();
  }
  const float levels = static_cast<float>((1 << a.geo.bits) - 1);
  // A constant channel decodes exactly with any scale: keep 1, as the CPU codec.
  a.scale[int64_t{head} * d + c] = range > 0 ? __fdiv_rn(range, levels) : 1.0f;
  a.offset[int64_t{head} * d + c] = lo;
}

__global__ void __launch_bounds__(kThreads) sq_encode_kernel(SqEncodeArgs a) {
  if (a.first_position != nullptr) {
    a.first_token += *a.first_position;
    // Rows past the reserved codes are dropped (the owner reports the overflow).
    a.n = min(a.n, max(int64_t{0}, a.max_tokens - a.first_token));
  }
  if (a.geo.bits == kExactBits) {
    // One thread per channel: the key as fp32.
    const int d = a.geo.head_dim;
    const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    if (i >= a.n * a.geo.kv_heads * d) return;
    const int c = static_cast<int>(i % d);
    const int head = static_cast<int>((i / d) % a.geo.kv_heads);
    const int64_t row = i / (int64_t{d} * a.geo.kv_heads);
    float* out = reinterpret_cast<float*>(a.codes + head * a.head_stride +
                                          (a.first_token + row) * a.geo.code_size());
    out[c] = gpu::load_as_float(a.keys, a.dtype, i);
    return;
  }
  const int size = a.geo.code_size();
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= a.n * a.geo.kv_heads * size) return;
  const int byte = static_cast<int>(i % size);
  const int head = static_cast<int>((i / size) % a.geo.kv_heads);
  const int64_t row = i / (int64_t{size} * a.geo.kv_heads);
  const int levels = (1 << a.geo.bits) - 1;
  const int64_t key = (row * a.geo.kv_heads + head) * a.geo.head_dim;
  const float* scale = a.scale + int64_t{head} * a.geo.head_dim;
  const float* offset = a.offset + int64_t{head} * a.geo.head_dim;
  uint8_t code = 0;
  if (a.geo.bits == 8) {
    code = quantize(gpu::load_as_float(a.keys, a.dtype, key + byte), scale[byte], offset[byte],
                    levels);
  } else {
    const int c = 2 * byte;
    const uint8_t lo =
        quantize(gpu::load_as_float(a.keys, a.dtype, key + c), scale[c], offset[c], levels);
    const uint8_t hi = quantize(gpu::load_as_float(a.keys, a.dtype, key + c + 1), scale[c + 1],
                                offset[c + 1], levels);
    code = static_cast<uint8_t>(lo | (hi << 4));
  }
  a.codes[head * a.head_stride + (a.first_token + row) * size + byte] = code;
}

// One block per query head; the offset term summed in channel order and
// unfused, as the CPU reference does. The products are made in parallel and
// summed from shared memory: a serial loop over global loads would take
// tens of microseconds.
__global__ void sq_tables_kernel(SqTablesArgs a) {
  __shared__ float products[kMaxHeadDim];
  const int h = blockIdx.x;
  const int kv = h / (a.q_heads / a.geo.kv_heads);
  const int d = a.geo.head_dim;
  const int64_t q = int64_t{h} * d;
  float* table = a.tables + int64_t{h} * (d + 1);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float x = gpu::load_as_float(a.queries, a.query_dtype, q + c);
    table[c] = a.scale == nullptr ? x : __fmul_rn(x, a.scale[int64_t{kv} * d + c]);
    products[c] = a.offset == nullptr ? 0.0f : __fmul_rn(x, a.offset[int64_t{kv} * d + c]);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bias = 0.0f;
    if (a.offset != nullptr) {
      for (int c = 0; c < d; ++c)
        bias = __fadd_rn(bias, products[c]);
    }
    table[d] = bias;
  }
}

// grid.y walks the query heads; a block stages its table in shared memory.
__global__ void __launch_bounds__(kThreads) sq_scan_kernel(SqScanArgs a) {
  __shared__ float table[kMaxHeadDim + 1];
  const int h = blockIdx.y;
  const int kv = h / (a.q_heads / a.geo.kv_heads);
  const int d = a.geo.head_dim;
  for (int c = threadIdx.x; c <= d; c += blockDim.x)
    table[c] = a.tables[int64_t{h} * (d + 1) + c];
  __syncthreads();
  const int64_t t = a.begin + int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (t >= a.end) return;
  const uint8_t* code = a.codes + kv * a.head_stride + t * a.geo.code_size();
  float dot = 0.0f;
  if (a.geo.bits == 8) {
    for (int c = 0; c < d; ++c)
      dot += table[c] * static_cast<float>(code[c]);
  } else {
    for (int i = 0; i < d / 2; ++i) {
      const uint8_t b = code[i];
      dot +=
          table[2 * i] * static_cast<float>(b & 15) + table[2 * i + 1] * static_cast<float>(b >> 4);
    }
  }
  a.scores[int64_t{h} * (a.end - a.begin) + (t - a.begin)] = table[d] + dot;
}

}  // namespace

Status check_sq_geometry(const SqGeometry& g) {
  const bool bits_ok = g.bits == 8 || g.bits == 4 || g.bits == kExactBits;
  if (g.kv_heads < 1 || g.head_dim < 1 || g.head_dim > kMaxHeadDim || !bits_ok ||
      (g.bits == 4 && g.head_dim % 2 != 0)) {
    return Status::invalid_argument(
        "scalar-quantized keys need kv_heads >= 1, head_dim 1.." + std::to_string(kMaxHeadDim) +
        " (even for int4) and 8, 4 or 32 (exact) bits, got kv_heads " + std::to_string(g.kv_heads) +
        ", head_dim " + std::to_string(g.head_dim) + ", bits " + std::to_string(g.bits));
  }
  return ok_status();
}

// Each KV head's largest |key| into largest[kv] (as float bits: non-negative
// floats order as their bits), grid-stride.
__global__ void key_magnitude_kernel(const void* keys, DType dtype, int64_t n, int kv_heads,
                                     int head_dim, uint32_t* largest) {
  const int64_t per_token = int64_t{kv_heads} * head_dim;
  const int64_t total = n * per_token;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float x = fabsf(gpu::load_as_float(keys, dtype, i));
    const int kv = static_cast<int>((i % per_token) / head_dim);
    if (x > 0.0f) atomicMax(&largest[kv], __float_as_uint(x));
  }
}

__global__ void key_range_verdict_kernel(const uint32_t* largest, int kv_heads,
                                         KeyFitReport* report) {
  for (int kv = 0; kv < kv_heads; ++kv) {
    const float x = __uint_as_float(largest[kv]);
    if ((x > kPqLargestKey || (x > 0.0f && x < kPqSmallestKey)) && report->found == 0) {
      report->found = 1;
      report->pq = 1;
      report->kv_head = kv;
      report->largest = x;
      __threadfence_system();
      return;
    }
  }
}

Status launch_pq_key_range(const void* keys, DType dtype, int64_t n, int kv_heads, int head_dim,
                           uint32_t* scratch, KeyFitReport* report, cudaStream_t stream) {
  if (n < 1) return ok_status();
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scratch, 0, sizeof(uint32_t) * kv_heads, stream));
  const int64_t total = n * kv_heads * head_dim;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 1024));
  key_magnitude_kernel<<<blocks, 256, 0, stream>>>(keys, dtype, n, kv_heads, head_dim, scratch);
  PQKV_CUDA_CHECK_LAUNCH();
  key_range_verdict_kernel<<<1, 1, 0, stream>>>(scratch, kv_heads, report);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_sq_fit(const SqFitArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(check_sq_geometry(args.geo));
  if (args.geo.bits == kExactBits) {
    return Status::invalid_argument("exact keys have no scales to fit");
  }
  if (args.n < 1) {
    return Status::invalid_argument("fitting scales needs at least one key, got none");
  }
  const dim3 grid(static_cast<unsigned>(args.geo.kv_heads),
                  static_cast<unsigned>((args.geo.head_dim + kFitChannels - 1) / kFitChannels));
  sq_fit_kernel<<<grid, kFitChannels * kFitWarps, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_sq_encode(const SqEncodeArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(check_sq_geometry(args.geo));
  if (args.n == 0) return ok_status();
  const int units = args.geo.bits == kExactBits ? args.geo.head_dim : args.geo.code_size();
  const int64_t threads = args.n * args.geo.kv_heads * units;
  const auto blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  sq_encode_kernel<<<blocks, kThreads, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_sq_tables(const SqTablesArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(check_sq_geometry(args.geo));
  if (args.q_heads < 1 || args.q_heads % args.geo.kv_heads != 0) {
    return Status::invalid_argument("tables need q_heads a positive multiple of the " +
                                    std::to_string(args.geo.kv_heads) + " KV heads, got " +
                                    std::to_string(args.q_heads));
  }
  if ((args.scale == nullptr) != (args.geo.bits == kExactBits) ||
      (args.offset == nullptr) != (args.geo.bits == kExactBits)) {
    return Status::invalid_argument(
        "scalar-quantized keys need scales and offsets; exact keys take none");
  }
  sq_tables_kernel<<<args.q_heads, 64, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Status launch_sq_scan(const SqScanArgs& args, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(check_sq_geometry(args.geo));
  if (args.geo.bits == kExactBits) {
    return Status::invalid_argument("launch_sq_scan scores int8 or int4 codes");
  }
  if (args.q_heads < 1 || args.q_heads % args.geo.kv_heads != 0) {
    return Status::invalid_argument("scan needs q_heads a positive multiple of the " +
                                    std::to_string(args.geo.kv_heads) + " KV heads, got " +
                                    std::to_string(args.q_heads));
  }
  if (args.begin < 0 || args.end < args.begin) {
    return Status::invalid_argument("scan range [" + std::to_string(args.begin) + ", " +
                                    std::to_string(args.end) + ") is empty or negative");
  }
  SqTablesArgs tables;
  tables.geo = args.geo;
  tables.q_heads = args.q_heads;
  tables.queries = args.queries;
  tables.scale = args.scale;
  tables.offset = args.offset;
  tables.tables = args.tables;
  PQKV_RETURN_IF_ERROR(launch_sq_tables(tables, stream));
  if (args.end == args.begin) return ok_status();
  const dim3 grid(static_cast<unsigned>((args.end - args.begin + kThreads - 1) / kThreads),
                  static_cast<unsigned>(args.q_heads));
  sq_scan_kernel<<<grid, kThreads, 0, stream>>>(args);
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

}  // namespace pqkv::index::cuda
