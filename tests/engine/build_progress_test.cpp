// finish_prefill's progress callback: when it is called, what it reports, and
// that an exception from it leaves no half-built sequence behind.
#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "engine_test_util.h"
#include "pqkv/pqkv.h"

namespace pqkv {
namespace {

using testing::append_random;
using testing::open_small_store;

TEST(BuildProgressTest, ReportsEveryLayerInOrder) {
  const ModelSpec spec = ModelSpec::tiny();
  auto s = open_small_store(spec, SequenceOptions{});
  const int64_t n = 300;
  PQKV_ASSERT_OK(append_random(s.seq, n, 7));
  std::vector<BuildProgress> seen;
  PQKV_ASSERT_OK(s.seq->finish_prefill([&](const BuildProgress& p) { seen.push_back(p); }));
  EXPECT_TRUE(s.seq->prefilled());
  ASSERT_EQ(seen.size(), static_cast<size_t>(spec.num_layers) + 1);
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].layers_done, static_cast<int>(i));
    EXPECT_EQ(seen[i].num_layers, spec.num_layers);
    EXPECT_EQ(seen[i].tokens, n);
    EXPECT_GE(seen[i].elapsed_s, 0.0);
    if (i > 0) {
      EXPECT_GE(seen[i].elapsed_s, seen[i - 1].elapsed_s);
    }
  }
}

TEST(BuildProgressTest, EmptyCallbackIsAllowed) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  PQKV_ASSERT_OK(append_random(s.seq, 100, 3));
  PQKV_ASSERT_OK(s.seq->finish_prefill(BuildProgressCallback{}));
  EXPECT_TRUE(s.seq->prefilled());
}

TEST(BuildProgressTest, ThrowingCallbackStopsTheBuildAndLeavesTheSequenceUsable) {
  const ModelSpec spec = ModelSpec::tiny();
  auto s = open_small_store(spec, SequenceOptions{});
  PQKV_ASSERT_OK(append_random(s.seq, 200, 5));
  int calls = 0;
  const Status st = s.seq->finish_prefill([&](const BuildProgress& p) {
    ++calls;
    if (p.layers_done == 1) throw std::runtime_error("stop here");
  });
  EXPECT_EQ(st.code(), StatusCode::kInternal) << st.to_string();
  EXPECT_NE(st.message().find("stop here"), std::string::npos) << st.to_string();
  EXPECT_NE(st.message().find("progress callback"), std::string::npos) << st.to_string();
  EXPECT_EQ(calls, 2);
  EXPECT_FALSE(s.seq->prefilled());
  // Nothing was kept: a second call builds every layer.
  int layers = 0;
  PQKV_ASSERT_OK(s.seq->finish_prefill([&](const BuildProgress& p) { layers = p.layers_done; }));
  EXPECT_EQ(layers, spec.num_layers);
  EXPECT_TRUE(s.seq->prefilled());
}

struct CProgress {
  std::vector<int> layers_done;
  int num_layers = 0;
  int64_t tokens = 0;
};

void record_progress(int layers_done, int num_layers, int64_t tokens, double /*elapsed_s*/,
                     void* user_data) {
  auto* p = static_cast<CProgress*>(user_data);
  p->layers_done.push_back(layers_done);
  p->num_layers = num_layers;
  p->tokens = tokens;
}

TEST(BuildProgressTest, CApiCallsBackWithUserData) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_finish_prefill_with_progress(nullptr, record_progress, nullptr),
            PQKV_INVALID_ARGUMENT);
  const int64_t n = 150;
  const int64_t per = n * spec.num_kv_heads * spec.head_dim;
  const auto k = testing::random_floats(per, 11);
  const auto v = testing::random_floats(per, 12);
  for (int l = 0; l < spec.num_layers; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  CProgress progress;
  ASSERT_EQ(pqkv_sequence_finish_prefill_with_progress(seq, record_progress, &progress), PQKV_OK)
      << pqkv_last_error();
  ASSERT_EQ(progress.layers_done.size(), static_cast<size_t>(spec.num_layers) + 1);
  for (size_t i = 0; i < progress.layers_done.size(); ++i)
    EXPECT_EQ(progress.layers_done[i], static_cast<int>(i));
  EXPECT_EQ(progress.num_layers, spec.num_layers);
  EXPECT_EQ(progress.tokens, n);
  pqkv_store_close(store);
}

TEST(BuildProgressTest, CApiTakesANullCallback) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  const int64_t n = 80;
  const auto k = testing::random_floats(n * spec.num_kv_heads * spec.head_dim, 21);
  for (int l = 0; l < spec.num_layers; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), k.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  EXPECT_EQ(pqkv_sequence_finish_prefill_with_progress(seq, nullptr, nullptr), PQKV_OK)
      << pqkv_last_error();
  pqkv_store_close(store);
}

}  // namespace
}  // namespace pqkv
