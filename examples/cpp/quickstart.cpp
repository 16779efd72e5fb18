// pqkv quick start: one sequence on the CPU, a prompt (prefill), then a few
// decode steps, with every Status checked. Exits 1 with the message on error.
//
// Shapes and dtypes, for a geometry `spec`:
//   keys, values  [tokens, kv_heads, head_dim]  keys after RoPE
//   queries, out  [q_heads, head_dim]           queries after RoPE
//   dtypes        fp32, bf16 or fp16 in the caller's buffers (fp32 here); the
//                 store keeps keys and values in spec.dtype (bf16 here)
//   GQA           query head h attends with KV head h / (q_heads / kv_heads)
#include <pqkv/store.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

// Prints what failed and the Status message; returns the exit code.
int fail(const char* what, const pqkv::Status& status) {
  std::fprintf(stderr, "quickstart: %s failed: %s\n", what, status.to_string().c_str());
  return 1;
}

std::vector<float> random_values(int64_t count, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v)
    x = normal(rng);
  return v;
}

}  // namespace

int main() {
  // A small Llama-shaped geometry, so that the example runs in about a second;
  // pqkv::ModelSpec::llama31_8b() is the real one (32 layers, 32 query heads,
  // 8 KV heads, head_dim 128).
  pqkv::ModelSpec spec;
  spec.name = "quickstart";
  spec.num_layers = 4;
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;  // GQA: query heads 0-3 use KV head 0, 4-7 KV head 1
  spec.head_dim = 64;
  spec.dtype = pqkv::DType::kBF16;
  const int64_t kv = spec.num_kv_heads, q = spec.num_q_heads, d = spec.head_dim;

  pqkv::StoreOptions store_options;
  store_options.spec = spec;
  // Device::cuda(0) keeps rows in pinned DRAM and runs search, gather and
  // attention on the GPU: then pass device tensors and Stream::cuda(stream).
  store_options.device = pqkv::Device::cpu();
  pqkv::Result<std::unique_ptr<pqkv::Store>> store = pqkv::Store::open(store_options);
  if (!store.ok()) return fail("opening the store", store.status());

  // Defaults: int4 keys pick the top-K (options.selection; SelectionConfig::pq()
  // for PQ); each decode step attends to 32 sink tokens, a window of 5% and the
  // top 5% of the context.
  pqkv::SequenceOptions options;
  pqkv::Result<std::shared_ptr<pqkv::Sequence>> created =
      (*store)->create_sequence("chat-1", options);
  if (!created.ok()) return fail("creating the sequence", created.status());
  std::shared_ptr<pqkv::Sequence> seq = created.value();

  const pqkv::Device cpu = pqkv::Device::cpu();
  const pqkv::Stream host = pqkv::Stream::host();
  std::mt19937 rng(2025);

  // Prefill: the prompt's keys and values, layer by layer (any chunking).
  const int64_t prompt_tokens = 1024;
  std::vector<std::vector<float>> prompt_keys(spec.num_layers);
  for (int layer = 0; layer < spec.num_layers; ++layer) {
    std::vector<float>& keys = prompt_keys[layer];
    keys = random_values(prompt_tokens * kv * d, rng);
    std::vector<float> values = random_values(prompt_tokens * kv * d, rng);
    pqkv::TensorView k(keys.data(), pqkv::DType::kF32, cpu, {prompt_tokens, kv, d});
    pqkv::TensorView v(values.data(), pqkv::DType::kF32, cpu, {prompt_tokens, kv, d});
    pqkv::Status s = seq->append(layer, k, v, host);
    if (!s.ok()) return fail("appending the prompt", s);
  }
  // Fits one index per (layer, KV head) (int4 keys: a scale and an offset per
  // channel) and encodes the prompt's keys.
  pqkv::Status s = seq->finish_prefill();
  if (!s.ok()) return fail("finishing the prefill", s);

  // Decode: each step appends the new token's key and value to a layer, then
  // attends with that layer's queries; layers in order, 0 first.
  std::vector<float> out(static_cast<size_t>(q * d)), exact(static_cast<size_t>(q * d));
  for (int step = 0; step < 4; ++step) {
    double max_error = 0;  // of any layer: |out - exact| / |exact| (L2 norms)
    for (int layer = 0; layer < spec.num_layers; ++layer) {
      std::vector<float> key = random_values(kv * d, rng);
      std::vector<float> value = random_values(kv * d, rng);
      // Each query head looks for one prompt token of its KV head, as a
      // retrieval head does: the index has to find that token among 1024.
      std::vector<float> queries = random_values(q * d, rng);
      const int64_t group = q / kv;
      for (int64_t h = 0; h < q; ++h) {
        const int64_t token = std::uniform_int_distribution<int64_t>(32, 900)(rng);
        const float* target = &prompt_keys[layer][(token * kv + h / group) * d];
        for (int64_t i = 0; i < d; ++i) {
          queries[h * d + i] = 0.5f * queries[h * d + i] + 2.0f * target[i];
        }
      }
      pqkv::TensorView k(key.data(), pqkv::DType::kF32, cpu, {1, kv, d});
      pqkv::TensorView v(value.data(), pqkv::DType::kF32, cpu, {1, kv, d});
      pqkv::TensorView qv(queries.data(), pqkv::DType::kF32, cpu, {q, d});
      pqkv::TensorView o(out.data(), pqkv::DType::kF32, cpu, {q, d});
      s = seq->append(layer, k, v, host);
      if (!s.ok()) return fail("appending a decode token", s);
      s = seq->attend(layer, qv, o, host);
      if (!s.ok()) return fail("attend", s);

      // The reference: exact attention over every token (not for production).
      pqkv::TensorView e(exact.data(), pqkv::DType::kF32, cpu, {q, d});
      s = seq->attend_exact(layer, qv, e, host);
      if (!s.ok()) return fail("attend_exact", s);
      double diff = 0;
      double norm = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        diff += (out[i] - exact[i]) * double(out[i] - exact[i]);
        norm += exact[i] * double(exact[i]);
      }
      max_error = std::fmax(max_error, std::sqrt(diff / std::fmax(norm, 1e-30)));
    }
    std::printf(
        "step %d: %lld tokens per layer, output error against exact attention %.4f "
        "(relative, largest over the layers; 0 is exact)\n",
        step, static_cast<long long>(seq->length(0)), max_error);
  }
  return 0;
}
