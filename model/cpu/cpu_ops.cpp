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

// Rows of a non-fp32 weight converted per block: the checkpoint stays mapped
// and is never copied whole.
constexpr int64_t kConvertRows = 64;

}  // namespace

void linear(const float* x, int64_t tokens, const WeightTensor& w, const WeightTensor* bias,
            float* y) {
  const int64_t out = w.shape[0];
  const int64_t in = w.shape[1];
  const bool direct =
      w.dtype == DType::kF32 && reinterpret_cast<uintptr_t>(w.data) % alignof(float) == 0;
  if (direct) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens),
                static_cast<int>(out), static_cast<int>(in), 1.0f, x, static_cast<int>(in),
                static_cast<const float*>(w.data), static_cast<int>(in), 0.0f, y,
                static_cast<int>(out));
  } else {
    const int64_t blocks = (out + kConvertRows - 1) / kConvertRows;
    tbb::parallel_for(int64_t{0}, blocks, [&](int64_t b) {
      const int64_t r0 = b * kConvertRows;
      const int64_t rows = std::min(kConvertRows, out - r0);
      std::vector<float> buf(rows * in);
      for (int64_t i = 0; i < rows * in; ++i)
        buf[i] = w.at(r0 * in + i);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens),
                  static_cast<int>(rows), static_cast<int>(in), 1.0f, x, static_cast<int>(in),
                  buf.data(), static_cast<int>(in), 0.0f, y + r0, static_cast<int>(out));
    });
  }
  if (bias != nullptr) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t o = 0; o < out; ++o)
        y[t * out + o] += bias->at(o);
    }
  }
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
  const int64_t row = static_cast<int64_t>(a.kv_heads) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t items = a.tokens * a.q_heads;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, items, 1), [&](const auto& range) {
    std::vector<float> scores;
    std::vector<float> acc(d);
    for (int64_t item = range.begin(); item < range.end(); ++item) {
      const int64_t t = item / a.q_heads;
      const int h = static_cast<int>(item % a.q_heads);
      const int kvh = h / group;
      const float* q = a.q + item * d;
      const int64_t n = a.past + t + 1;
      scores.resize(n);
      const auto key = [&](int64_t j) {
        return j < a.past ? a.past_k + j * row + kvh * d : a.new_k + (j - a.past) * row + kvh * d;
      };
      const auto value = [&](int64_t j) {
        return j < a.past ? a.past_v + j * row + kvh * d : a.new_v + (j - a.past) * row + kvh * d;
      };
      float max_s = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const float* k = key(j);
        float s = 0;
        for (int i = 0; i < d; ++i)
          s += q[i] * k[i];
        s *= scale;
        scores[j] = s;
        max_s = std::max(max_s, s);
      }
      float sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        scores[j] = std::exp(scores[j] - max_s);
        sum += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = value(j);
        const float p = scores[j];
        for (int i = 0; i < d; ++i)
          acc[i] += p * v[i];
      }
      float* o = a.out + item * d;
      const float inv = 1.0f / sum;
      for (int i = 0; i < d; ++i)
        o[i] = acc[i] * inv;
    }
  });
}

}  // namespace pqkv::model::cpu
