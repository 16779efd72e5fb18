// Random-weight Llama-family checkpoints in Hugging Face layout (config.json
// and safetensors): benchmarks run a real model's geometry without its weights,
// and tests build models of any shape.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::model {

struct RandomCheckpoint {
  std::string architecture = "LlamaForCausalLM";  // or MistralForCausalLM, Qwen2ForCausalLM
  int hidden = 32;
  int intermediate = 48;
  int layers = 2;
  int q_heads = 4;
  int kv_heads = 2;
  int head_dim = 8;
  int vocab = 64;
  bool tied = false;            // lm_head shares the embedding
  bool attention_bias = false;  // Qwen2 has q/k/v biases whatever this says
  double rope_theta = 10000.0;
  std::string rope_scaling_json = "null";  // config.json's rope_scaling, as JSON
  DType dtype = DType::kF32;               // of the stored weights
  uint64_t seed = 7;
  int shards = 1;  // > 1 writes model.safetensors.index.json
  int max_position_embeddings = 4096;

  // Llama-3.1-8B's layer geometry (hidden 4096, 32 q heads, 8 KV heads,
  // head_dim 128, MLP 14336, rope theta 500000 with Llama-3 scaling), bf16,
  // with `layers` layers and a byte-level vocabulary of 256.
  static RandomCheckpoint llama31_8b_geometry(int layers);
};

// One tensor of the checkpoint: values are normal(mean, std).
struct RandomTensor {
  std::string name;
  std::vector<int64_t> shape;
  float std = 0;
  float mean = 0;
  int64_t numel() const;
};

std::string random_checkpoint_config_json(const RandomCheckpoint& c);
std::vector<RandomTensor> random_checkpoint_tensors(const RandomCheckpoint& c);
// Values of tensor `index` of the list, from the checkpoint's seed.
std::vector<float> random_tensor_values(const RandomCheckpoint& c, const RandomTensor& t,
                                        size_t index);

// Writes config.json and the weights into `dir` (created if missing), one
// tensor at a time, so a multi-GB checkpoint needs one tensor's memory. The
// files are written into a staging folder inside `dir` and renamed into
// place once all are whole, so a failure leaves what `dir` held.
// ResourceExhausted (nothing written) when one tensor's fp32 values pass
// this machine's memory or the files pass the disk's free space; IoError
// when a file cannot be written.
Status write_random_checkpoint(const std::filesystem::path& dir, const RandomCheckpoint& c);

}  // namespace pqkv::model
