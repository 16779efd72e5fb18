// The CPU forward pass on random Llama-family checkpoints against an
// independent double-precision reference, and generation through pqkv
// Sequences against exact attention.
#include <gtest/gtest.h>

#include <algorithm>

#include "model/backend.h"
#include "model/generator.h"
#include "model/llama_model.h"
#include "model_test_util.h"
#include "pqkv/store.h"

namespace pqkv::model {
namespace {

using testing::TempDir;
using testing::TinyShape;

std::vector<float> all_logits(ModelBackend& backend, const LlamaModel& model,
                              const std::vector<int32_t>& ids) {
  backend.reset();
  PQKV_EXPECT_OK(backend.begin_pass(ids, 0));
  for (int l = 0; l < model.config().num_layers; ++l) {
    QkvViews qkv;
    PQKV_EXPECT_OK(backend.project_qkv(l, &qkv));
    PQKV_EXPECT_OK(backend.self_attention(l, true));
    PQKV_EXPECT_OK(backend.finish_layer(l));
  }
  std::vector<float> out;
  PQKV_EXPECT_OK(backend.logits(true, &out));
  return out;
}

std::vector<int32_t> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& id : ids)
    id = static_cast<int32_t>(rng() % vocab);
  return ids;
}

struct Variant {
  const char* name;
  TinyShape shape;
  double tolerance;
};

TEST(CpuForwardTest, MatchesTheReferenceOnEveryVariant) {
  const nlohmann::json llama3 = {{"rope_type", "llama3"},
                                 {"factor", 8.0},
                                 {"low_freq_factor", 1.0},
                                 {"high_freq_factor", 4.0},
                                 {"original_max_position_embeddings", 16}};
  const std::vector<Variant> variants = {
      {"llama gqa untied", {}, 1e-4},
      {"llama mha tied", {.q_heads = 4, .kv_heads = 4, .tied = true}, 1e-4},
      {"llama3 rope scaling", {.rope_theta = 500000.0, .rope_scaling_json = llama3.dump()}, 1e-4},
      {"linear rope scaling", {.rope_scaling_json = R"({"type": "linear", "factor": 2.0})"}, 1e-4},
      {"llama attention bias", {.attention_bias = true}, 1e-4},
      {"qwen2 biases", {.architecture = "Qwen2ForCausalLM", .q_heads = 8, .kv_heads = 2}, 1e-4},
      {"mistral", {.architecture = "MistralForCausalLM", .head_dim = 16}, 1e-4},
      {"bf16 weights", {.dtype = DType::kBF16}, 1e-4},
      {"fp16 weights sharded", {.dtype = DType::kF16, .shards = 2}, 1e-4},
  };
  for (const auto& v : variants) {
    SCOPED_TRACE(v.name);
    TempDir dir;
    testing::write_tiny_model(dir.path(), v.shape);
    auto model = LlamaModel::load(dir.path());
    PQKV_ASSERT_OK(model);
    auto backend = make_cpu_backend(**model);
    PQKV_ASSERT_OK(backend);
    const auto ids = random_ids(23, v.shape.vocab, 3);
    const auto got = all_logits(**backend, **model, ids);
    const auto want = testing::reference_logits(**model, ids);
    ASSERT_EQ(got.size(), want.size());
    double max_err = 0;
    double max_abs = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      max_err = std::max(max_err, std::abs(got[i] - want[i]));
      max_abs = std::max(max_abs, std::abs(want[i]));
    }
    EXPECT_LT(max_err, v.tolerance * std::max(1.0, max_abs)) << "max |logit| " << max_abs;
  }
}

TEST(CpuForwardTest, RefusesBadTokensAndPositions) {
  TempDir dir;
  testing::write_tiny_model(dir.path(), {});
  auto model = LlamaModel::load(dir.path());
  PQKV_ASSERT_OK(model);
  auto backend = make_cpu_backend(**model);
  const std::vector<int32_t> bad = {1, 64};
  EXPECT_EQ((*backend)->begin_pass(bad, 0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*backend)->begin_pass({}, 0).code(), StatusCode::kInvalidArgument);
  all_logits(**backend, **model, {1, 2, 3});
  const std::vector<int32_t> one = {4};
  EXPECT_EQ((*backend)->begin_pass(one, 7).code(), StatusCode::kFailedPrecondition);
}

class StoreGenerationTest : public ::testing::Test {
 protected:
  void load(const TinyShape& shape) {
    testing::write_tiny_model(dir_.path(), shape);
    auto m = LlamaModel::load(dir_.path());
    PQKV_ASSERT_OK(m);
    model_ = std::move(m).value();
    auto b = make_cpu_backend(*model_);
    PQKV_ASSERT_OK(b);
    backend_ = std::move(b).value();
    StoreOptions so;
    so.spec = model_->config().kv_spec(DType::kF32);
    so.num_threads = 2;
    auto s = Store::open(so);
    PQKV_ASSERT_OK(s);
    store_ = std::move(s).value();
  }

  Result<GenerateResult> run(AttentionPath path, const std::vector<int32_t>& prompt,
                             const SequenceOptions& seq_opts, const GenerateOptions& opts) {
    Generator gen(*model_, *backend_);
    StoreTarget target;
    if (path != AttentionPath::kBackendCache) {
      auto seq = store_->create_sequence("seq" + std::to_string(next_++), seq_opts);
      if (!seq.ok()) return seq.status();
      target.sequence = seq->get();
    }
    return gen.generate(prompt, path, target, opts);
  }

  TempDir dir_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<ModelBackend> backend_;
  std::unique_ptr<Store> store_;
  int next_ = 0;
};

// A budget covering the whole context makes pqkv's decode attention exact:
// generation equals the backend's own exact attention token for token.
TEST_F(StoreGenerationTest, EverythingBudgetEqualsExactAttention) {
  load({.q_heads = 8, .kv_heads = 2, .head_dim = 16, .vocab = 96});
  const auto prompt = random_ids(80, 96, 11);
  GenerateOptions opts;
  opts.max_new_tokens = 40;
  opts.stop_at_eos = false;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  seq_opts.pq = PqConfig::parse("m=2,b=4").value();
  auto exact = run(AttentionPath::kBackendCache, prompt, seq_opts, opts);
  PQKV_ASSERT_OK(exact);
  for (AttentionPath path : {AttentionPath::kStoreExact, AttentionPath::kStoreSparse}) {
    for (bool split : {false, true}) {
      opts.decode_last_prompt_token = split;
      opts.measure_recall = path == AttentionPath::kStoreSparse;
      auto got = run(path, prompt, seq_opts, opts);
      PQKV_ASSERT_OK(got);
      EXPECT_EQ(got->tokens, exact->tokens) << attention_path_name(path) << " split " << split;
      if (opts.measure_recall) {
        ASSERT_EQ(got->layer_recall.size(), 2u);
        for (double r : got->layer_recall)
          EXPECT_NEAR(r, 1.0, 1e-9);
      }
    }
  }
}

// Prefill in chunks gives the same continuation as one pass, with the
// backend's cache and with pqkv sequences.
TEST_F(StoreGenerationTest, ChunkedPrefillEqualsOnePass) {
  load({.q_heads = 4, .kv_heads = 2, .head_dim = 16, .vocab = 96});
  const auto prompt = random_ids(70, 96, 13);
  GenerateOptions opts;
  opts.max_new_tokens = 20;
  opts.stop_at_eos = false;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  auto one = run(AttentionPath::kBackendCache, prompt, seq_opts, opts);
  PQKV_ASSERT_OK(one);
  for (AttentionPath path :
       {AttentionPath::kBackendCache, AttentionPath::kStoreExact, AttentionPath::kStoreSparse}) {
    for (int64_t chunk : {1, 7, 32, 69}) {
      opts.prefill_chunk = chunk;
      auto got = run(path, prompt, seq_opts, opts);
      PQKV_ASSERT_OK(got);
      EXPECT_EQ(got->tokens, one->tokens) << attention_path_name(path) << " chunk " << chunk;
    }
  }
  opts.prefill_chunk = -1;
  EXPECT_EQ(run(AttentionPath::kBackendCache, prompt, seq_opts, opts).status().code(),
            StatusCode::kInvalidArgument);
}

// The blocked prefill over a prompt of several query blocks and key tiles
// (and in chunks that attend to the chunks before them) generates exactly
// what the double-precision reference picks greedily, token for token.
TEST_F(StoreGenerationTest, LongPromptGenerationEqualsTheReference) {
  load({.q_heads = 8, .kv_heads = 2, .head_dim = 16, .vocab = 96});
  const auto prompt = random_ids(600, 96, 17);
  constexpr int kNew = 8;
  std::vector<int32_t> ids = prompt;
  std::vector<int32_t> want;
  for (int i = 0; i < kNew; ++i) {
    const auto logits = testing::reference_logits(*model_, ids);
    const auto last = logits.end() - 96;
    const auto next = static_cast<int32_t>(std::max_element(last, logits.end()) - last);
    want.push_back(next);
    ids.push_back(next);
  }
  GenerateOptions opts;
  opts.max_new_tokens = kNew;
  opts.stop_at_eos = false;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  for (AttentionPath path : {AttentionPath::kBackendCache, AttentionPath::kStoreExact}) {
    for (int64_t chunk : {0, 250}) {
      opts.prefill_chunk = chunk;
      auto got = run(path, prompt, seq_opts, opts);
      PQKV_ASSERT_OK(got);
      EXPECT_EQ(got->tokens, want) << attention_path_name(path) << " chunk " << chunk;
    }
  }
}

// A small budget still runs end to end and reports a recall below one somewhere.
TEST_F(StoreGenerationTest, SparseBudgetRunsAndMeasuresRecall) {
  load({.q_heads = 4, .kv_heads = 2, .head_dim = 16, .vocab = 96});
  const auto prompt = random_ids(300, 96, 5);
  GenerateOptions opts;
  opts.max_new_tokens = 8;
  opts.stop_at_eos = false;
  opts.measure_recall = true;
  opts.decode_last_prompt_token = true;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::ratio_of_context(0.1);
  seq_opts.budget.sink = {4, 0.0};
  seq_opts.pq = PqConfig::parse("m=4,b=4").value();
  auto got = run(AttentionPath::kStoreSparse, prompt, seq_opts, opts);
  PQKV_ASSERT_OK(got);
  EXPECT_EQ(got->tokens.size(), 8u);
  ASSERT_EQ(got->layer_recall.size(), 2u);
  for (double r : got->layer_recall) {
    EXPECT_GT(r, 0.0);
    EXPECT_LE(r, 1.0 + 1e-9);
  }
  EXPECT_LT(std::min(got->layer_recall[0], got->layer_recall[1]), 1.0);
}

// Each layer's index build started as soon as the last prompt chunk has
// appended the layer (under the layers above) generates exactly what builds
// started after the whole prefill generate, with sparse budgets and every
// code, in one pass and in chunks, and measures the same recall.
TEST_F(StoreGenerationTest, OverlappedIndexBuildsGenerateAsBuildsAfterThePrefill) {
  for (uint64_t seed : {3, 29}) {
    load({.layers = 3, .q_heads = 8, .kv_heads = 2, .head_dim = 16, .vocab = 96, .seed = seed});
    const auto prompt = random_ids(400, 96, seed + 1);
    GenerateOptions opts;
    opts.max_new_tokens = 16;
    opts.stop_at_eos = false;
    opts.measure_recall = true;
    opts.decode_last_prompt_token = true;
    SequenceOptions seq_opts;
    seq_opts.budget = BudgetPolicy::ratio_of_context(0.1);
    seq_opts.budget.sink = {4, 0.0};
    seq_opts.pq = PqConfig::parse("m=4,b=4").value();
    for (const char* selection : {"pq", "int4", "int8"}) {
      seq_opts.selection = SelectionConfig::parse(selection).value();
      for (int64_t chunk : {0, 150}) {
        opts.prefill_chunk = chunk;
        std::vector<GenerateResult> runs;
        for (bool overlap : {false, true}) {
          opts.overlap_index_builds = overlap;
          auto got = run(AttentionPath::kStoreSparse, prompt, seq_opts, opts);
          PQKV_ASSERT_OK(got);
          runs.push_back(std::move(got).value());
        }
        const std::string what =
            "seed " + std::to_string(seed) + ", " + selection + ", chunk " + std::to_string(chunk);
        EXPECT_EQ(runs[1].tokens, runs[0].tokens) << what;
        EXPECT_EQ(runs[1].layer_recall, runs[0].layer_recall) << what;
        EXPECT_EQ(runs[1].tokens.size(), 16u) << what;
      }
    }
  }
}

TEST_F(StoreGenerationTest, SamplingIsSeededAndEosStops) {
  load({});
  const auto prompt = random_ids(10, 64, 2);
  GenerateOptions opts;
  opts.max_new_tokens = 30;
  opts.stop_at_eos = false;
  opts.sampling.temperature = 1.0f;
  opts.sampling.seed = 42;
  auto a = run(AttentionPath::kBackendCache, prompt, {}, opts);
  auto b = run(AttentionPath::kBackendCache, prompt, {}, opts);
  PQKV_ASSERT_OK(a);
  PQKV_ASSERT_OK(b);
  EXPECT_EQ(a->tokens, b->tokens);
  opts.sampling.seed = 43;
  auto c = run(AttentionPath::kBackendCache, prompt, {}, opts);
  EXPECT_NE(a->tokens, c->tokens);

  // Stop at the first EOS (id 2) the greedy path produces, if any.
  opts.sampling.temperature = 0;
  opts.stop_at_eos = true;
  auto d = run(AttentionPath::kBackendCache, prompt, {}, opts);
  PQKV_ASSERT_OK(d);
  for (size_t i = 0; i + 1 < d->tokens.size(); ++i)
    EXPECT_NE(d->tokens[i], 2);
  EXPECT_GT(d->ttft_ms, 0.0);
}

TEST_F(StoreGenerationTest, RefusesMismatchedOrMissingSequences) {
  load({});
  const std::vector<int32_t> prompt = {1, 5, 6};
  GenerateOptions opts;
  Generator gen(*model_, *backend_);
  EXPECT_EQ(gen.generate(prompt, AttentionPath::kStoreSparse, {}, opts).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(gen.generate({}, AttentionPath::kBackendCache, {}, opts).status().code(),
            StatusCode::kInvalidArgument);

  StoreOptions so;
  so.spec = ModelSpec::tiny();
  auto other = Store::open(so);
  PQKV_ASSERT_OK(other);
  auto seq = (*other)->create_sequence("x", {});
  PQKV_ASSERT_OK(seq);
  auto r = gen.generate(prompt, AttentionPath::kStoreExact, {seq->get(), Device::cpu()}, opts);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv::model
