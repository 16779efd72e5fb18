// The CUDA ModelBackend: weights uploaded once (matrices in their checkpoint
// dtype, vectors as fp32), fp32 activations, cuBLAS for the matrix products
// and the kernels of layer_ops.cu, flash_attention.cu (prefill of 16-bit
// checkpoints) and causal_attention.cu for the rest. Work goes to the
// backend's own stream; results are copied to the host only by logits() and
// the copy helpers, which synchronize that stream.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "model/backend.h"
#include "model/cuda/causal_attention.cuh"
#include "model/cuda/cublas_check.h"
#include "model/cuda/flash_attention.cuh"
#include "model/cuda/layer_ops.cuh"
#include "model/rope.h"

namespace pqkv::model {
namespace {

struct DeviceMatrix {
  gpu::DeviceBuffer buffer;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
};

struct DeviceVector {
  gpu::DeviceBuffer buffer;  // fp32
  const float* get() const { return buffer.as<const float>(); }
};

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
  }
  return CUDA_R_32F;
}

Status upload_matrix(const WeightTensor& w, DeviceMatrix* out) {
  out->dtype = w.dtype;
  out->rows = w.shape[0];
  out->cols = w.shape[1];
  const size_t bytes = static_cast<size_t>(w.numel()) * dtype_size(w.dtype);
  PQKV_RETURN_IF_ERROR(out->buffer.reserve(bytes));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out->buffer.data(), w.data, bytes, cudaMemcpyHostToDevice));
  return ok_status();
}

Status upload_vector(const WeightTensor* w, DeviceVector* out) {
  if (w == nullptr) return ok_status();
  std::vector<float> host(w->numel());
  convert_to_float(w->data, w->dtype, w->numel(), host.data());
  PQKV_RETURN_IF_ERROR(out->buffer.reserve(host.size() * sizeof(float)));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out->buffer.data(), host.data(), host.size() * sizeof(float),
                                       cudaMemcpyHostToDevice));
  return ok_status();
}

struct DeviceLayer {
  DeviceVector input_norm, post_norm;
  DeviceMatrix q, k, v, o, gate, up, down;
  DeviceVector q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias;
  // The layer's exact KV cache, [capacity, kv_heads, head_dim] fp32.
  gpu::DeviceBuffer k_cache, v_cache;
  int64_t cached = 0;
  int64_t capacity = 0;
};

class CudaBackend final : public ModelBackend {
 public:
  CudaBackend(const LlamaModel& model, Device device)
      : model_(model),
        cfg_(model.config()),
        device_(device),
        inv_freq_(rope_inv_freq(cfg_)),
        // A 16-bit checkpoint already rounds every product's inputs to 16
        // bits; its prefill attention runs on tensor cores in bf16 too. fp32
        // checkpoints keep fp32 attention, equal to the CPU backend.
        flash_prefill_(
            model.weights().layers.front().q_proj->dtype != DType::kF32 &&
            cuda::flash_attention_supported(cfg_.num_q_heads, cfg_.num_kv_heads, cfg_.head_dim)) {}

  ~CudaBackend() override {
    // Teardown cannot report errors; the buffers free after the stream drains.
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    if (cublas_ != nullptr) cublasDestroy(cublas_);
  }

  Status init() {
    PQKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.index));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    PQKV_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
    PQKV_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
    // The default math mode keeps fp32 products in fp32 (TF32 only on request),
    // so that the GPU matches the CPU reference.
    PQKV_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    const LlamaWeights& w = model_.weights();
    PQKV_RETURN_IF_ERROR(upload_matrix(*w.embed, &embed_));
    if (w.lm_head != w.embed) PQKV_RETURN_IF_ERROR(upload_matrix(*w.lm_head, &lm_head_));
    PQKV_RETURN_IF_ERROR(upload_vector(w.final_norm, &final_norm_));
    layers_.resize(cfg_.num_layers);
    for (int l = 0; l < cfg_.num_layers; ++l) {
      const LayerWeights& lw = w.layers[l];
      DeviceLayer& d = layers_[l];
      PQKV_RETURN_IF_ERROR(upload_vector(lw.input_norm, &d.input_norm));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.post_norm, &d.post_norm));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.q_proj, &d.q));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.k_proj, &d.k));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.v_proj, &d.v));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.o_proj, &d.o));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.gate_proj, &d.gate));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.up_proj, &d.up));
      PQKV_RETURN_IF_ERROR(upload_matrix(*lw.down_proj, &d.down));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.q_bias, &d.q_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.k_bias, &d.k_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.v_bias, &d.v_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.o_bias, &d.o_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.gate_bias, &d.gate_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.up_bias, &d.up_bias));
      PQKV_RETURN_IF_ERROR(upload_vector(lw.down_bias, &d.down_bias));
    }
    return ok_status();
  }

  Device device() const override { return device_; }
  Stream stream() const override { return Stream::cuda(stream_); }

  void reset() override {
    for (auto& l : layers_)
      l.cached = 0;
  }

  Status begin_pass(std::span<const int32_t> tokens, int64_t start_position) override {
    PQKV_RETURN_IF_ERROR(check_pass(cfg_, tokens, start_position, layers_.back().cached));
    tokens_ = static_cast<int64_t>(tokens.size());
    const int64_t t = tokens_;
    const int64_t hidden = cfg_.hidden_size;
    const int64_t q_dim = int64_t{cfg_.num_q_heads} * cfg_.head_dim;
    const int64_t kv_dim = int64_t{cfg_.num_kv_heads} * cfg_.head_dim;
    const int64_t inter = cfg_.intermediate_size;
    const auto f = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
    if (t > capacity_tokens_) {
      // Growing frees buffers the previous pass may still be reading.
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      capacity_tokens_ = t;
    }
    PQKV_RETURN_IF_ERROR(x_.reserve(f(t * hidden)));
    PQKV_RETURN_IF_ERROR(xn_.reserve(f(t * hidden)));
    PQKV_RETURN_IF_ERROR(tmp_.reserve(f(t * hidden)));
    PQKV_RETURN_IF_ERROR(q_.reserve(f(t * q_dim)));
    PQKV_RETURN_IF_ERROR(k_.reserve(f(t * kv_dim)));
    PQKV_RETURN_IF_ERROR(v_.reserve(f(t * kv_dim)));
    PQKV_RETURN_IF_ERROR(att_.reserve(f(t * q_dim)));
    PQKV_RETURN_IF_ERROR(gate_.reserve(f(t * inter)));
    PQKV_RETURN_IF_ERROR(up_.reserve(f(t * inter)));
    // Activations in a weight's 16-bit dtype, for the mixed-precision products.
    PQKV_RETURN_IF_ERROR(
        half_.reserve(static_cast<size_t>(2 * t * std::max({hidden, q_dim, inter}))));
    PQKV_RETURN_IF_ERROR(ids_.reserve(t * sizeof(int32_t)));
    PQKV_RETURN_IF_ERROR(cos_.reserve(f(t * cfg_.head_dim / 2)));
    PQKV_RETURN_IF_ERROR(sin_.reserve(f(t * cfg_.head_dim / 2)));
    // Pageable sources: the copies return once the host data is staged.
    ids_host_.assign(tokens.begin(), tokens.end());
    rope_tables(inv_freq_, start_position, t, &cos_host_, &sin_host_);
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ids_.data(), ids_host_.data(), t * sizeof(int32_t),
                                              cudaMemcpyHostToDevice, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(cos_.data(), cos_host_.data(), f(cos_host_.size()),
                                              cudaMemcpyHostToDevice, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sin_.data(), sin_host_.data(), f(sin_host_.size()),
                                              cudaMemcpyHostToDevice, stream_));
    return cuda::embed(ids_.as<int32_t>(), t, embed_.buffer.data(), embed_.dtype, cfg_.hidden_size,
                       x_.as<float>(), stream_);
  }

  Status project_qkv(int layer, QkvViews* out) override {
    DeviceLayer& d = layers_[layer];
    const auto eps = static_cast<float>(cfg_.rms_norm_eps);
    PQKV_RETURN_IF_ERROR(cuda::rms_norm(x_.as<float>(), tokens_, cfg_.hidden_size,
                                        d.input_norm.get(), eps, xn_.as<float>(), stream_));
    PQKV_RETURN_IF_ERROR(linear(xn_.as<float>(), d.q, d.q_bias, q_.as<float>()));
    PQKV_RETURN_IF_ERROR(linear(xn_.as<float>(), d.k, d.k_bias, k_.as<float>()));
    PQKV_RETURN_IF_ERROR(linear(xn_.as<float>(), d.v, d.v_bias, v_.as<float>()));
    PQKV_RETURN_IF_ERROR(cuda::rope(q_.as<float>(), tokens_, cfg_.num_q_heads, cfg_.head_dim,
                                    cos_.as<float>(), sin_.as<float>(), stream_));
    PQKV_RETURN_IF_ERROR(cuda::rope(k_.as<float>(), tokens_, cfg_.num_kv_heads, cfg_.head_dim,
                                    cos_.as<float>(), sin_.as<float>(), stream_));
    out->q =
        TensorView(q_.data(), DType::kF32, device_, {tokens_, cfg_.num_q_heads, cfg_.head_dim});
    out->k =
        TensorView(k_.data(), DType::kF32, device_, {tokens_, cfg_.num_kv_heads, cfg_.head_dim});
    out->v =
        TensorView(v_.data(), DType::kF32, device_, {tokens_, cfg_.num_kv_heads, cfg_.head_dim});
    return ok_status();
  }

  Status self_attention(int layer, bool cache) override {
    DeviceLayer& d = layers_[layer];
    cuda::AttentionArgs args;
    args.q = q_.as<float>();
    args.past_k = d.k_cache.as<float>();
    args.past_v = d.v_cache.as<float>();
    args.new_k = k_.as<float>();
    args.new_v = v_.as<float>();
    args.past = d.cached;
    args.tokens = tokens_;
    args.q_heads = cfg_.num_q_heads;
    args.kv_heads = cfg_.num_kv_heads;
    args.head_dim = cfg_.head_dim;
    args.out = att_.as<float>();
    // Decode steps (one query) stay on the fp32 kernel: a 64-query tile
    // would waste 63 rows.
    if (flash_prefill_ && tokens_ > 1) {
      const size_t need = cuda::flash_attention_workspace_bytes(args);
      if (need > flash_workspace_.bytes()) {
        // Growing frees the workspace the previous layer's kernel may still
        // read. Chunked prefill grows the context chunk by chunk: by half
        // again at least, so that it grows a few times only.
        PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
        PQKV_RETURN_IF_ERROR(
            flash_workspace_.reserve(std::max(need, flash_workspace_.bytes() * 3 / 2)));
      }
      PQKV_RETURN_IF_ERROR(
          cuda::flash_attention(args, flash_workspace_.data(), flash_workspace_.bytes(), stream_));
    } else {
      PQKV_RETURN_IF_ERROR(cuda::causal_attention(args, stream_));
    }
    if (cache) PQKV_RETURN_IF_ERROR(append_to_cache(d));
    return ok_status();
  }

  TensorView attention_output() override {
    return TensorView(att_.data(), DType::kF32, device_,
                      {tokens_, cfg_.num_q_heads, cfg_.head_dim});
  }

  Status finish_layer(int layer) override {
    DeviceLayer& d = layers_[layer];
    const int64_t n = tokens_ * cfg_.hidden_size;
    const auto eps = static_cast<float>(cfg_.rms_norm_eps);
    PQKV_RETURN_IF_ERROR(linear(att_.as<float>(), d.o, d.o_bias, tmp_.as<float>()));
    PQKV_RETURN_IF_ERROR(cuda::add_inplace(x_.as<float>(), tmp_.as<float>(), n, stream_));
    PQKV_RETURN_IF_ERROR(cuda::rms_norm(x_.as<float>(), tokens_, cfg_.hidden_size,
                                        d.post_norm.get(), eps, xn_.as<float>(), stream_));
    PQKV_RETURN_IF_ERROR(linear(xn_.as<float>(), d.gate, d.gate_bias, gate_.as<float>()));
    PQKV_RETURN_IF_ERROR(linear(xn_.as<float>(), d.up, d.up_bias, up_.as<float>()));
    PQKV_RETURN_IF_ERROR(cuda::swiglu(gate_.as<float>(), up_.as<float>(),
                                      tokens_ * cfg_.intermediate_size, stream_));
    PQKV_RETURN_IF_ERROR(linear(gate_.as<float>(), d.down, d.down_bias, tmp_.as<float>()));
    return cuda::add_inplace(x_.as<float>(), tmp_.as<float>(), n, stream_);
  }

  Status logits(bool all_positions, std::vector<float>* host_out) override {
    const int64_t rows = all_positions ? tokens_ : 1;
    const float* x = x_.as<float>() + (tokens_ - rows) * cfg_.hidden_size;
    PQKV_RETURN_IF_ERROR(cuda::rms_norm(x, rows, cfg_.hidden_size, final_norm_.get(),
                                        static_cast<float>(cfg_.rms_norm_eps), xn_.as<float>(),
                                        stream_));
    PQKV_RETURN_IF_ERROR(logits_.reserve(static_cast<size_t>(rows) * cfg_.vocab_size * 4));
    const DeviceMatrix& head = lm_head_.rows > 0 ? lm_head_ : embed_;
    PQKV_RETURN_IF_ERROR(linear_rows(xn_.as<float>(), rows, head, nullptr, logits_.as<float>()));
    host_out->resize(rows * cfg_.vocab_size);
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_out->data(), logits_.data(),
                                              host_out->size() * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return ok_status();
  }

  Status copy_to_host(const TensorView& src, float* dst) override {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src.data, src.numel() * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return ok_status();
  }

  Status copy_from_host(const float* src, const TensorView& dst) override {
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst.data, src, dst.numel() * sizeof(float),
                                              cudaMemcpyHostToDevice, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return ok_status();
  }

 private:
  Status linear(const float* x, const DeviceMatrix& w, const DeviceVector& bias, float* y) {
    return linear_rows(x, tokens_, w, bias.buffer.data() ? bias.get() : nullptr, y);
  }

  // y[T, out] = x[T, in] w[out, in]^T (+ bias): in cuBLAS's column-major terms
  // y^T = w^T(T) x^T.
  Status linear_rows(const float* x, int64_t rows, const DeviceMatrix& w, const float* bias,
                     float* y) {
    const auto m = static_cast<int>(w.rows);
    const auto k = static_cast<int>(w.cols);
    const auto n = static_cast<int>(rows);
    const float alpha = 1.0f;
    const float beta = 0.0f;
    if (w.dtype == DType::kF32) {
      PQKV_CUBLAS_RETURN_IF_ERROR(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha,
                                              w.buffer.as<float>(), k, x, k, &beta, y, m));
    } else {
      PQKV_RETURN_IF_ERROR(
          cuda::convert_from_f32(x, int64_t{n} * k, half_.data(), w.dtype, stream_));
      PQKV_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha,
                                               w.buffer.data(), cuda_type(w.dtype), k, half_.data(),
                                               cuda_type(w.dtype), k, &beta, y, CUDA_R_32F, m,
                                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (bias != nullptr) PQKV_RETURN_IF_ERROR(cuda::add_bias(y, rows, m, bias, stream_));
    return ok_status();
  }

  Status append_to_cache(DeviceLayer& d) {
    const int64_t row_bytes = int64_t{cfg_.num_kv_heads} * cfg_.head_dim * sizeof(float);
    const int64_t need = d.cached + tokens_;
    if (need > d.capacity) {
      const int64_t capacity = std::max(need, 2 * d.capacity);
      gpu::DeviceBuffer k;
      gpu::DeviceBuffer v;
      PQKV_RETURN_IF_ERROR(k.reserve(capacity * row_bytes));
      PQKV_RETURN_IF_ERROR(v.reserve(capacity * row_bytes));
      if (d.cached > 0) {
        PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(k.data(), d.k_cache.data(), d.cached * row_bytes,
                                                  cudaMemcpyDeviceToDevice, stream_));
        PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v.data(), d.v_cache.data(), d.cached * row_bytes,
                                                  cudaMemcpyDeviceToDevice, stream_));
      }
      // The old buffers are freed below; the copies out of them must be done.
      PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      d.k_cache = std::move(k);
      d.v_cache = std::move(v);
      d.capacity = capacity;
    }
    auto* kc = static_cast<char*>(d.k_cache.data()) + d.cached * row_bytes;
    auto* vc = static_cast<char*>(d.v_cache.data()) + d.cached * row_bytes;
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(kc, k_.data(), tokens_ * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    PQKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(vc, v_.data(), tokens_ * row_bytes, cudaMemcpyDeviceToDevice, stream_));
    d.cached = need;
    return ok_status();
  }

  const LlamaModel& model_;
  const LlamaConfig& cfg_;
  Device device_;
  std::vector<double> inv_freq_;
  bool flash_prefill_ = false;  // bf16 tensor-core attention for passes of several tokens
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;

  DeviceMatrix embed_;
  DeviceMatrix lm_head_;  // empty when tied to embed_
  DeviceVector final_norm_;
  std::vector<DeviceLayer> layers_;

  int64_t tokens_ = 0;
  int64_t capacity_tokens_ = 0;  // the per-pass buffers hold this many tokens
  gpu::DeviceBuffer x_, xn_, tmp_, q_, k_, v_, att_, gate_, up_, half_, ids_, cos_, sin_, logits_;
  // bf16 keys and values of the context for flash_attention, grown on demand.
  gpu::DeviceBuffer flash_workspace_;
  std::vector<int32_t> ids_host_;
  std::vector<float> cos_host_, sin_host_;
};

}  // namespace

Result<std::unique_ptr<ModelBackend>> make_cuda_backend(const LlamaModel& model, Device device) {
  if (!device.is_cuda()) {
    return Status::invalid_argument("make_cuda_backend needs a cuda device, got " +
                                    device.to_string());
  }
  PQKV_RETURN_IF_ERROR(check_device_usable(device));
  auto backend = std::make_unique<CudaBackend>(model, device);
  PQKV_RETURN_IF_ERROR(backend->init().with_context("starting the CUDA model backend"));
  return std::unique_ptr<ModelBackend>(std::move(backend));
}

}  // namespace pqkv::model
