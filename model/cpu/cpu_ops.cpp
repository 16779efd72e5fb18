#include "model/cpu/cpu_ops.h"

#include <cblas.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pqkv::model::cpu {
namespace {

// Output rows per matrix-product work item. Non-fp32 weights are converted
// block by block: the checkpoint stays mapped and is never copied whole.
constexpr int64_t kLinearRows = 64;
// Queries per attention work item.
constexpr int64_t kAttentionBlock = 64;

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
  // Per (query head, block of queries): scores S = Q K^T and output P V as
  // matrix products over strided rows of the past and new segments, so that
  // long prefills run at BLAS speed.
  const int d = a.head_dim;
  const int group = a.q_heads / a.kv_heads;
  const int kv_row = a.kv_heads * d;
  const int q_row = a.q_heads * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t blocks = (a.tokens + kAttentionBlock - 1) / kAttentionBlock;
  tbb::parallel_for(int64_t{0}, blocks * a.q_heads, [&](int64_t item) {
    const int h = static_cast<int>(item % a.q_heads);
    const int64_t t0 = (item / a.q_heads) * kAttentionBlock;
    const auto rows = static_cast<int>(std::min(kAttentionBlock, a.tokens - t0));
    const int g = h / group;
    const auto past = static_cast<int>(a.past);
    const auto n = static_cast<int>(a.past + t0 + rows);  // keys the last row sees
    const float* q = a.q + t0 * q_row + h * d;
    std::vector<float> s(static_cast<size_t>(rows) * n);
    if (past > 0) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, past, d, scale, q, q_row,
                  a.past_k + g * d, kv_row, 0.0f, s.data(), n);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n - past, d, scale, q, q_row,
                a.new_k + g * d, kv_row, 0.0f, s.data() + past, n);
    for (int r = 0; r < rows; ++r) {
      float* row = s.data() + static_cast<size_t>(r) * n;
      const int visible = past + static_cast<int>(t0) + r + 1;
      const float max_s = *std::max_element(row, row + visible);
      float sum = 0;
      for (int j = 0; j < visible; ++j)
        sum += (row[j] = std::exp(row[j] - max_s));
      const float inv = 1.0f / sum;
      for (int j = 0; j < visible; ++j)
        row[j] *= inv;
      std::fill(row + visible, row + n, 0.0f);
    }
    float* out = a.out + t0 * q_row + h * d;
    if (past > 0) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, past, 1.0f, s.data(), n,
                  a.past_v + g * d, kv_row, 0.0f, out, q_row);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, n - past, 1.0f, s.data() + past,
                n, a.new_v + g * d, kv_row, past > 0 ? 1.0f : 0.0f, out, q_row);
  });
}

}  // namespace pqkv::model::cpu
