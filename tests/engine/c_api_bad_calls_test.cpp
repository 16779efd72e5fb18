// Every C ABI entry point called as a careless engine calls it: NULL for each
// pointer argument in turn, NULL inside the batch arrays, negative and zero
// sizes, unknown dtypes, and calls out of order (before prefill, after
// prefill ended, after drop and close, without a directory). Each call must
// answer a non-OK status with a message (or its documented -1), never crash,
// change nothing it refused, and leave the store usable; the sanitizer build
// (scripts/check-sanitizers.sh) checks that nothing leaks.
#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "pqkv/pqkv.h"
#include "test_util.h"

namespace {

using pqkv::testing::random_floats;

constexpr int kQHeads = 4, kKvHeads = 2, kDim = 32;

// A call that must be refused: its status is not OK and pqkv_last_error()
// says something.
void expect_refused(pqkv_status s, const std::string& what) {
  EXPECT_NE(s, PQKV_OK) << what;
  EXPECT_GT(std::strlen(pqkv_last_error()), 0u) << what;
  EXPECT_EQ(pqkv_last_error_code(), s) << what;
}

class CApiBadCallsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec_), PQKV_OK);
    pqkv_store_options_init(&so_, &spec_);
    ASSERT_EQ(pqkv_store_open(&so_, &store_), PQKV_OK) << pqkv_last_error();
    pqkv_sequence_options_init(&qo_);
    ASSERT_EQ(pqkv_sequence_create(store_, "a", &qo_, &seq_), PQKV_OK) << pqkv_last_error();
  }
  void TearDown() override { pqkv_store_close(store_); }

  // Appends n random tokens to every layer.
  void append(pqkv_sequence* seq, int64_t n, uint64_t seed) {
    auto k = random_floats(n * kKvHeads * kDim, seed);
    auto v = random_floats(n * kKvHeads * kDim, seed + 1);
    for (int l = 0; l < spec_.num_layers; ++l) {
      ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
          << pqkv_last_error();
    }
  }

  // Every call of a prefilled or not yet prefilled sequence with a NULL or
  // bad argument; none may change its length.
  void refuse_bad_arguments(pqkv_sequence* seq, const std::string& state) {
    const int64_t before = pqkv_sequence_length(seq, 0);
    std::vector<float> k = random_floats(3 * kKvHeads * kDim, 7), q(kQHeads * kDim, 0.5f),
                       out(kQHeads * kDim);
    const auto t = [&](const char* what) { return state + ": " + what; };
    expect_refused(pqkv_sequence_append(seq, 0, nullptr, k.data(), 3, PQKV_F32, nullptr),
                   t("append NULL keys"));
    expect_refused(pqkv_sequence_append(seq, 0, k.data(), nullptr, 3, PQKV_F32, nullptr),
                   t("append NULL values"));
    expect_refused(pqkv_sequence_append(seq, 0, k.data(), k.data(), -3, PQKV_F32, nullptr),
                   t("append -3 tokens"));
    expect_refused(pqkv_sequence_append(seq, 0, k.data(), k.data(), INT64_MIN, PQKV_F32, nullptr),
                   t("append INT64_MIN tokens"));
    expect_refused(pqkv_sequence_append(seq, 0, k.data(), k.data(), INT64_MAX, PQKV_F32, nullptr),
                   t("append INT64_MAX tokens"));
    // 2^40 tokens (a byte count passed as tokens): refused by size before a
    // value of the (far smaller) input is read, which crashed.
    expect_refused(
        pqkv_sequence_append(seq, 0, k.data(), k.data(), int64_t{1} << 40, PQKV_F32, nullptr),
        t("append 2^40 tokens"));
    EXPECT_EQ(pqkv_last_error_code(), PQKV_RESOURCE_EXHAUSTED) << state;
    expect_refused(pqkv_sequence_append(seq, -1, k.data(), k.data(), 3, PQKV_F32, nullptr),
                   t("append layer -1"));
    expect_refused(pqkv_sequence_append(seq, INT_MAX, k.data(), k.data(), 3, PQKV_F32, nullptr),
                   t("append layer INT_MAX"));
    pqkv_dtype bad_dtype;
    const int code = 99;
    std::memcpy(&bad_dtype, &code, sizeof code);
    expect_refused(pqkv_sequence_append(seq, 0, k.data(), k.data(), 3, bad_dtype, nullptr),
                   t("append dtype 99"));
    EXPECT_EQ(pqkv_sequence_length(seq, 0), before) << state;
    for (bool exact : {false, true}) {
      const auto attend = exact ? pqkv_sequence_attend_exact : pqkv_sequence_attend;
      expect_refused(attend(seq, 0, nullptr, out.data(), PQKV_F32, nullptr), t("attend NULL q"));
      expect_refused(attend(seq, 0, q.data(), nullptr, PQKV_F32, nullptr), t("attend NULL out"));
      expect_refused(attend(seq, -1, q.data(), out.data(), PQKV_F32, nullptr), t("attend -1"));
      expect_refused(attend(seq, 0, q.data(), out.data(), bad_dtype, nullptr), t("attend dtype"));
      expect_refused(attend(nullptr, 0, q.data(), out.data(), PQKV_F32, nullptr),
                     t("attend NULL seq"));
    }
    expect_refused(pqkv_sequence_reserve(seq, -1), t("reserve -1"));
    // INT64_MAX overflowed the row store's block count (a sanitizer report).
    expect_refused(pqkv_sequence_reserve(seq, INT64_MAX), t("reserve INT64_MAX"));
    expect_refused(pqkv_sequence_reserve(seq, (int64_t{1} << 40) + 1), t("reserve 2^40 + 1"));
    EXPECT_EQ(pqkv_last_error_code(), PQKV_RESOURCE_EXHAUSTED) << state;
    // 2^40 itself: past this machine's memory, refused before any list of
    // that many blocks is sized (ASan refuses such an allocation outright).
    expect_refused(pqkv_sequence_reserve(seq, int64_t{1} << 40), t("reserve 2^40"));
    EXPECT_EQ(pqkv_last_error_code(), PQKV_RESOURCE_EXHAUSTED) << state;
    expect_refused(pqkv_sequence_drift_stats(seq, 0, nullptr), t("drift_stats NULL out"));
    pqkv_drift_stats d;
    expect_refused(pqkv_sequence_drift_stats(seq, -1, &d), t("drift_stats layer -1"));
    EXPECT_EQ(pqkv_sequence_max_selected(seq, -1), -1) << state;
    EXPECT_NE(pqkv_last_error_code(), PQKV_OK) << state;
    expect_refused(pqkv_sequence_finish_prefill_layer(seq, -1, nullptr), t("end layer -1"));
    expect_refused(pqkv_sequence_finish_prefill_layer(seq, INT_MAX, nullptr), t("end INT_MAX"));

    // The batched calls: NULL arrays, NULL inside them, sizes out of range.
    pqkv_sequence* seqs[2] = {seq, nullptr};
    const void* queries[2] = {q.data(), q.data()};
    void* outs[2] = {out.data(), out.data()};
    const void* null_queries[1] = {nullptr};
    void* null_outs[1] = {nullptr};
    expect_refused(pqkv_attend_batch(store_, 0, 1, nullptr, queries, outs, PQKV_F32, nullptr),
                   t("attend_batch NULL seqs"));
    expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, nullptr, outs, PQKV_F32, nullptr),
                   t("attend_batch NULL queries"));
    expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, queries, nullptr, PQKV_F32, nullptr),
                   t("attend_batch NULL outs"));
    expect_refused(pqkv_attend_batch(store_, 0, 2, seqs, queries, outs, PQKV_F32, nullptr),
                   t("attend_batch NULL seqs[1]"));
    expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, null_queries, outs, PQKV_F32, nullptr),
                   t("attend_batch NULL queries[0]"));
    expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, queries, null_outs, PQKV_F32, nullptr),
                   t("attend_batch NULL outs[0]"));
    expect_refused(pqkv_attend_batch(store_, 0, -1, seqs, queries, outs, PQKV_F32, nullptr),
                   t("attend_batch n -1"));
    expect_refused(pqkv_attend_batch(nullptr, 0, 1, seqs, queries, outs, PQKV_F32, nullptr),
                   t("attend_batch NULL store"));
    expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, queries, outs, bad_dtype, nullptr),
                   t("attend_batch dtype"));
    std::vector<int32_t> positions(1024), lengths(16);
    const auto select = [&](int n, pqkv_sequence* const* s, const void* const* qs, int32_t* p,
                            int64_t max_selected, int32_t* len) {
      return pqkv_select_batch(store_, 0, n, s, qs, PQKV_F32, p, max_selected, len, nullptr);
    };
    expect_refused(select(1, seqs, queries, nullptr, 64, lengths.data()),
                   t("select NULL positions"));
    expect_refused(select(1, seqs, queries, positions.data(), 64, nullptr),
                   t("select NULL lengths"));
    expect_refused(select(1, seqs, queries, positions.data(), -1, lengths.data()),
                   t("select max_selected -1"));
    expect_refused(select(1, seqs, null_queries, positions.data(), 64, lengths.data()),
                   t("select NULL queries[0]"));
    expect_refused(select(2, seqs, queries, positions.data(), 64, lengths.data()),
                   t("select NULL seqs[1]"));
    expect_refused(select(1, nullptr, queries, positions.data(), 64, lengths.data()),
                   t("select NULL seqs"));
    EXPECT_EQ(pqkv_sequence_length(seq, 0), before) << state;
  }

  pqkv_model_spec spec_{};
  pqkv_store_options so_{};
  pqkv_sequence_options qo_{};
  pqkv_store* store_ = nullptr;
  pqkv_sequence* seq_ = nullptr;
};

TEST_F(CApiBadCallsTest, NullPointersInEveryArgumentAreRefused) {
  pqkv_model_spec spec;
  expect_refused(pqkv_model_spec_preset(nullptr, &spec), "preset NULL name");
  expect_refused(pqkv_model_spec_preset("tiny", nullptr), "preset NULL out");
  pqkv_store* store = nullptr;
  expect_refused(pqkv_store_open(nullptr, &store), "open NULL options");
  expect_refused(pqkv_store_open(&so_, nullptr), "open NULL out");
  pqkv_sequence* seq = nullptr;
  expect_refused(pqkv_sequence_create(store_, nullptr, &qo_, &seq), "create NULL name");
  expect_refused(pqkv_sequence_create(store_, "b", nullptr, &seq), "create NULL options");
  expect_refused(pqkv_sequence_create(store_, "b", &qo_, nullptr), "create NULL out");
  expect_refused(pqkv_sequence_create(nullptr, "b", &qo_, &seq), "create NULL store");
  EXPECT_EQ(seq, nullptr);
  expect_refused(pqkv_sequence_get(store_, nullptr, &seq), "get NULL name");
  expect_refused(pqkv_sequence_get(store_, "a", nullptr), "get NULL out");
  expect_refused(pqkv_sequence_drop(store_, nullptr), "drop NULL name");
  expect_refused(pqkv_sequence_drop(nullptr, "a"), "drop NULL store");
  expect_refused(pqkv_sequence_save(store_, nullptr), "save NULL seq");
  expect_refused(pqkv_sequence_save(nullptr, seq_), "save NULL store");
  expect_refused(pqkv_sequence_open(store_, nullptr, &seq), "open_sequence NULL name");
  expect_refused(pqkv_sequence_open(store_, "a", nullptr), "open_sequence NULL out");
  expect_refused(pqkv_sequence_close(store_, nullptr), "close NULL name");
  expect_refused(pqkv_store_compact(nullptr), "compact NULL store");
  int64_t needed = 0;
  char names[8];
  expect_refused(pqkv_store_saved_sequence_names(store_, nullptr, 8, &needed), "names NULL buf");
  expect_refused(pqkv_store_saved_sequence_names(store_, names, -1, &needed), "names capacity -1");
  expect_refused(pqkv_store_saved_sequence_names(store_, names, 8, nullptr), "names NULL needed");
  expect_refused(pqkv_store_preallocate_dram(nullptr, 1), "preallocate NULL store");
  expect_refused(pqkv_store_preallocate_dram(store_, -1), "preallocate -1");
  EXPECT_EQ(pqkv_store_dram_bytes_used(nullptr), -1);
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(nullptr, 1), -1);
  EXPECT_EQ(pqkv_sequence_length(nullptr, 0), -1);
  EXPECT_EQ(pqkv_sequence_max_selected(nullptr, 0), -1);
  expect_refused(pqkv_sequence_finish_prefill(nullptr), "finish_prefill NULL");
  expect_refused(pqkv_sequence_finish_prefill_with_progress(nullptr, nullptr, nullptr),
                 "finish_prefill_with_progress NULL");
  expect_refused(pqkv_sequence_finish_prefill_layer(nullptr, 0, nullptr), "end layer NULL");
  expect_refused(pqkv_sequence_reserve(nullptr, 1), "reserve NULL");
  expect_refused(pqkv_sequence_sync_length(nullptr, nullptr), "sync_length NULL");
  pqkv_drift_stats d;
  expect_refused(pqkv_sequence_drift_stats(nullptr, 0, &d), "drift_stats NULL seq");
  pqkv_store_close(nullptr);  // documented: does nothing
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK);

  // The sequence was never touched: it takes a prompt and decodes.
  append(seq_, 64, 1);
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq_), PQKV_OK) << pqkv_last_error();
  std::vector<float> q(kQHeads * kDim, 0.25f), out(kQHeads * kDim);
  EXPECT_EQ(pqkv_sequence_attend(seq_, 0, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
}

TEST_F(CApiBadCallsTest, BadArgumentsBeforeAndAfterPrefillChangeNothing) {
  refuse_bad_arguments(seq_, "empty");
  append(seq_, 64, 2);
  refuse_bad_arguments(seq_, "prompt appended");
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq_), PQKV_OK) << pqkv_last_error();
  refuse_bad_arguments(seq_, "prefilled");
  std::vector<float> q(kQHeads * kDim, 0.25f), out(kQHeads * kDim);
  EXPECT_EQ(pqkv_sequence_attend(seq_, 1, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
}

TEST_F(CApiBadCallsTest, CallsOutOfOrderAreRefusedSayingWhy) {
  std::vector<float> q(kQHeads * kDim, 0.25f), out(kQHeads * kDim);
  // Before finish_prefill: nothing to select from.
  expect_refused(pqkv_sequence_attend(seq_, 0, q.data(), out.data(), PQKV_F32, nullptr),
                 "attend before prefill");
  EXPECT_EQ(pqkv_sequence_max_selected(seq_, 0), -1);
  pqkv_drift_stats d;
  expect_refused(pqkv_sequence_drift_stats(seq_, 0, &d), "drift_stats before prefill");
  expect_refused(pqkv_sequence_finish_prefill_layer(seq_, 0, nullptr), "end an empty layer");
  pqkv_sequence* seqs[1] = {seq_};
  const void* queries[1] = {q.data()};
  void* outs[1] = {out.data()};
  expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, queries, outs, PQKV_F32, nullptr),
                 "attend_batch before prefill");
  // Persistence without a directory.
  expect_refused(pqkv_sequence_save(store_, seq_), "save without a directory");
  pqkv_sequence* opened = nullptr;
  expect_refused(pqkv_sequence_open(store_, "a", &opened), "open without a directory");
  EXPECT_EQ(opened, nullptr);
  expect_refused(pqkv_store_compact(store_), "compact without a directory");
  // finish_prefill twice; ending a layer after it.
  append(seq_, 64, 3);
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq_), PQKV_OK) << pqkv_last_error();
  expect_refused(pqkv_sequence_finish_prefill(seq_), "finish_prefill twice");
  expect_refused(pqkv_sequence_finish_prefill_layer(seq_, 0, nullptr), "end a layer after");
  // Close, then every call on the released handle; a second close and drop.
  ASSERT_EQ(pqkv_sequence_close(store_, "a"), PQKV_OK) << pqkv_last_error();
  expect_refused(pqkv_sequence_close(store_, "a"), "close twice");
  expect_refused(pqkv_sequence_drop(store_, "a"), "drop after close");
  std::vector<float> k = random_floats(kKvHeads * kDim, 9);
  expect_refused(pqkv_sequence_append(seq_, 0, k.data(), k.data(), 1, PQKV_F32, nullptr),
                 "append after close");
  expect_refused(pqkv_sequence_attend(seq_, 0, q.data(), out.data(), PQKV_F32, nullptr),
                 "attend after close");
  EXPECT_EQ(pqkv_sequence_length(seq_, 0), -1);
  EXPECT_NE(std::strstr(pqkv_last_error(), "released"), nullptr) << pqkv_last_error();
  expect_refused(pqkv_attend_batch(store_, 0, 1, seqs, queries, outs, PQKV_F32, nullptr),
                 "attend_batch of a closed sequence");
  // A store closed twice: the second changes nothing and says why.
  pqkv_store* other = nullptr;
  ASSERT_EQ(pqkv_store_open(&so_, &other), PQKV_OK) << pqkv_last_error();
  pqkv_store_close(other);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK);
  pqkv_store_close(other);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "closed store"), nullptr) << pqkv_last_error();
  pqkv_sequence* after = nullptr;
  expect_refused(pqkv_sequence_create(other, "b", &qo_, &after), "create on a closed store");
  EXPECT_EQ(after, nullptr);
  // The first store is unharmed.
  pqkv_sequence* b = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store_, "b", &qo_, &b), PQKV_OK) << pqkv_last_error();
  append(b, 64, 4);
  ASSERT_EQ(pqkv_sequence_finish_prefill(b), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_attend(b, 0, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
}

TEST_F(CApiBadCallsTest, BadStoreAndSequenceOptionsAreRefused) {
  struct Case {
    const char* what;
    std::function<void(pqkv_store_options&)> change;
  };
  const std::vector<Case> store_cases = {
      {"zero layers", [](auto& o) { o.spec.num_layers = 0; }},
      {"negative KV heads", [](auto& o) { o.spec.num_kv_heads = -2; }},
      {"q heads not a multiple of KV heads", [](auto& o) { o.spec.num_q_heads = 3; }},
      {"head_dim 0", [](auto& o) { o.spec.head_dim = 0; }},
      {"dtype 7", [](auto& o) { std::memset(&o.spec.dtype, 7, 1); }},
      {"negative DRAM budget", [](auto& o) { o.dram_budget_bytes = -1; }},
      {"negative HBM budget", [](auto& o) { o.hbm_budget_bytes = -1; }},
      {"negative threads", [](auto& o) { o.num_threads = -1; }},
      // TBB made (or crashed making) every thread asked for.
      {"2^31 - 1 threads", [](auto& o) { o.num_threads = 2147483647; }},
      {"negative block cache", [](auto& o) { o.block_cache_bytes = -5; }},
      {"block tokens 3", [](auto& o) { o.block_cache_tokens = 3; }},
      {"block tokens -64", [](auto& o) { o.block_cache_tokens = -64; }},
      {"aging -1", [](auto& o) { o.block_cache_aging_steps = -1; }},
      {"admit -1", [](auto& o) { o.block_cache_admit_steps = -1; }},
      {"spill without a directory", [](auto& o) { o.spill_to_disk = 1; }},
      {"prealloc -1", [](auto& o) { o.dram_prealloc_bytes = -1; }},
      {"cuda device 1000", [](auto& o) { o.cuda_device = 1000; }},
      {"cuda device -2 (read as the cpu before)", [](auto& o) { o.cuda_device = -2; }},
      {"cuda device INT_MIN", [](auto& o) { o.cuda_device = INT_MIN; }},
      {"directory that is a file", [](auto& o) { o.directory = "/proc/version"; }},
  };
  for (const Case& c : store_cases) {
    pqkv_store_options o;
    pqkv_store_options_init(&o, &spec_);
    c.change(o);
    pqkv_store* s = nullptr;
    expect_refused(pqkv_store_open(&o, &s), c.what);
    EXPECT_EQ(s, nullptr) << c.what;
  }
  const std::vector<std::pair<const char*, std::function<void(pqkv_sequence_options&)>>> seq_cases =
      {
          {"pq_bits 0", [](auto& o) { o.pq_bits = 0; }},
          {"pq_bits 9", [](auto& o) { o.pq_bits = 9; }},
          {"pq_m 5", [](auto& o) { o.pq_m = 5; }},
          {"pq_m -4", [](auto& o) { o.pq_m = -4; }},
          {"kmeans_iters -1", [](auto& o) { o.kmeans_iters = -1; }},
          {"sink -1", [](auto& o) { o.sink.tokens = -1; }},
          {"window ratio 2", [](auto& o) { o.window.ratio = 2; }},
          {"top_k ratio NaN", [](auto& o) { o.top_k.ratio = std::nan(""); }},
          {"aggregation 5", [](auto& o) { std::memset(&o.aggregation, 5, 1); }},
          {"selection bogus", [](auto& o) { o.selection = "bogus"; }},
          {"selection empty", [](auto& o) { o.selection = ""; }},
          {"refit_threshold 0.5", [](auto& o) { o.refit_threshold = 0.5; }},
          {"refit_threshold NaN", [](auto& o) { o.refit_threshold = std::nan(""); }},
          {"refit_min_tokens -1", [](auto& o) { o.refit_min_tokens = -1; }},
          {"max_train_points -1", [](auto& o) { o.max_train_points_per_centroid = -1; }},
      };
  for (const auto& [what, change] : seq_cases) {
    pqkv_sequence_options o;
    pqkv_sequence_options_init(&o);
    change(o);
    pqkv_sequence* s = nullptr;
    expect_refused(pqkv_sequence_create(store_, "bad", &o, &s), what);
    EXPECT_EQ(s, nullptr) << what;
  }
  pqkv_sequence* none = nullptr;
  EXPECT_EQ(pqkv_sequence_get(store_, "bad", &none), PQKV_NOT_FOUND);
}

}  // namespace
