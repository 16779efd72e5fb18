#include "model/cpu/cpu_ops.h"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pqkv::model::cpu {
namespace {

// Output rows per matrix-product work item. Non-fp32 weights are converted
// block by block: the checkpoint stays mapped and is never copied whole.
constexpr int64_t kLinearRows = 64;
// Query rows (tokens x query heads of a GQA group) per attention work item,
// and keys per tile: the score tile of a work item, 128 x 256 fp32, stays in
// the core's L2 cache with the packed queries and the output accumulator.
constexpr int64_t kAttentionRows = 128;
constexpr int64_t kKeyTile = 256;

// Eight floats in a GCC vector: SSE2 code in two halves by default, one AVX2
// register in the x86-64-v3 clone (AVX2 and FMA), picked at load time.
using Float8 = float __attribute__((vector_size(32)));
using Int8 = int32_t __attribute__((vector_size(32)));

// exp(x) in place for x <= 0 (a score minus its row maximum), within 1e-5
// relative:
// 2^(x log2 e) split into an integer power, built in the exponent bits, and
// 2^f, |f| <= 1/2, by its Taylor series to degree 7. Inputs below -87 give
// exp(-87) ~ 2e-38 (no subnormals).
inline void exp_nonpositive(Float8& x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.0f ? Float8{} - 87.0f : x;
  const Float8 t = x * kLog2e;
  const Float8 n = (t + kRound) - kRound;
  const Float8 f = t - n;
  Float8 p = Float8{} + 1.5252733804059840e-5f;
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const Int8 bits = (__builtin_convertvector(n, Int8) + 127) << 23;
  x = p * (Float8)bits;
}

// One score row of a tile: the online-softmax step over its `visible` first
// entries (the rest is masked). Returns the row's new maximum; writes
// exp(s - max) over the visible scores, zeros over the rest, and the sum of
// the exponentials to `sum`.
__attribute__((target_clones("arch=x86-64-v3", "default"))) float softmax_row(float* row,
                                                                              int visible, int kb,
                                                                              float running_max,
                                                                              float* sum) {
  Float8 vmax = Float8{} + running_max;
  int j = 0;
  for (; j + 8 <= visible; j += 8) {
    Float8 v;
    std::memcpy(&v, row + j, sizeof v);
    vmax = v > vmax ? v : vmax;
  }
  float tile_max = running_max;
  for (int i = 0; i < 8; ++i)
    tile_max = std::max(tile_max, vmax[i]);
  for (; j < visible; ++j)
    tile_max = std::max(tile_max, row[j]);
  Float8 vsum{};
  for (j = 0; j + 8 <= visible; j += 8) {
    Float8 v;
    std::memcpy(&v, row + j, sizeof v);
    v -= tile_max;
    exp_nonpositive(v);
    std::memcpy(row + j, &v, sizeof v);
    vsum += v;
  }
  float total = 0.0f;
  for (int i = 0; i < 8; ++i)
    total += vsum[i];
  if (j < visible) {
    // The tail, padded with -inf so that it adds nothing.
    Float8 v = Float8{} - INFINITY;
    std::memcpy(&v, row + j, sizeof(float) * (visible - j));
    v -= tile_max;
    exp_nonpositive(v);
    for (int i = 0; i < visible - j; ++i) {
      row[j + i] = v[i];
      total += v[i];
    }
  }
  std::fill(row + visible, row + kb, 0.0f);
  *sum = total;
  return tile_max;
}

}  // namespace

void linear(const float* x, int64_t tokens, const WeightTensor& w, const WeightTensor* bias,
            float* y) {
  const int64_t out = w.shape[0];
  const auto in = static_cast<int>(w.shape[1]);
  const bool direct =
      w.dtype == DType::kF32 && reinterpret_cast<uintptr_t>(w.data) % alignof(float) == 0;
  // TBB splits the output rows; each block is one single-threaded BLAS call
  // (see configure_cpu_blas), converted first where the weights are not fp32.
  const int64_t blocks = (out + kLinearRows - 1) / kLinearRows;
  tbb::parallel_for(int64_t{0}, blocks, [&](int64_t b) {
    const int64_t r0 = b * kLinearRows;
    const auto rows = static_cast<int>(std::min(kLinearRows, out - r0));
    const float* wb = static_cast<const float*>(w.data) + r0 * in;
    std::vector<float> buf;
    if (!direct) {
      buf.resize(static_cast<size_t>(rows) * in);
      convert_elements(w.data, w.dtype, r0 * in, int64_t{rows} * in, buf.data(), DType::kF32);
      wb = buf.data();
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens), rows, in, 1.0f,
                x, in, wb, in, 0.0f, y + r0, static_cast<int>(out));
  });
  if (bias != nullptr) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t o = 0; o < out; ++o)
        y[t * out + o] += bias->at(o);
    }
  }
}

void configure_cpu_blas() {
  openblas_set_num_threads(1);
}

void rms_norm(const float* x, int64_t tokens, int64_t n, const WeightTensor& weight, double eps,
              float* y) {
  tbb::parallel_for(int64_t{0}, tokens, [&](int64_t t) {
    const float* row = x + t * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i)
      ss += static_cast<double>(row[i]) * row[i];
    const auto inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    float* dst = y + t * n;
    for (int64_t i = 0; i < n; ++i)
      dst[i] = weight.at(i) * (row[i] * inv);
  });
}

void apply_rope(float* x, int64_t tokens, int heads, int head_dim, const float* cos,
                const float* sin) {
  const int half = head_dim / 2;
  tbb::parallel_for(int64_t{0}, tokens, [&](int64_t t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  });
}

void swiglu(float* gate, const float* up, int64_t n) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 4096), [&](const auto& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void embed(const int32_t* ids, int64_t tokens, const WeightTensor& table, float* out) {
  const int64_t hidden = table.shape[1];
  tbb::parallel_for(int64_t{0}, tokens, [&](int64_t t) {
    convert_to_float(
        static_cast<const uint8_t*>(table.data) + ids[t] * hidden * dtype_size(table.dtype),
        table.dtype, hidden, out + t * hidden);
  });
}

void causal_attention(const AttentionArgs& a) {
  const int d = a.head_dim;
  const int group = a.q_heads / a.kv_heads;
  const int64_t kv_row = int64_t{a.kv_heads} * d;
  const int64_t q_row = int64_t{a.q_heads} * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t block = std::max<int64_t>(1, kAttentionRows / group);  // tokens per work item
  const int64_t blocks = (a.tokens + block - 1) / block;
  const int64_t items = blocks * a.kv_heads;
  // One item per (KV head, query block); the late blocks see the longest
  // context, so they go first and the short ones fill in behind them.
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, items, 1),
      [&](const tbb::blocked_range<int64_t>& range) {
        for (int64_t item = range.begin(); item < range.end(); ++item) {
          const int g = static_cast<int>(item % a.kv_heads);
          const int64_t t0 = (blocks - 1 - item / a.kv_heads) * block;
          const int64_t nt = std::min(block, a.tokens - t0);
          const auto m = static_cast<int>(nt * group);
          // Row r = i * group + j is token t0 + i, query head g * group + j,
          // pre-scaled by 1/sqrt(d).
          std::vector<float> qs(static_cast<size_t>(m) * d);
          std::vector<float> o(static_cast<size_t>(m) * d, 0.0f);
          std::vector<float> s(static_cast<size_t>(m) * kKeyTile);
          std::vector<float> row_max(m, -INFINITY);
          std::vector<float> row_sum(m, 0.0f);
          for (int64_t i = 0; i < nt; ++i) {
            const float* src = a.q + (t0 + i) * q_row + int64_t{g} * group * d;
            float* dst = qs.data() + i * group * d;
            for (int64_t x = 0; x < int64_t{group} * d; ++x)
              dst[x] = src[x] * scale;
          }
          // One key tile [k0, k0 + kb) of the context, all in one segment.
          const auto tile = [&](const float* k, const float* v, int64_t k0, int kb) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, kb, d, 1.0f, qs.data(), d, k,
                        static_cast<int>(kv_row), 0.0f, s.data(), kb);
            for (int r = 0; r < m; ++r) {
              float* row = s.data() + static_cast<size_t>(r) * kb;
              const int64_t position = a.past + t0 + r / group;
              const int visible = static_cast<int>(std::clamp<int64_t>(position - k0 + 1, 0, kb));
              if (visible == 0) {
                std::fill(row, row + kb, 0.0f);
                continue;
              }
              float sum = 0.0f;
              const float new_max = softmax_row(row, visible, kb, row_max[r], &sum);
              const float correction = std::exp(row_max[r] - new_max);
              if (correction != 1.0f) {
                float* out_row = o.data() + static_cast<size_t>(r) * d;
                for (int x = 0; x < d; ++x)
                  out_row[x] *= correction;
              }
              row_sum[r] = row_sum[r] * correction + sum;
              row_max[r] = new_max;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, kb, 1.0f, s.data(), kb, v,
                        static_cast<int>(kv_row), 1.0f, o.data(), d);
          };
          const int64_t head = int64_t{g} * d;
          for (int64_t k0 = 0; k0 < a.past; k0 += kKeyTile) {
            const auto kb = static_cast<int>(std::min(kKeyTile, a.past - k0));
            tile(a.past_k + k0 * kv_row + head, a.past_v + k0 * kv_row + head, k0, kb);
          }
          const int64_t end = a.past + t0 + nt;  // context rows the block's last query sees
          for (int64_t k0 = a.past; k0 < end; k0 += kKeyTile) {
            const auto kb = static_cast<int>(std::min(kKeyTile, end - k0));
            const int64_t n = k0 - a.past;
            tile(a.new_k + n * kv_row + head, a.new_v + n * kv_row + head, k0, kb);
          }
          for (int r = 0; r < m; ++r) {
            const float inv = 1.0f / row_sum[r];
            const float* src = o.data() + static_cast<size_t>(r) * d;
            float* dst = a.out + (t0 + r / group) * q_row + (int64_t{g} * group + r % group) * d;
            for (int x = 0; x < d; ++x)
              dst[x] = src[x] * inv;
          }
        }
      },
      tbb::simple_partitioner());
}

void reference_attention_row(const AttentionArgs& a, int64_t t, int h, double* out) {
  const int d = a.head_dim;
  const int g = h / (a.q_heads / a.kv_heads);
  const int64_t kv_row = int64_t{a.kv_heads} * d;
  const int64_t n = a.past + t + 1;
  const float* q = a.q + (t * a.q_heads + h) * d;
  const auto row = [&](const float* past, const float* fresh, int64_t j) {
    return (j < a.past ? past + j * kv_row : fresh + (j - a.past) * kv_row) + int64_t{g} * d;
  };
  std::vector<double> p(n);
  double max_s = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = row(a.past_k, a.new_k, j);
    double dot = 0;
    for (int i = 0; i < d; ++i)
      dot += double(q[i]) * k[i];
    p[j] = dot / std::sqrt(double(d));
    max_s = std::max(max_s, p[j]);
  }
  double sum = 0;
  for (int64_t j = 0; j < n; ++j)
    sum += (p[j] = std::exp(p[j] - max_s));
  std::fill(out, out + d, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const float* v = row(a.past_v, a.new_v, j);
    for (int i = 0; i < d; ++i)
      out[i] += p[j] * v[i];
  }
  for (int i = 0; i < d; ++i)
    out[i] /= sum;
}

}  // namespace pqkv::model::cpu
