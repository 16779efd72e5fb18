#include "model/random_checkpoint.h"

#include "core/host_memory.h"
#include "model/safetensors.h"

#include <tbb/parallel_for.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

namespace pqkv::model {
namespace {

Status write_shard(const std::filesystem::path& path, const RandomCheckpoint& c,
                   const std::vector<RandomTensor>& all, const std::vector<size_t>& picked) {
  std::vector<SafetensorsEntry> entries;
  for (size_t i : picked)
    entries.push_back({all[i].name, all[i].shape});
  return write_safetensors(path, entries, c.dtype, [&](size_t i) {
    return random_tensor_values(c, all[picked[i]], picked[i]);
  });
}

}  // namespace

RandomCheckpoint RandomCheckpoint::llama31_8b_geometry(int layers) {
  RandomCheckpoint c;
  c.hidden = 4096;
  c.intermediate = 14336;
  c.layers = layers;
  c.q_heads = 32;
  c.kv_heads = 8;
  c.head_dim = 128;
  c.vocab = 256;
  c.rope_theta = 500000.0;
  c.rope_scaling_json = R"({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,)"
                        R"( "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})";
  c.dtype = DType::kBF16;
  c.max_position_embeddings = 131072;
  return c;
}

int64_t RandomTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

std::string random_checkpoint_config_json(const RandomCheckpoint& c) {
  nlohmann::json j = {{"architectures", {c.architecture}},
                      {"hidden_size", c.hidden},
                      {"intermediate_size", c.intermediate},
                      {"num_hidden_layers", c.layers},
                      {"num_attention_heads", c.q_heads},
                      {"num_key_value_heads", c.kv_heads},
                      {"head_dim", c.head_dim},
                      {"vocab_size", c.vocab},
                      {"max_position_embeddings", c.max_position_embeddings},
                      {"rms_norm_eps", 1e-5},
                      {"rope_theta", c.rope_theta},
                      {"rope_scaling", nlohmann::json::parse(c.rope_scaling_json)},
                      {"tie_word_embeddings", c.tied},
                      {"attention_bias", c.attention_bias},
                      {"hidden_act", "silu"},
                      {"bos_token_id", 1},
                      {"eos_token_id", 2}};
  return j.dump(2);
}

std::vector<RandomTensor> random_checkpoint_tensors(const RandomCheckpoint& c) {
  std::vector<RandomTensor> out;
  const auto add = [&](std::string name, std::vector<int64_t> shape, float std, float mean = 0) {
    out.push_back({std::move(name), std::move(shape), std, mean});
  };
  const int64_t q_dim = int64_t{c.q_heads} * c.head_dim;
  const int64_t kv_dim = int64_t{c.kv_heads} * c.head_dim;
  const bool qkv_bias = c.attention_bias || c.architecture == "Qwen2ForCausalLM";
  const bool o_bias = c.attention_bias && c.architecture != "Qwen2ForCausalLM";
  // Scales keep activations of order one through the layers.
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(c.hidden));
  add("model.embed_tokens.weight", {c.vocab, c.hidden}, 1.0f);
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {c.hidden}, 0.1f, 1.0f);
    add(p + "self_attn.q_proj.weight", {q_dim, c.hidden}, 2.0f * in_scale);
    add(p + "self_attn.k_proj.weight", {kv_dim, c.hidden}, 2.0f * in_scale);
    add(p + "self_attn.v_proj.weight", {kv_dim, c.hidden}, in_scale);
    add(p + "self_attn.o_proj.weight", {c.hidden, q_dim}, 1.0f / std::sqrt(float(q_dim)));
    if (qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q_dim}, 0.1f);
      add(p + "self_attn.k_proj.bias", {kv_dim}, 0.1f);
      add(p + "self_attn.v_proj.bias", {kv_dim}, 0.1f);
    }
    if (o_bias) add(p + "self_attn.o_proj.bias", {c.hidden}, 0.1f);
    add(p + "post_attention_layernorm.weight", {c.hidden}, 0.1f, 1.0f);
    add(p + "mlp.gate_proj.weight", {c.intermediate, c.hidden}, in_scale);
    add(p + "mlp.up_proj.weight", {c.intermediate, c.hidden}, in_scale);
    add(p + "mlp.down_proj.weight", {c.hidden, c.intermediate},
        1.0f / std::sqrt(float(c.intermediate)));
  }
  add("model.norm.weight", {c.hidden}, 0.1f, 1.0f);
  if (!c.tied) add("lm_head.weight", {c.vocab, c.hidden}, in_scale);
  return out;
}

std::vector<float> random_tensor_values(const RandomCheckpoint& c, const RandomTensor& t,
                                        size_t index) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  // Blocks of values with their own seeds: large tensors fill in parallel,
  // and the values do not depend on the thread count.
  constexpr size_t kBlock = size_t{1} << 16;
  const size_t blocks = (v.size() + kBlock - 1) / kBlock;
  tbb::parallel_for(size_t{0}, blocks, [&](size_t b) {
    std::mt19937_64 rng(c.seed * 0x9E3779B97F4A7C15ull + index * 1000003ull + b);
    std::normal_distribution<float> dist(t.mean, t.std);
    for (size_t i = b * kBlock; i < std::min(v.size(), (b + 1) * kBlock); ++i)
      v[i] = dist(rng);
  });
  return v;
}

namespace {

// Writes the checkpoint's files into `dir` (which exists), naming each in `written`.
Status write_files(const std::filesystem::path& dir, const RandomCheckpoint& c,
                   const std::vector<RandomTensor>& tensors, std::vector<std::string>* written) {
  const auto write_text = [&](const std::string& name, const std::string& text) -> Status {
    std::ofstream out(dir / name, std::ios::binary);
    out << text;
    out.close();
    if (!out) return Status::io_error("cannot write " + (dir / name).string());
    written->push_back(name);
    return ok_status();
  };
  PQKV_RETURN_IF_ERROR(write_text("config.json", random_checkpoint_config_json(c)));
  const int shards = std::max(c.shards, 1);
  if (shards == 1) {
    std::vector<size_t> all(tensors.size());
    for (size_t i = 0; i < all.size(); ++i)
      all[i] = i;
    PQKV_RETURN_IF_ERROR(write_shard(dir / "model.safetensors", c, tensors, all));
    written->push_back("model.safetensors");
    return ok_status();
  }
  nlohmann::json index = {{"metadata", nlohmann::json::object()},
                          {"weight_map", nlohmann::json::object()}};
  const size_t per = (tensors.size() + shards - 1) / shards;
  for (int s = 0; s < shards; ++s) {
    const std::string file =
        "model-0000" + std::to_string(s + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    std::vector<size_t> picked;
    for (size_t i = s * per; i < std::min(tensors.size(), (s + 1) * per); ++i) {
      picked.push_back(i);
      index["weight_map"][tensors[i].name] = file;
    }
    PQKV_RETURN_IF_ERROR(write_shard(dir / file, c, tensors, picked));
    written->push_back(file);
  }
  return write_text("model.safetensors.index.json", index.dump(2));
}

}  // namespace

Status write_random_checkpoint(const std::filesystem::path& dir, const RandomCheckpoint& c) {
  namespace fs = std::filesystem;
  const auto tensors = random_checkpoint_tensors(c);
  // Sizes first: one tensor's values are held in fp32 at a time, and the
  // files take every tensor in the checkpoint's dtype.
  double largest = 0;
  double file_bytes = 0;
  for (const RandomTensor& t : tensors) {
    largest = std::max(largest, static_cast<double>(t.numel()) * sizeof(float));
    file_bytes += static_cast<double>(t.numel()) * static_cast<double>(dtype_size(c.dtype));
  }
  PQKV_RETURN_IF_ERROR(check_fits_host_memory(largest, "the largest tensor's values"));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::io_error("cannot create " + dir.string() + ": " + ec.message());
  const fs::space_info space = fs::space(dir, ec);
  if (!ec && file_bytes > static_cast<double>(space.available)) {
    return Status::resource_exhausted("the checkpoint takes " +
                                      std::to_string(static_cast<int64_t>(file_bytes)) +
                                      " bytes, more than the " + std::to_string(space.available) +
                                      " bytes free at " + dir.string() + "; nothing was written");
  }
  // The files are written into a staging folder and renamed into place only
  // once all are whole: a failure leaves what `dir` held before.
  const fs::path staging = dir / (".pqkv-staging-" + std::to_string(::getpid()));
  fs::remove_all(staging, ec);
  fs::create_directory(staging, ec);
  if (ec) return Status::io_error("cannot create " + staging.string() + ": " + ec.message());
  std::vector<std::string> written;
  const Status s = write_files(staging, c, tensors, &written);
  if (!s.ok()) {
    fs::remove_all(staging, ec);
    return s.with_context("nothing was written to " + dir.string());
  }
  for (const std::string& name : written) {
    fs::rename(staging / name, dir / name, ec);
    if (ec) {
      const Status moved =
          Status::io_error("cannot move " + name + " into " + dir.string() + ": " + ec.message());
      fs::remove_all(staging, ec);
      return moved;
    }
  }
  fs::remove_all(staging, ec);
  return ok_status();
}

}  // namespace pqkv::model
