#include "attention/cpu/sparse_attention_cpu.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace pqkv::attention {
namespace {

using Clock = std::chrono::steady_clock;

double micros_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// Tokens per chunk: bounds the gathered rows to chunk * kv_heads * 2 * head_dim floats.
constexpr int64_t kChunk = 2048;

}  // namespace

Status sparse_attention_cpu(const storage::RowTableView& rows, int q_heads, const float* queries,
                            const int32_t* tokens, int64_t tokens_per_head, float* out,
                            AttentionTimings* timings, const std::byte* const* staged) {
  const int kv_heads = rows.kv_heads;
  const int group = q_heads / kv_heads;
  const int d = rows.head_dim;
  const DType dtype = rows.row_dtype;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t chunk = std::min(kChunk, std::max<int64_t>(tokens_per_head, 1));

  // Online softmax state per query head: running max, running sum, weighted
  // values. The weighted values add up in double: their sum reaches the
  // context length times the largest value, past fp32 for values near its
  // limit, while the average it becomes stays within the values' range.
  std::vector<float> run_max(q_heads, -std::numeric_limits<float>::infinity());
  std::vector<float> run_sum(q_heads, 0.0f);
  std::vector<double> acc(static_cast<size_t>(q_heads) * d, 0.0);
  std::vector<float> keys(static_cast<size_t>(kv_heads) * chunk * d);
  std::vector<float> values(keys.size());
  // Per query head, the first token whose score left fp32's range (-1: none).
  std::vector<int64_t> overflowed(q_heads, -1);
  double gather_us = 0;
  double attention_us = 0;

  for (int64_t c0 = 0; c0 < tokens_per_head; c0 += chunk) {
    const int64_t n = std::min(chunk, tokens_per_head - c0);
    auto t0 = Clock::now();
    tbb::parallel_for(0, kv_heads, [&](int h) {
      const int32_t* list = tokens + h * tokens_per_head + c0;
      const std::byte* const* from_ssd =
          staged != nullptr ? staged + h * tokens_per_head + c0 : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const std::byte* row =
            from_ssd != nullptr && from_ssd[i] != nullptr ? from_ssd[i] : rows.row(h, list[i]);
        const size_t off = (static_cast<size_t>(h) * chunk + i) * d;
        convert_to_float(row, dtype, d, keys.data() + off);
        convert_to_float(row + int64_t{d} * dtype_size(dtype), dtype, d, values.data() + off);
      }
    });
    gather_us += micros_since(t0);

    t0 = Clock::now();
    const auto list_of = [&](int h) { return tokens + h * tokens_per_head + c0; };
    tbb::parallel_for(0, q_heads, [&](int qh) {
      const int h = qh / group;
      const float* q = queries + static_cast<size_t>(qh) * d;
      const float* k = keys.data() + static_cast<size_t>(h) * chunk * d;
      const float* v = values.data() + static_cast<size_t>(h) * chunk * d;
      std::vector<float> p(n);
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        float s = 0;
        for (int c = 0; c < d; ++c)
          s += q[c] * k[i * d + c];
        p[i] = s * scale;
        if (!std::isfinite(p[i]) && overflowed[qh] < 0) overflowed[qh] = list_of(h)[i];
        chunk_max = std::max(chunk_max, p[i]);
      }
      const float new_max = std::max(run_max[qh], chunk_max);
      const float rescale = std::exp(run_max[qh] - new_max);
      double* a = acc.data() + static_cast<size_t>(qh) * d;
      for (int c = 0; c < d; ++c)
        a[c] *= rescale;
      float sum = run_sum[qh] * rescale;
      for (int64_t i = 0; i < n; ++i) {
        const float w = std::exp(p[i] - new_max);
        sum += w;
        for (int c = 0; c < d; ++c)
          a[c] += static_cast<double>(w) * v[i * d + c];
      }
      run_max[qh] = new_max;
      run_sum[qh] = sum;
    });
    attention_us += micros_since(t0);
  }

  if (timings != nullptr) {
    timings->gather_us = gather_us;
    timings->attention_us = attention_us;
  }
  for (int qh = 0; qh < q_heads; ++qh) {
    if (overflowed[qh] >= 0) {
      return Status::invalid_argument(
          "the attention score of query head " + std::to_string(qh) + " against token " +
          std::to_string(overflowed[qh]) +
          " passes fp32's range (q . k / sqrt(head_dim) beyond 3.4e38): queries and keys this "
          "large overflow attention; scale them down");
    }
  }
  for (int qh = 0; qh < q_heads; ++qh) {
    const double inv = run_sum[qh] > 0 ? 1.0 / run_sum[qh] : 0.0;
    for (int c = 0; c < d; ++c)
      out[qh * d + c] = static_cast<float>(acc[static_cast<size_t>(qh) * d + c] * inv);
  }
  return ok_status();
}

Status sparse_attention_cpu(const storage::KvRowStore& kv, int layer, const float* queries,
                            const int32_t* tokens, int64_t tokens_per_head, float* out,
                            AttentionTimings* timings) {
  return sparse_attention_cpu(kv.host_table(layer), kv.spec().num_q_heads, queries, tokens,
                              tokens_per_head, out, timings);
}

Status full_attention_cpu(const storage::KvRowStore& kv, int layer, const float* queries,
                          float* out) {
  const int64_t n = kv.length(layer);
  const int kv_heads = kv.spec().num_kv_heads;
  std::vector<int32_t> tokens(static_cast<size_t>(n) * kv_heads);
  for (int h = 0; h < kv_heads; ++h) {
    std::iota(tokens.begin() + h * n, tokens.begin() + (h + 1) * n, 0);
  }
  return sparse_attention_cpu(kv, layer, queries, tokens.data(), n, out, nullptr);
}

Status check_output_storable(const float* out, int64_t n, int head_dim, DType dtype) {
  const int64_t i = find_unstorable(out, DType::kF32, n, dtype);
  if (i < 0) return ok_status();
  return Status::invalid_argument(
      "the attention output of query head " + std::to_string(i / head_dim) + ", dim " +
      std::to_string(i % head_dim) + " is " + std::to_string(out[i]) + ", which overflows the " +
      dtype_name(dtype) + " output: pass an fp32 or bf16 output tensor");
}

}  // namespace pqkv::attention
