// The CUDA model backend against the CPU backend and the fixture's reference.
// Every test skips without a GPU.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>

#include "model/backend.h"
#include "model/generator.h"
#include "model_test_util.h"
#include "pqkv/store.h"
#include "test_util.h"

namespace pqkv::model {
namespace {

using testing::TempDir;
using testing::TinyShape;

// Logits of every position: one prefill pass of `split` tokens, then the rest
// one token at a time through the backend's cache.
std::vector<float> run_logits(ModelBackend& b, const LlamaModel& m, const std::vector<int32_t>& ids,
                              size_t split) {
  b.reset();
  std::vector<float> all;
  size_t pos = 0;
  while (pos < ids.size()) {
    const size_t n = pos == 0 ? std::max<size_t>(split, 1) : 1;
    const std::span<const int32_t> part(ids.data() + pos, n);
    PQKV_EXPECT_OK(b.begin_pass(part, static_cast<int64_t>(pos)));
    for (int l = 0; l < m.config().num_layers; ++l) {
      QkvViews qkv;
      PQKV_EXPECT_OK(b.project_qkv(l, &qkv));
      PQKV_EXPECT_OK(b.self_attention(l, true));
      PQKV_EXPECT_OK(b.finish_layer(l));
    }
    std::vector<float> out;
    PQKV_EXPECT_OK(b.logits(true, &out));
    all.insert(all.end(), out.begin(), out.end());
    pos += n;
  }
  return all;
}

TEST(CudaBackendTest, UnavailableWithoutAGpu) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present; this checks the CPU-only error";
  TempDir dir;
  testing::write_tiny_model(dir.path(), {});
  auto m = LlamaModel::load(dir.path());
  PQKV_ASSERT_OK(m);
  auto b = make_cuda_backend(**m, Device::cuda(0));
  EXPECT_FALSE(b.ok());
  EXPECT_FALSE(make_backend(**m, Device::cuda(0)).ok());
}

TEST(CudaBackendTest, RefusesAMissingDevice) {
  PQKV_SKIP_IF_NO_GPU();
  TempDir dir;
  testing::write_tiny_model(dir.path(), {});
  auto m = LlamaModel::load(dir.path());
  PQKV_ASSERT_OK(m);
  EXPECT_EQ(make_cuda_backend(**m, Device::cuda(cuda_device_count())).status().code(),
            StatusCode::kInvalidArgument);
}

// Random checkpoints of several shapes and dtypes: GPU logits equal CPU logits
// (fp32 weights: 1e-4 of the largest logit; bf16/fp16 weights: the GPU feeds
// its products 16-bit activations, and its prefill attention bf16 operands,
// so 3e-2).
TEST(CudaBackendTest, MatchesCpuOnRandomCheckpoints) {
  PQKV_SKIP_IF_NO_GPU();
  const nlohmann::json llama3 = {{"rope_type", "llama3"},
                                 {"factor", 8.0},
                                 {"low_freq_factor", 1.0},
                                 {"high_freq_factor", 4.0},
                                 {"original_max_position_embeddings", 64}};
  struct Case {
    const char* name;
    TinyShape shape;
    int tokens;
    size_t split;
    double tolerance;
  };
  const std::vector<Case> cases = {
      {"gqa d8, 17 tokens", {}, 17, 17, 1e-4},
      {"gqa d8, 1 token", {}, 1, 1, 1e-4},
      {"qwen2 d64 97 tokens",
       {.architecture = "Qwen2ForCausalLM",
        .hidden = 128,
        .q_heads = 8,
        .kv_heads = 2,
        .head_dim = 64},
       97,
       90,
       1e-4},
      {"llama3 d128 300 tokens",
       {.hidden = 256,
        .intermediate = 320,
        .q_heads = 4,
        .kv_heads = 1,
        .head_dim = 128,
        .tied = true,
        .rope_theta = 500000.0,
        .rope_scaling_json = llama3.dump()},
       300,
       290,
       1e-4},
      {"bf16 weights", {.dtype = DType::kBF16}, 40, 33, 3e-2},
      {"fp16 weights, bias", {.attention_bias = true, .dtype = DType::kF16}, 40, 33, 3e-2},
      // 16-bit weights with head_dim 64 or 128: the prefill runs the bf16
      // tensor-core kernel, the decode passes the fp32 one.
      {"bf16 d64 gqa 4, flash prefill",
       {.hidden = 256,
        .intermediate = 320,
        .q_heads = 4,
        .kv_heads = 1,
        .head_dim = 64,
        .dtype = DType::kBF16},
       300,
       290,
       3e-2},
      {"fp16 d128 gqa 8, flash prefill",
       {.hidden = 256,
        .intermediate = 320,
        .q_heads = 8,
        .kv_heads = 1,
        .head_dim = 128,
        .dtype = DType::kF16},
       97,
       80,
       3e-2},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.name << " (seed " << c.shape.seed << ")");
    TempDir dir;
    testing::write_tiny_model(dir.path(), c.shape);
    auto m = LlamaModel::load(dir.path());
    PQKV_ASSERT_OK(m);
    auto cpu = make_cpu_backend(**m);
    auto gpu = make_cuda_backend(**m, Device::cuda(0));
    PQKV_ASSERT_OK(gpu);
    std::mt19937_64 rng(c.tokens);
    std::vector<int32_t> ids(c.tokens);
    for (auto& id : ids) {
      id = static_cast<int32_t>(rng() % c.shape.vocab);
    }
    const auto want = run_logits(**cpu, **m, ids, c.split);
    const auto got = run_logits(**gpu, **m, ids, c.split);
    ASSERT_EQ(got.size(), want.size());
    double max_err = 0;
    double max_abs = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      max_err = std::max(max_err, double(std::abs(got[i] - want[i])));
      max_abs = std::max(max_abs, double(std::abs(want[i])));
    }
    EXPECT_LT(max_err, c.tolerance * std::max(1.0, max_abs)) << "max |logit| " << max_abs;
  }
}

std::filesystem::path fixture_dir() {
  return pqkv::testing::shared_dir() / "models/aidreams260K";
}

TEST(CudaBackendTest, FixtureLogitsAndGreedyMatchTheReference) {
  PQKV_SKIP_IF_NO_GPU();
  if (!std::filesystem::exists(fixture_dir() / "expected.json")) {
    GTEST_SKIP() << "fixture models/aidreams260K not found in the shared fixtures folder "
                    "beside the checkout";
  }
  auto m = LlamaModel::load(fixture_dir());
  PQKV_ASSERT_OK(m);
  std::ifstream in(fixture_dir() / "expected.json");
  const auto expected = nlohmann::json::parse(in);
  auto gpu = make_cuda_backend(**m, Device::cuda(0));
  PQKV_ASSERT_OK(gpu);

  const auto& ref = expected["prompts"][0]["logits"];
  const auto input = ref["input_ids_at_positions"].get<std::vector<int32_t>>();
  const int vocab = (*m)->config().vocab_size;
  for (size_t split : {size_t{3}, size_t{1}}) {
    const auto got = run_logits(**gpu, **m, input, split);
    ASSERT_EQ(got.size(), input.size() * vocab);
    for (size_t p = 0; p < input.size(); ++p) {
      const auto want = ref["values"][p].get<std::vector<float>>();
      for (int i = 0; i < vocab; ++i) {
        ASSERT_NEAR(got[p * vocab + i], want[i], 1e-4) << "position " << p << " split " << split;
      }
    }
  }

  // Greedy continuations: the GPU's own cache, and a CPU store fed through
  // host staging (exact, and a budget covering everything).
  StoreOptions so;
  so.spec = (*m)->config().kv_spec(DType::kF32);
  auto store = Store::open(so);
  PQKV_ASSERT_OK(store);
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  Generator gen(**m, **gpu);
  GenerateOptions opts;
  opts.max_new_tokens = 100;
  opts.stop_at_eos = false;
  int n = 0;
  for (const auto& p : expected["prompts"]) {
    const auto prompt = p["input_ids"].get<std::vector<int32_t>>();
    const auto want = p["generated_ids"].get<std::vector<int32_t>>();
    for (AttentionPath path :
         {AttentionPath::kBackendCache, AttentionPath::kStoreExact, AttentionPath::kStoreSparse}) {
      StoreTarget target;
      if (path != AttentionPath::kBackendCache) {
        std::string name = "s";
        name += std::to_string(n++);  // not "s" + ...: GCC 12 warns falsely
        auto seq = (*store)->create_sequence(name, seq_opts);
        PQKV_ASSERT_OK(seq);
        target = {seq->get(), Device::cpu()};
      }
      auto r = gen.generate(prompt, path, target, opts);
      PQKV_ASSERT_OK(r);
      EXPECT_EQ(r->tokens, want) << attention_path_name(path) << ", prompt '" << p["prompt"] << "'";
    }
  }
}

// The whole GPU path: the CUDA forward pass with its keys and values in a CUDA
// store. With a budget covering every token it generates what a CPU store of
// the same rows (bf16) generates, token for token.
TEST(CudaBackendTest, CudaStoreWithAFullBudgetGeneratesAsTheCpuStore) {
  PQKV_SKIP_IF_NO_GPU();
  TempDir dir;
  const TinyShape shape{.hidden = 256,
                        .intermediate = 384,
                        .layers = 2,
                        .q_heads = 8,
                        .kv_heads = 2,
                        .head_dim = 64,
                        .vocab = 96,
                        .seed = 23};
  SCOPED_TRACE("seed 23, head_dim 64, GQA 8/2");
  testing::write_tiny_model(dir.path(), shape);
  auto m = LlamaModel::load(dir.path());
  PQKV_ASSERT_OK(m);
  auto gpu = make_cuda_backend(**m, Device::cuda(0));
  PQKV_ASSERT_OK(gpu);
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  GenerateOptions opts;
  opts.max_new_tokens = 24;
  opts.stop_at_eos = false;
  std::vector<int32_t> prompt(300);
  for (size_t i = 0; i < prompt.size(); ++i)
    prompt[i] = static_cast<int32_t>((i * 37 + 5) % 96);

  std::vector<std::vector<int32_t>> runs;
  for (Device store_device : {Device::cpu(), Device::cuda(0)}) {
    StoreOptions so;
    so.spec = (*m)->config().kv_spec(DType::kBF16);
    so.device = store_device;
    auto store = Store::open(so);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", seq_opts);
    PQKV_ASSERT_OK(seq);
    Generator gen(**m, **gpu);
    auto r = gen.generate(prompt, AttentionPath::kStoreSparse, {seq->get(), store_device}, opts);
    ASSERT_TRUE(r.ok()) << store_device.to_string() << ": " << r.status().to_string();
    runs.push_back(r->tokens);
  }
  EXPECT_EQ(runs[1], runs[0]);
}

// The whole GPU path with a sparse budget: each layer's index build
// enqueued on the Store's build stream right after its append (under the
// layers above) generates what builds enqueued after the whole prefill
// generate, token for token, for every code and for chunked prefill.
TEST(CudaBackendTest, OverlappedIndexBuildsGenerateAsBuildsAfterThePrefill) {
  PQKV_SKIP_IF_NO_GPU();
  for (uint64_t seed : {23, 41}) {
    TempDir dir;
    const TinyShape shape{.hidden = 256,
                          .intermediate = 384,
                          .layers = 3,
                          .q_heads = 8,
                          .kv_heads = 2,
                          .head_dim = 64,
                          .vocab = 96,
                          .seed = seed};
    testing::write_tiny_model(dir.path(), shape);
    auto m = LlamaModel::load(dir.path());
    PQKV_ASSERT_OK(m);
    auto gpu = make_cuda_backend(**m, Device::cuda(0));
    PQKV_ASSERT_OK(gpu);
    StoreOptions so;
    so.spec = (*m)->config().kv_spec(DType::kBF16);
    so.device = Device::cuda(0);
    auto store = Store::open(so);
    PQKV_ASSERT_OK(store);
    SequenceOptions seq_opts;
    seq_opts.budget = BudgetPolicy::ratio_of_context(0.1);
    seq_opts.budget.sink = {4, 0.0};
    seq_opts.pq = PqConfig::parse("m=8,b=6").value();
    GenerateOptions opts;
    opts.max_new_tokens = 24;
    opts.stop_at_eos = false;
    std::vector<int32_t> prompt(3000);
    for (size_t i = 0; i < prompt.size(); ++i)
      prompt[i] = static_cast<int32_t>((i * 37 + seed) % 96);
    int n = 0;
    for (const char* selection : {"int4", "pq", "int8"}) {
      seq_opts.selection = SelectionConfig::parse(selection).value();
      for (int64_t chunk : {0, 1024}) {
        opts.prefill_chunk = chunk;
        std::vector<std::vector<int32_t>> runs;
        for (bool overlap : {false, true}) {
          opts.overlap_index_builds = overlap;
          auto seq = (*store)->create_sequence("s" + std::to_string(n++), seq_opts);
          PQKV_ASSERT_OK(seq);
          Generator gen(**m, **gpu);
          auto r = gen.generate(prompt, AttentionPath::kStoreSparse, {seq->get(), Device::cuda(0)},
                                opts);
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          runs.push_back(r->tokens);
        }
        EXPECT_EQ(runs[1], runs[0]) << "seed " << seed << ", " << selection << ", chunk " << chunk;
      }
    }
  }
}

}  // namespace
}  // namespace pqkv::model
