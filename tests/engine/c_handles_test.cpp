// The C ABI's handles: a handle used after its sequence was dropped or
// closed, after its store closed, one of the other kind, of another store, or
// made up is refused with PQKV_INVALID_ARGUMENT and a message that says which,
// never followed (the ASan build checks that nothing freed is read); handles
// released on one thread while others call with them.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "pqkv/pqkv.h"
#include "test_util.h"

namespace {

constexpr int64_t kTokens = 96;

struct Tiny {
  pqkv_model_spec spec{};
  pqkv_store_options so{};
  pqkv_sequence_options qo{};
  Tiny() {
    EXPECT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
    pqkv_store_options_init(&so, &spec);
    so.num_threads = 2;
    pqkv_sequence_options_init(&qo);
  }
  pqkv_store* open() {
    pqkv_store* store = nullptr;
    EXPECT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
    return store;
  }
  // A prefilled sequence of kTokens tokens in every layer.
  pqkv_sequence* prefilled(pqkv_store* store, const char* name, uint64_t seed) {
    pqkv_sequence* seq = nullptr;
    EXPECT_EQ(pqkv_sequence_create(store, name, &qo, &seq), PQKV_OK) << pqkv_last_error();
    const auto k = pqkv::testing::random_floats(kTokens * spec.num_kv_heads * spec.head_dim, seed);
    for (int l = 0; l < spec.num_layers; ++l) {
      EXPECT_EQ(pqkv_sequence_append(seq, l, k.data(), k.data(), kTokens, PQKV_F32, nullptr),
                PQKV_OK)
          << pqkv_last_error();
    }
    EXPECT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
    return seq;
  }
  std::vector<float> queries(uint64_t seed) const {
    return pqkv::testing::random_floats(spec.num_q_heads * spec.head_dim, seed);
  }
};

bool error_says(const char* text) {
  return std::strstr(pqkv_last_error(), text) != nullptr;
}

// Every call that takes a sequence handle refuses `seq` with
// PQKV_INVALID_ARGUMENT and a message containing `why`.
void expect_refused_everywhere(pqkv_store* store, pqkv_sequence* seq, const Tiny& t,
                               const char* why) {
  std::vector<float> q = t.queries(5), out(q.size(), 7.0f);
  const std::vector<float> before = out;
  const auto k = pqkv::testing::random_floats(t.spec.num_kv_heads * t.spec.head_dim, 6);
  pqkv_drift_stats drift{};
  const auto refused = [&](pqkv_status s, const char* call) {
    EXPECT_EQ(s, PQKV_INVALID_ARGUMENT) << call << ": " << pqkv_last_error();
    EXPECT_TRUE(error_says(why)) << call << ": " << pqkv_last_error();
    EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT) << call;
  };
  refused(pqkv_sequence_append(seq, 0, k.data(), k.data(), 1, PQKV_F32, nullptr), "append");
  refused(pqkv_sequence_finish_prefill(seq), "finish_prefill");
  refused(pqkv_sequence_finish_prefill_layer(seq, 0, nullptr), "finish_prefill_layer");
  refused(pqkv_sequence_finish_prefill_with_progress(seq, nullptr, nullptr),
          "finish_prefill_with_progress");
  refused(pqkv_sequence_attend(seq, 0, q.data(), out.data(), PQKV_F32, nullptr), "attend");
  refused(pqkv_sequence_attend_exact(seq, 0, q.data(), out.data(), PQKV_F32, nullptr),
          "attend_exact");
  refused(pqkv_sequence_reserve(seq, 1000), "reserve");
  refused(pqkv_sequence_sync_length(seq, nullptr), "sync_length");
  refused(pqkv_sequence_drift_stats(seq, 0, &drift), "drift_stats");
  EXPECT_EQ(pqkv_sequence_length(seq, 0), -1);
  refused(pqkv_last_error_code(), "length");
  EXPECT_EQ(pqkv_sequence_max_selected(seq, 0), -1);
  refused(pqkv_last_error_code(), "max_selected");
  EXPECT_EQ(out, before) << "a refused attend wrote its output";
  if (store != nullptr) {
    refused(pqkv_sequence_save(store, seq), "save");
    const void* qs[] = {q.data()};
    void* outs[] = {out.data()};
    int32_t positions[2 * 200], lengths[2];
    refused(pqkv_attend_batch(store, 0, 1, &seq, qs, outs, PQKV_F32, nullptr), "attend_batch");
    refused(pqkv_select_batch(store, 0, 1, &seq, qs, PQKV_F32, positions, 200, lengths, nullptr),
            "select_batch");
  }
}

TEST(CHandlesTest, ADroppedSequenceHandleIsRefusedByEveryCall) {
  Tiny t;
  pqkv_store* store = t.open();
  pqkv_sequence* seq = t.prefilled(store, "a", 1);
  pqkv_sequence* copy = nullptr;
  ASSERT_EQ(pqkv_sequence_get(store, "a", &copy), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(copy, seq) << "get gives the handle the sequence has";
  ASSERT_EQ(pqkv_sequence_drop(store, "a"), PQKV_OK) << pqkv_last_error();
  expect_refused_everywhere(store, seq, t, "released sequence handle");
  EXPECT_TRUE(error_says("pqkv_sequence_get")) << "says what to do: " << pqkv_last_error();
  // A second drop names the missing sequence; the store keeps working.
  EXPECT_EQ(pqkv_sequence_drop(store, "a"), PQKV_NOT_FOUND);
  pqkv_sequence* fresh = t.prefilled(store, "a", 2);
  EXPECT_NE(fresh, seq) << "a handle is never reused";
  EXPECT_EQ(pqkv_sequence_length(fresh, 0), kTokens);
  EXPECT_EQ(pqkv_sequence_length(seq, 0), -1) << "the old handle stays released";
  pqkv_store_close(store);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK);
}

TEST(CHandlesTest, AClosedSequenceHandleIsRefusedAndReopeningGivesANewOne) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() /
      ("pqkv_c_handles_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
       std::to_string(reinterpret_cast<uintptr_t>(&dir)));
  std::filesystem::remove_all(dir);
  Tiny t;
  const std::string dir_text = dir.string();
  t.so.directory = dir_text.c_str();
  pqkv_store* store = t.open();
  pqkv_sequence* seq = t.prefilled(store, "s", 3);
  ASSERT_EQ(pqkv_sequence_save(store, seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_close(store, "s"), PQKV_OK) << pqkv_last_error();
  expect_refused_everywhere(store, seq, t, "released sequence handle");
  pqkv_sequence* reopened = nullptr;
  ASSERT_EQ(pqkv_sequence_open(store, "s", &reopened), PQKV_OK) << pqkv_last_error();
  EXPECT_NE(reopened, seq);
  EXPECT_EQ(pqkv_sequence_length(reopened, 1), kTokens);
  EXPECT_EQ(pqkv_sequence_length(seq, 1), -1);
  pqkv_store_close(store);
  std::filesystem::remove_all(dir);
}

TEST(CHandlesTest, AClosedStoreAndItsSequencesAreRefused) {
  Tiny t;
  pqkv_store* store = t.open();
  pqkv_sequence* seq = t.prefilled(store, "a", 4);
  pqkv_store_close(store);
  ASSERT_EQ(pqkv_last_error_code(), PQKV_OK) << pqkv_last_error();
  expect_refused_everywhere(nullptr, seq, t, "its store was closed");

  // Every call that takes the store.
  pqkv_sequence* out = reinterpret_cast<pqkv_sequence*>(&t);  // must be set to NULL
  const auto refused = [&](pqkv_status s, const char* call) {
    EXPECT_EQ(s, PQKV_INVALID_ARGUMENT) << call << ": " << pqkv_last_error();
    EXPECT_TRUE(error_says("closed store")) << call << ": " << pqkv_last_error();
  };
  refused(pqkv_sequence_create(store, "b", &t.qo, &out), "create");
  EXPECT_EQ(out, nullptr);
  refused(pqkv_sequence_get(store, "a", &out), "get");
  refused(pqkv_sequence_open(store, "a", &out), "open");
  refused(pqkv_sequence_drop(store, "a"), "drop");
  refused(pqkv_sequence_close(store, "a"), "close");
  refused(pqkv_sequence_save(store, seq), "save");
  refused(pqkv_store_compact(store), "compact");
  refused(pqkv_store_preallocate_dram(store, 1), "preallocate_dram");
  int64_t needed = 0;
  refused(pqkv_store_saved_sequence_names(store, nullptr, 0, &needed), "saved_sequence_names");
  EXPECT_EQ(pqkv_store_dram_bytes_used(store), -1);
  refused(pqkv_last_error_code(), "dram_bytes_used");
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(store, 10), -1);
  refused(pqkv_last_error_code(), "dram_bytes_for_tokens");
  refused(pqkv_attend_batch(store, 0, 0, nullptr, nullptr, nullptr, PQKV_F32, nullptr),
          "attend_batch");

  // A second close changes nothing and says so.
  pqkv_store_close(store);
  refused(pqkv_last_error_code(), "a second close");
  pqkv_store_close(nullptr);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK) << "closing NULL does nothing";
}

TEST(CHandlesTest, MadeUpWrongKindAndForeignHandlesAreRefused) {
  Tiny t;
  pqkv_store* a = t.open();
  pqkv_store* b = t.open();
  pqkv_sequence* seq = t.prefilled(a, "x", 5);
  std::vector<float> q = t.queries(8), out(q.size());

  // Made up: a stack address, small integers, all ones, a store handle's bits
  // with the serial number changed to one never given.
  int local = 0;
  const uintptr_t made_up[] = {reinterpret_cast<uintptr_t>(&local), 1, 0x1000, ~uintptr_t{0},
                               reinterpret_cast<uintptr_t>(a) + (uintptr_t{1} << 40)};
  for (uintptr_t v : made_up) {
    SCOPED_TRACE(v);
    auto* bad_seq = reinterpret_cast<pqkv_sequence*>(v);
    auto* bad_store = reinterpret_cast<pqkv_store*>(v);
    EXPECT_EQ(pqkv_sequence_attend(bad_seq, 0, q.data(), out.data(), PQKV_F32, nullptr),
              PQKV_INVALID_ARGUMENT);
    EXPECT_TRUE(error_says("is not a handle pqkv gave")) << pqkv_last_error();
    EXPECT_EQ(pqkv_sequence_length(bad_seq, 0), -1);
    EXPECT_EQ(pqkv_store_preallocate_dram(bad_store, 1), PQKV_INVALID_ARGUMENT);
    EXPECT_TRUE(error_says("is not a handle pqkv gave")) << pqkv_last_error();
    pqkv_store_close(bad_store);
    EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT);
  }

  // The other kind.
  EXPECT_EQ(pqkv_sequence_length(reinterpret_cast<pqkv_sequence*>(a), 0), -1);
  EXPECT_TRUE(error_says("is a pqkv_store* handle, not a pqkv_sequence*")) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_compact(reinterpret_cast<pqkv_store*>(seq)), PQKV_INVALID_ARGUMENT);
  EXPECT_TRUE(error_says("is a pqkv_sequence* handle, not a pqkv_store*")) << pqkv_last_error();
  pqkv_store_close(reinterpret_cast<pqkv_store*>(seq));
  EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_sequence_length(seq, 0), kTokens) << "a refused close closed nothing";

  // A sequence of another store.
  EXPECT_EQ(pqkv_sequence_save(b, seq), PQKV_INVALID_ARGUMENT);
  EXPECT_TRUE(error_says("another store")) << pqkv_last_error();
  const void* qs[] = {q.data()};
  void* outs[] = {out.data()};
  EXPECT_EQ(pqkv_attend_batch(b, 0, 1, &seq, qs, outs, PQKV_F32, nullptr), PQKV_INVALID_ARGUMENT);
  EXPECT_TRUE(error_says("seqs[0] is a sequence of another store")) << pqkv_last_error();
  EXPECT_EQ(pqkv_attend_batch(a, 0, 1, &seq, qs, outs, PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
  pqkv_store_close(b);
  pqkv_store_close(a);
}

// Threads decode their own sequences while the main thread drops some,
// closes one, and closes the store under them: every call answers OK or
// PQKV_INVALID_ARGUMENT, and after the store's close only the latter.
TEST(CHandlesTest, ReleasingHandlesWhileOtherThreadsUseThemIsSafe) {
  const unsigned seed = ::testing::UnitTest::GetInstance()->random_seed();
  std::printf("seed %u\n", seed);
  Tiny t;
  pqkv_store* store = t.open();
  constexpr int kThreads = 4;
  std::vector<pqkv_sequence*> seqs;
  for (int i = 0; i < kThreads; ++i) {
    std::string name = "t";
    name += std::to_string(i);
    seqs.push_back(t.prefilled(store, name.c_str(), seed + i));
  }
  std::atomic<bool> closed{false};
  std::atomic<int> bad{0}, ok_after_close{0}, calls{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      const auto k = pqkv::testing::random_floats(t.spec.num_kv_heads * t.spec.head_dim, seed + i);
      std::vector<float> q = t.queries(seed + 100 + i), out(q.size());
      for (int step = 0; step < 400; ++step) {
        const bool was_closed = closed.load();
        pqkv_status s = pqkv_sequence_append(seqs[i], step % t.spec.num_layers, k.data(), k.data(),
                                             1, PQKV_F32, nullptr);
        if (s == PQKV_OK) {
          s = pqkv_sequence_attend(seqs[i], step % t.spec.num_layers, q.data(), out.data(),
                                   PQKV_F32, nullptr);
        }
        pqkv_sequence* got = nullptr;
        const pqkv_status g = pqkv_sequence_get(store, "t0", &got);
        if (s != PQKV_OK && s != PQKV_INVALID_ARGUMENT && s != PQKV_FAILED_PRECONDITION) ++bad;
        if (g != PQKV_OK && g != PQKV_NOT_FOUND && g != PQKV_INVALID_ARGUMENT) ++bad;
        if (was_closed && (s == PQKV_OK || g == PQKV_OK)) ++ok_after_close;
        ++calls;
      }
    });
  }
  while (calls.load() < 40)
    std::this_thread::yield();
  EXPECT_EQ(pqkv_sequence_drop(store, "t1"), PQKV_OK) << pqkv_last_error();
  while (calls.load() < 120)
    std::this_thread::yield();
  EXPECT_EQ(pqkv_sequence_drop(store, "t0"), PQKV_OK) << pqkv_last_error();
  while (calls.load() < 240)
    std::this_thread::yield();
  pqkv_store_close(store);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK) << pqkv_last_error();
  closed.store(true);  // after the close: calls that read it started after it
  for (auto& th : threads)
    th.join();
  EXPECT_EQ(bad.load(), 0) << "a call answered something other than OK or a refusal";
  EXPECT_EQ(ok_after_close.load(), 0) << "a call started after the close succeeded";
  for (pqkv_sequence* seq : seqs)
    EXPECT_EQ(pqkv_sequence_length(seq, 0), -1);
}

}  // namespace
