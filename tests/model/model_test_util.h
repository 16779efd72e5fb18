// Helpers of the model tests: random Llama-family checkpoints written to a
// temporary folder, and an independent double-precision reference forward.
#pragma once

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "model/llama_model.h"
#include "model/random_checkpoint.h"
#include "model/safetensors.h"
#include "pqkv/dtype.h"
#include "test_util.h"

namespace pqkv::model::testing {

// A fresh temporary folder, removed with the object.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            ("pqkv_model_" + std::string(info ? info->name() : "test") + "_" +
             std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

struct TensorData {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// Writes `tensors` as one safetensors file in `dtype`.
inline void write_safetensors(const std::filesystem::path& path,
                              const std::vector<TensorData>& tensors, DType dtype) {
  std::vector<model::SafetensorsEntry> entries;
  for (const auto& t : tensors)
    entries.push_back({t.name, t.shape});
  const Status s =
      model::write_safetensors(path, entries, dtype, [&](size_t i) { return tensors[i].values; });
  PQKV_ASSERT_OK(s);
}

// A random model's shape; the library writes such checkpoints for benchmarks too.
using TinyShape = model::RandomCheckpoint;

inline nlohmann::json tiny_config(const TinyShape& s) {
  return nlohmann::json::parse(model::random_checkpoint_config_json(s));
}

// The tensors of a random model of shape `s` (values as fp32).
inline std::vector<TensorData> tiny_tensors(const TinyShape& s) {
  std::vector<TensorData> out;
  const auto specs = model::random_checkpoint_tensors(s);
  for (size_t i = 0; i < specs.size(); ++i) {
    out.push_back({specs[i].name, specs[i].shape, model::random_tensor_values(s, specs[i], i)});
  }
  return out;
}

// Writes config.json and the weights of a random model into `dir`.
inline void write_tiny_model(const std::filesystem::path& dir, const TinyShape& s) {
  const Status st = model::write_random_checkpoint(dir, s);
  PQKV_ASSERT_OK(st);
}

// Logits [T, vocab] for every position of `ids`, computed in double from the
// loaded weights with its own RoPE (Llama 3 scaling included), written
// independently of the runtime.
inline std::vector<double> reference_logits(const LlamaModel& model,
                                            const std::vector<int32_t>& ids) {
  const LlamaConfig& c = model.config();
  const LlamaWeights& w = model.weights();
  const int64_t T = static_cast<int64_t>(ids.size());
  const int H = c.hidden_size;
  const int d = c.head_dim;
  const int hq = c.num_q_heads;
  const int hkv = c.num_kv_heads;
  const auto matvec = [](const WeightTensor& m, const WeightTensor* b,
                         const std::vector<double>& x) {
    const int64_t rows = m.shape[0];
    const int64_t cols = m.shape[1];
    std::vector<double> y(rows);
    for (int64_t r = 0; r < rows; ++r) {
      double s = b ? b->at(r) : 0.0;
      for (int64_t k = 0; k < cols; ++k)
        s += double(m.at(r * cols + k)) * x[k];
      y[r] = s;
    }
    return y;
  };
  const auto norm = [&](const std::vector<double>& x, const WeightTensor& g) {
    double ss = 0;
    for (double v : x)
      ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + c.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i)
      y[i] = x[i] * inv * g.at(i);
    return y;
  };
  std::vector<double> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) {
    double f = std::pow(c.rope_theta, -2.0 * i / d);
    const auto& rs = c.rope_scaling;
    if (rs.type == RopeScaling::Type::kLinear) f /= rs.factor;
    if (rs.type == RopeScaling::Type::kLlama3) {
      const double wl = 2 * std::numbers::pi / f;
      const double lo = rs.original_max_position_embeddings / rs.low_freq_factor;
      const double hi = rs.original_max_position_embeddings / rs.high_freq_factor;
      if (wl > lo) {
        f /= rs.factor;
      } else if (wl >= hi) {
        const double sm = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) /
                          (rs.high_freq_factor - rs.low_freq_factor);
        f = (1 - sm) * f / rs.factor + sm * f;
      }
    }
    inv_freq[i] = f;
  }
  const auto rope = [&](std::vector<double>& v, int heads, int64_t pos) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < d / 2; ++i) {
        const double a = v[h * d + i];
        const double b = v[h * d + i + d / 2];
        const double cs = std::cos(pos * inv_freq[i]);
        const double sn = std::sin(pos * inv_freq[i]);
        v[h * d + i] = a * cs - b * sn;
        v[h * d + i + d / 2] = b * cs + a * sn;
      }
    }
  };
  std::vector<std::vector<double>> x(T, std::vector<double>(H));
  for (int64_t t = 0; t < T; ++t) {
    for (int i = 0; i < H; ++i)
      x[t][i] = w.embed->at(int64_t{ids[t]} * H + i);
  }
  for (const LayerWeights& lw : w.layers) {
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      const auto xn = norm(x[t], *lw.input_norm);
      q[t] = matvec(*lw.q_proj, lw.q_bias, xn);
      k[t] = matvec(*lw.k_proj, lw.k_bias, xn);
      v[t] = matvec(*lw.v_proj, lw.v_bias, xn);
      rope(q[t], hq, t);
      rope(k[t], hkv, t);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> att(int64_t{hq} * d, 0.0);
      for (int h = 0; h < hq; ++h) {
        const int g = h / (hq / hkv);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int i = 0; i < d; ++i)
            dot += q[t][h * d + i] * k[j][g * d + i];
          s[j] = dot / std::sqrt(double(d));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& e : s)
          sum += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j) {
          for (int i = 0; i < d; ++i)
            att[h * d + i] += s[j] / sum * v[j][g * d + i];
        }
      }
      const auto o = matvec(*lw.o_proj, lw.o_bias, att);
      for (int i = 0; i < H; ++i)
        x[t][i] += o[i];
      const auto xn = norm(x[t], *lw.post_norm);
      auto gate = matvec(*lw.gate_proj, lw.gate_bias, xn);
      const auto up = matvec(*lw.up_proj, lw.up_bias, xn);
      for (size_t i = 0; i < gate.size(); ++i)
        gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
      const auto down = matvec(*lw.down_proj, lw.down_bias, gate);
      for (int i = 0; i < H; ++i)
        x[t][i] += down[i];
    }
  }
  std::vector<double> logits;
  for (int64_t t = 0; t < T; ++t) {
    const auto y = matvec(*w.lm_head, nullptr, norm(x[t], *w.final_norm));
    logits.insert(logits.end(), y.begin(), y.end());
  }
  return logits;
}

}  // namespace pqkv::model::testing
