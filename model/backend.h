// Where the forward pass of a LlamaModel runs. One interface, a CPU and a CUDA
// implementation. The Generator drives a backend layer by layer so that keys
// and values can go to a pqkv Sequence between the projections and the
// attention output:
//
//   begin_pass(tokens, start)
//   for each layer: project_qkv -> (store append / attend) or self_attention
//                   -> finish_layer
//   logits(...)
//
// All activations are fp32. Views returned by a backend live in its memory
// (host for the CPU, device for CUDA) until the next begin_pass.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "model/llama_model.h"
#include "pqkv/device.h"
#include "pqkv/tensor_view.h"

namespace pqkv::model {

// This pass's queries [T, q_heads, head_dim], keys and values
// [T, kv_heads, head_dim]; keys and queries after RoPE.
struct QkvViews {
  TensorView q;
  TensorView k;
  TensorView v;
};

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;

  virtual Device device() const = 0;
  // The stream the backend enqueues on; Stream::host() for the CPU.
  virtual Stream stream() const = 0;

  // Forgets the backend's own KV cache: the next pass starts a new sequence.
  virtual void reset() = 0;
  // Starts a pass over `tokens` at positions start .. start + n - 1 (embeds them).
  virtual Status begin_pass(std::span<const int32_t> tokens, int64_t start_position) = 0;
  // RMSNorm, q/k/v projections and RoPE of `layer`.
  virtual Status project_qkv(int layer, QkvViews* out) = 0;
  // Exact causal attention of this pass's queries over the backend's cached
  // keys and values of `layer` and this pass's; with `cache` set, this pass's
  // keys and values join the cache. Writes attention_output().
  virtual Status self_attention(int layer, bool cache) = 0;
  // [T, q_heads, head_dim] fp32: where attention results go, also when a pqkv
  // Sequence computes them.
  virtual TensorView attention_output() = 0;
  // o_proj, residual, post-attention RMSNorm, SwiGLU MLP, residual.
  virtual Status finish_layer(int layer) = 0;
  // Final RMSNorm and logits, copied to the host: [vocab] for the last
  // position of the pass, or [T, vocab] with `all_positions`.
  virtual Status logits(bool all_positions, std::vector<float>* host_out) = 0;

  // Copies between a fp32 view of the backend's memory and host floats (for a
  // store whose memory differs from the backend's).
  virtual Status copy_to_host(const TensorView& src, float* dst) = 0;
  virtual Status copy_from_host(const float* src, const TensorView& dst) = 0;
};

// The checks every backend's begin_pass makes: tokens present and inside the
// vocabulary, and a pass that continues the backend's own cache (`cached`
// tokens) where it holds any.
Status check_pass(const LlamaConfig& config, std::span<const int32_t> tokens,
                  int64_t start_position, int64_t cached);

// The CPU backend (TBB and BLAS). `model` must outlive it.
Result<std::unique_ptr<ModelBackend>> make_cpu_backend(const LlamaModel& model);
// The CUDA backend on `device` (weights are uploaded once, as fp32).
// Unavailable where pqkv was built without CUDA or no GPU is present.
Result<std::unique_ptr<ModelBackend>> make_cuda_backend(const LlamaModel& model, Device device);
// One of the two by device.
Result<std::unique_ptr<ModelBackend>> make_backend(const LlamaModel& model, Device device);

}  // namespace pqkv::model
