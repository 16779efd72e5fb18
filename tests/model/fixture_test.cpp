// The aidreams260K fixture (a real tiny Llama from the shared fixtures folder
// beside the checkout): tokenizer, logits and greedy continuations against the
// reference in its expected.json.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>

#include "model/backend.h"
#include "model/generator.h"
#include "model/llama_model.h"
#include "pqkv/store.h"
#include "test_util.h"

namespace pqkv::model {
namespace {

std::filesystem::path fixture_dir() {
  return pqkv::testing::shared_dir() / "models/aidreams260K";
}

#define SKIP_IF_NO_FIXTURE()                                                             \
  do {                                                                                   \
    if (!std::filesystem::exists(fixture_dir() / "expected.json")) {                     \
      GTEST_SKIP() << "fixture models/aidreams260K not found in the shared fixtures "    \
                      "folder beside the checkout (set PQKV_SHARED_DIR to point at it)"; \
    }                                                                                    \
  } while (0)

class FixtureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_IF_NO_FIXTURE();
    auto m = LlamaModel::load(fixture_dir());
    PQKV_ASSERT_OK(m);
    model_ = std::move(m).value();
    std::ifstream in(fixture_dir() / "expected.json");
    expected_ = nlohmann::json::parse(in);
  }

  std::vector<int32_t> ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

  std::unique_ptr<LlamaModel> model_;
  nlohmann::json expected_;
};

TEST_F(FixtureTest, LoadsConfig) {
  const LlamaConfig& c = model_->config();
  EXPECT_EQ(c.num_layers, 4);
  EXPECT_EQ(c.num_q_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(model_->weights().lm_head, model_->weights().embed);
  ASSERT_NE(model_->tokenizer(), nullptr);
}

TEST_F(FixtureTest, EncodesPromptsLikeTheReference) {
  for (const auto& p : expected_["prompts"]) {
    std::vector<int32_t> got = {*model_->config().bos_token_id};
    for (int32_t id : model_->tokenizer()->encode(p["prompt"].get<std::string>()))
      got.push_back(id);
    EXPECT_EQ(got, ids(p["input_ids"])) << "prompt '" << p["prompt"].get<std::string>() << "'";
  }
}

TEST_F(FixtureTest, DecodesTheReferenceText) {
  for (const auto& p : expected_["prompts"]) {
    std::vector<int32_t> all = ids(p["input_ids"]);
    for (int32_t id : ids(p["generated_ids"]))
      all.push_back(id);
    std::string text;
    for (size_t i = 1; i < all.size(); ++i)
      text += model_->tokenizer()->decode(all[i], all[i - 1]);
    EXPECT_EQ(text, p["full_text"].get<std::string>());
  }
}

TEST_F(FixtureTest, CpuLogitsMatchTheReference) {
  const auto& ref = expected_["prompts"][0]["logits"];
  const std::vector<int32_t> input = ids(ref["input_ids_at_positions"]);
  auto backend = make_cpu_backend(*model_);
  PQKV_ASSERT_OK(backend);
  // Once as one prefill pass with every position's logits, once token by token
  // through the backend's KV cache.
  PQKV_ASSERT_OK((*backend)->begin_pass(input, 0));
  for (int l = 0; l < model_->config().num_layers; ++l) {
    QkvViews qkv;
    PQKV_ASSERT_OK((*backend)->project_qkv(l, &qkv));
    PQKV_ASSERT_OK((*backend)->self_attention(l, true));
    PQKV_ASSERT_OK((*backend)->finish_layer(l));
  }
  std::vector<float> all;
  PQKV_ASSERT_OK((*backend)->logits(true, &all));
  const int vocab = model_->config().vocab_size;
  ASSERT_EQ(all.size(), input.size() * vocab);
  double max_err = 0;
  for (size_t p = 0; p < input.size(); ++p) {
    const auto want = ref["values"][p].get<std::vector<float>>();
    for (int i = 0; i < vocab; ++i) {
      max_err = std::max(max_err, double(std::abs(all[p * vocab + i] - want[i])));
    }
  }
  EXPECT_LT(max_err, 1e-4);

  (*backend)->reset();
  for (size_t p = 0; p < input.size(); ++p) {
    PQKV_ASSERT_OK((*backend)->begin_pass({&input[p], 1}, static_cast<int64_t>(p)));
    for (int l = 0; l < model_->config().num_layers; ++l) {
      QkvViews qkv;
      PQKV_ASSERT_OK((*backend)->project_qkv(l, &qkv));
      PQKV_ASSERT_OK((*backend)->self_attention(l, true));
      PQKV_ASSERT_OK((*backend)->finish_layer(l));
    }
    std::vector<float> last;
    PQKV_ASSERT_OK((*backend)->logits(false, &last));
    const auto want = ref["values"][p].get<std::vector<float>>();
    for (int i = 0; i < vocab; ++i)
      EXPECT_NEAR(last[i], want[i], 1e-4) << "position " << p;
  }
}

TEST_F(FixtureTest, CpuGreedyMatchesTheReference) {
  auto backend = make_cpu_backend(*model_);
  PQKV_ASSERT_OK(backend);
  Generator gen(*model_, **backend);
  GenerateOptions opts;
  opts.max_new_tokens = 100;
  opts.stop_at_eos = false;
  for (const auto& p : expected_["prompts"]) {
    const auto prompt = ids(p["input_ids"]);
    auto r = gen.generate(prompt, AttentionPath::kBackendCache, {}, opts);
    PQKV_ASSERT_OK(r);
    EXPECT_EQ(r->tokens, ids(p["generated_ids"])) << "prompt '" << p["prompt"] << "'";
  }
}

// Through a pqkv Sequence: exact attention and a budget covering everything
// both reproduce the reference continuation (keys and values stored in fp32).
TEST_F(FixtureTest, StorePathsMatchTheReference) {
  StoreOptions so;
  so.spec = model_->config().kv_spec(DType::kF32);
  so.num_threads = 2;
  auto store = Store::open(so);
  PQKV_ASSERT_OK(store);
  auto backend = make_cpu_backend(*model_);
  PQKV_ASSERT_OK(backend);
  Generator gen(*model_, **backend);
  GenerateOptions opts;
  opts.max_new_tokens = 100;
  opts.stop_at_eos = false;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::everything();
  int n = 0;
  for (const auto& p : expected_["prompts"]) {
    for (AttentionPath path : {AttentionPath::kStoreExact, AttentionPath::kStoreSparse}) {
      std::string name = "s";
      name += std::to_string(n++);  // not "s" + ...: GCC 12 warns falsely
      auto seq = (*store)->create_sequence(name, seq_opts);
      PQKV_ASSERT_OK(seq);
      auto r = gen.generate(ids(p["input_ids"]), path, {seq->get(), Device::cpu()}, opts);
      PQKV_ASSERT_OK(r);
      EXPECT_EQ(r->tokens, ids(p["generated_ids"]))
          << attention_path_name(path) << ", prompt '" << p["prompt"] << "'";
    }
  }
}

// The fixture with a sparse budget: index builds overlapped with the prefill
// layer by layer generate what builds after the whole prefill generate.
TEST_F(FixtureTest, OverlappedIndexBuildsGenerateAsBuildsAfterThePrefill) {
  StoreOptions so;
  so.spec = model_->config().kv_spec(DType::kF32);
  so.num_threads = 2;
  auto store = Store::open(so);
  PQKV_ASSERT_OK(store);
  auto backend = make_cpu_backend(*model_);
  PQKV_ASSERT_OK(backend);
  Generator gen(*model_, **backend);
  GenerateOptions opts;
  opts.max_new_tokens = 64;
  opts.stop_at_eos = false;
  SequenceOptions seq_opts;
  seq_opts.budget = BudgetPolicy::ratio_of_context(0.2);
  seq_opts.budget.sink = {4, 0.0};
  int n = 0;
  for (const auto& p : expected_["prompts"]) {
    for (int64_t chunk : {0, 5}) {
      opts.prefill_chunk = chunk;
      std::vector<std::vector<int32_t>> runs;
      for (bool overlap : {false, true}) {
        opts.overlap_index_builds = overlap;
        std::string name = "s";
        name += std::to_string(n++);
        auto seq = (*store)->create_sequence(name, seq_opts);
        PQKV_ASSERT_OK(seq);
        auto r = gen.generate(ids(p["input_ids"]), AttentionPath::kStoreSparse,
                              {seq->get(), Device::cpu()}, opts);
        PQKV_ASSERT_OK(r);
        runs.push_back(r->tokens);
      }
      EXPECT_EQ(runs[1], runs[0]) << "prompt '" << p["prompt"] << "', chunk " << chunk;
    }
  }
}

}  // namespace
}  // namespace pqkv::model
