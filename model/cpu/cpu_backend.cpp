// The CPU ModelBackend: fp32 activations in host vectors, weights read in
// place from the mapped checkpoint.
#include <cstring>
#include <string>
#include <vector>

#include "model/backend.h"
#include "model/cpu/cpu_ops.h"
#include "model/rope.h"

namespace pqkv::model {
namespace {

class CpuBackend final : public ModelBackend {
 public:
  explicit CpuBackend(const LlamaModel& model)
      : model_(model),
        cfg_(model.config()),
        inv_freq_(rope_inv_freq(model.config())),
        k_cache_(cfg_.num_layers),
        v_cache_(cfg_.num_layers) {
    cpu::configure_cpu_blas();
  }

  Device device() const override { return Device::cpu(); }
  Stream stream() const override { return Stream::host(); }

  void reset() override {
    for (auto& c : k_cache_)
      c.clear();
    for (auto& c : v_cache_)
      c.clear();
    cached_ = 0;
  }

  Status begin_pass(std::span<const int32_t> tokens, int64_t start_position) override {
    PQKV_RETURN_IF_ERROR(check_pass(cfg_, tokens, start_position, cached_));
    tokens_ = static_cast<int64_t>(tokens.size());
    const int64_t hidden = cfg_.hidden_size;
    const int64_t q_dim = int64_t{cfg_.num_q_heads} * cfg_.head_dim;
    const int64_t kv_dim = int64_t{cfg_.num_kv_heads} * cfg_.head_dim;
    x_.resize(tokens_ * hidden);
    xn_.resize(tokens_ * hidden);
    q_.resize(tokens_ * q_dim);
    k_.resize(tokens_ * kv_dim);
    v_.resize(tokens_ * kv_dim);
    att_.resize(tokens_ * q_dim);
    gate_.resize(tokens_ * cfg_.intermediate_size);
    up_.resize(tokens_ * cfg_.intermediate_size);
    rope_tables(inv_freq_, start_position, tokens_, &cos_, &sin_);
    cpu::embed(tokens.data(), tokens_, *model_.weights().embed, x_.data());
    return ok_status();
  }

  Status project_qkv(int layer, QkvViews* out) override {
    const LayerWeights& w = model_.weights().layers[layer];
    cpu::rms_norm(x_.data(), tokens_, cfg_.hidden_size, *w.input_norm, cfg_.rms_norm_eps,
                  xn_.data());
    cpu::linear(xn_.data(), tokens_, *w.q_proj, w.q_bias, q_.data());
    cpu::linear(xn_.data(), tokens_, *w.k_proj, w.k_bias, k_.data());
    cpu::linear(xn_.data(), tokens_, *w.v_proj, w.v_bias, v_.data());
    cpu::apply_rope(q_.data(), tokens_, cfg_.num_q_heads, cfg_.head_dim, cos_.data(), sin_.data());
    cpu::apply_rope(k_.data(), tokens_, cfg_.num_kv_heads, cfg_.head_dim, cos_.data(), sin_.data());
    const Device cpu = Device::cpu();
    out->q = TensorView(q_.data(), DType::kF32, cpu, {tokens_, cfg_.num_q_heads, cfg_.head_dim});
    out->k = TensorView(k_.data(), DType::kF32, cpu, {tokens_, cfg_.num_kv_heads, cfg_.head_dim});
    out->v = TensorView(v_.data(), DType::kF32, cpu, {tokens_, cfg_.num_kv_heads, cfg_.head_dim});
    return ok_status();
  }

  Status self_attention(int layer, bool cache) override {
    const int64_t kv_dim = int64_t{cfg_.num_kv_heads} * cfg_.head_dim;
    auto& kc = k_cache_[layer];
    auto& vc = v_cache_[layer];
    const int64_t past = static_cast<int64_t>(kc.size()) / kv_dim;
    cpu::AttentionArgs args;
    args.q = q_.data();
    args.past_k = kc.data();
    args.past_v = vc.data();
    args.new_k = k_.data();
    args.new_v = v_.data();
    args.past = past;
    args.tokens = tokens_;
    args.q_heads = cfg_.num_q_heads;
    args.kv_heads = cfg_.num_kv_heads;
    args.head_dim = cfg_.head_dim;
    args.out = att_.data();
    cpu::causal_attention(args);
    if (cache) {
      kc.insert(kc.end(), k_.begin(), k_.end());
      vc.insert(vc.end(), v_.begin(), v_.end());
      if (layer == cfg_.num_layers - 1) cached_ = past + tokens_;
    }
    return ok_status();
  }

  TensorView attention_output() override {
    return TensorView(att_.data(), DType::kF32, Device::cpu(),
                      {tokens_, cfg_.num_q_heads, cfg_.head_dim});
  }

  Status finish_layer(int layer) override {
    const LayerWeights& w = model_.weights().layers[layer];
    const int64_t n = tokens_ * cfg_.hidden_size;
    cpu::linear(att_.data(), tokens_, *w.o_proj, w.o_bias, xn_.data());
    for (int64_t i = 0; i < n; ++i)
      x_[i] += xn_[i];
    cpu::rms_norm(x_.data(), tokens_, cfg_.hidden_size, *w.post_norm, cfg_.rms_norm_eps,
                  xn_.data());
    cpu::linear(xn_.data(), tokens_, *w.gate_proj, w.gate_bias, gate_.data());
    cpu::linear(xn_.data(), tokens_, *w.up_proj, w.up_bias, up_.data());
    cpu::swiglu(gate_.data(), up_.data(), tokens_ * cfg_.intermediate_size);
    cpu::linear(gate_.data(), tokens_, *w.down_proj, w.down_bias, xn_.data());
    for (int64_t i = 0; i < n; ++i)
      x_[i] += xn_[i];
    return ok_status();
  }

  Status logits(bool all_positions, std::vector<float>* host_out) override {
    const int64_t rows = all_positions ? tokens_ : 1;
    const float* x = x_.data() + (tokens_ - rows) * cfg_.hidden_size;
    cpu::rms_norm(x, rows, cfg_.hidden_size, *model_.weights().final_norm, cfg_.rms_norm_eps,
                  xn_.data());
    host_out->resize(rows * cfg_.vocab_size);
    cpu::linear(xn_.data(), rows, *model_.weights().lm_head, nullptr, host_out->data());
    return ok_status();
  }

  Status copy_to_host(const TensorView& src, float* dst) override {
    std::memcpy(dst, src.data, src.numel() * sizeof(float));
    return ok_status();
  }
  Status copy_from_host(const float* src, const TensorView& dst) override {
    std::memcpy(dst.data, src, dst.numel() * sizeof(float));
    return ok_status();
  }

 private:
  const LlamaModel& model_;
  const LlamaConfig& cfg_;
  std::vector<double> inv_freq_;
  // The backend's own exact KV cache, per layer [tokens, kv_heads, head_dim].
  std::vector<std::vector<float>> k_cache_;
  std::vector<std::vector<float>> v_cache_;
  int64_t cached_ = 0;

  int64_t tokens_ = 0;
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_, cos_, sin_;
};

}  // namespace

Result<std::unique_ptr<ModelBackend>> make_cpu_backend(const LlamaModel& model) {
  return std::unique_ptr<ModelBackend>(new CpuBackend(model));
}

}  // namespace pqkv::model
