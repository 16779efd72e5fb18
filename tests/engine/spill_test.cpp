// StoreOptions::spill_to_disk: a sequence past the DRAM budget moves cold
// rows to spill files and answers exactly as the same sequence held all in
// DRAM; the budget is never passed; a damaged spill page is a Corruption
// naming the file and page while the rest of the store keeps working; drop
// removes the files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/host_memory.h"
#include "engine_test_util.h"
#include "pqkv/store.h"
#include "storage/kv_row_store.h"
#include "test_util.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kPrompt = 4096;
constexpr int kDecode = 6;

SequenceOptions spill_sequence_options() {
  SequenceOptions o;
  o.pq = PqConfig{4, 4};
  o.budget = BudgetPolicy::ratio_of_context(0.1);
  o.budget.sink = {16, 0.0};
  // A short window: the rows that must stay in DRAM (sink and window) fit
  // in a tenth of the sequence, so 85% can go to disk.
  o.budget.window = {64, 0.0};
  return o;
}

class SpillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    dir_ =
        fs::temp_directory_path() / ("pqkv-spill-test-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  StoreOptions spill_options(int64_t budget) const {
    StoreOptions o = cpu_store_options(ModelSpec::tiny());
    o.directory = dir_.string();
    o.dram_budget_bytes = budget;
    o.spill_to_disk = true;
    return o;
  }

  fs::path dir_;
};

// Prefill, build the indexes, then decode: appends and attends with queries
// from `seed`; returns every output, and checks the budget after each call.
std::vector<float> run(Store& store, Sequence& seq, uint64_t seed, int64_t budget) {
  const ModelSpec& spec = seq.spec();
  std::vector<float> outs;
  PQKV_EXPECT_OK(append_random(&seq, kPrompt, seed));
  if (budget > 0) {
    EXPECT_LE(store.dram_bytes_used(), budget);
  }
  PQKV_EXPECT_OK(seq.finish_prefill());
  for (int step = 0; step < kDecode; ++step) {
    PQKV_EXPECT_OK(append_random(&seq, 1, seed + 1 + step));
    if (budget > 0) {
      EXPECT_LE(store.dram_bytes_used(), budget);
    }
    for (int l = 0; l < spec.num_layers; ++l) {
      auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim,
                             seed * 31 + step * 7 + l);
      std::vector<float> out(q.size());
      const Status s =
          seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                     host_view(out.data(), {spec.num_q_heads, spec.head_dim}), Stream::host());
      EXPECT_TRUE(s.ok()) << s.to_string();
      outs.insert(outs.end(), out.begin(), out.end());
    }
  }
  return outs;
}

TEST_F(SpillTest, SpilledSequenceAttendsAsAllInDram) {
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t total = sequence_bytes(spec, kPrompt + kDecode);
  const uint64_t base_seed = std::random_device{}();
  for (const double fraction : {0.25, 0.5, 0.85}) {
    const uint64_t seed = base_seed + static_cast<uint64_t>(fraction * 100);
    SCOPED_TRACE("fraction on disk " + std::to_string(fraction) + ", seed " + std::to_string(seed));
    std::printf("spill fraction %.2f seed %llu\n", fraction, static_cast<unsigned long long>(seed));
    auto dram_store = Store::open(cpu_store_options(spec));
    PQKV_ASSERT_OK(dram_store);
    auto dram_seq = (*dram_store)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(dram_seq);
    const std::vector<float> expected = run(**dram_store, **dram_seq, seed, 0);

    const auto budget = static_cast<int64_t>((1.0 - fraction) * static_cast<double>(total));
    auto store = Store::open(spill_options(budget));
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(seq);
    const std::vector<float> got = run(**store, **seq, seed, budget);
    EXPECT_FALSE(spill_files(dir_).empty()) << "nothing was spilled";
    ASSERT_EQ(got.size(), expected.size());
    EXPECT_EQ(got, expected);

    // The exact reference reads the spilled rows too.
    std::vector<float> q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, 5);
    std::vector<float> a(q.size()), b(q.size());
    const TensorView qv = host_view(q.data(), {spec.num_q_heads, spec.head_dim});
    PQKV_EXPECT_OK((*dram_seq)->attend_exact(
        0, qv, host_view(a.data(), {spec.num_q_heads, spec.head_dim}), Stream::host()));
    PQKV_EXPECT_OK((*seq)->attend_exact(
        0, qv, host_view(b.data(), {spec.num_q_heads, spec.head_dim}), Stream::host()));
    EXPECT_EQ(a, b);

    // Dropping the sequence removes its files.
    seq->reset();
    PQKV_EXPECT_OK((*store)->drop("s"));
    EXPECT_TRUE(spill_files(dir_).empty());
  }
}

// Outputs of attend over every layer for queries from `seed`.
std::vector<float> attend_all(Sequence& seq, uint64_t seed) {
  const ModelSpec& spec = seq.spec();
  std::vector<float> outs;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + l);
    std::vector<float> out(q.size());
    PQKV_EXPECT_OK(seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                              host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                              Stream::host()));
    outs.insert(outs.end(), out.begin(), out.end());
  }
  return outs;
}

TEST_F(SpillTest, SpilledSequenceSavesAndReopensAsItWas) {
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t budget = sequence_bytes(spec, kPrompt + kDecode) / 2;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<float> before;
  {
    auto store = Store::open(spill_options(budget));
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(seq);
    run(**store, **seq, seed, budget);
    ASSERT_FALSE(spill_files(dir_).empty()) << "nothing was spilled";
    before = attend_all(**seq, seed + 1000);
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
  // Reopened with room for every row, and again under the same budget
  // (the load spills as it goes).
  for (const int64_t reopen_budget : {int64_t{0}, budget}) {
    SCOPED_TRACE("reopened under a DRAM budget of " + std::to_string(reopen_budget));
    StoreOptions o = spill_options(reopen_budget);
    o.spill_to_disk = reopen_budget > 0;
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->open_sequence("s");
    PQKV_ASSERT_OK(seq);
    EXPECT_EQ((*seq)->length(0), kPrompt + kDecode);
    EXPECT_EQ(attend_all(**seq, seed + 1000), before);
    if (reopen_budget > 0) {
      EXPECT_LE((*store)->dram_bytes_used(), reopen_budget);
    }
  }
}

TEST_F(SpillTest, CorruptSpillPageIsNamedAndTheStoreStaysUsable) {
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t budget = sequence_bytes(spec, kPrompt) / 2;
  auto store = Store::open(spill_options(budget));
  PQKV_ASSERT_OK(store);
  auto good = (*store)->create_sequence("good", spill_sequence_options());
  PQKV_ASSERT_OK(good);
  auto bad = (*store)->create_sequence("bad", spill_sequence_options());
  PQKV_ASSERT_OK(bad);
  PQKV_ASSERT_OK(append_random(good->get(), kPrompt / 4, 2));
  PQKV_ASSERT_OK((*good)->finish_prefill());
  PQKV_ASSERT_OK(append_random(bad->get(), kPrompt, 1));
  PQKV_ASSERT_OK((*bad)->finish_prefill());
  const std::vector<fs::path> files = spill_files(dir_);
  ASSERT_FALSE(files.empty());

  // Flip one byte in every page of every file of `bad` (the second
  // sequence: files seq1-*).
  std::vector<fs::path> damaged;
  for (const fs::path& f : files) {
    if (f.filename().string().rfind("seq1-", 0) != 0) continue;
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    const auto size = static_cast<int64_t>(fs::file_size(f));
    for (int64_t off = 100; off < size; off += 4096) {
      io.seekg(off);
      char c = 0;
      io.read(&c, 1);
      c = static_cast<char>(c ^ 0x5a);
      io.seekp(off);
      io.write(&c, 1);
    }
    damaged.push_back(f);
  }
  ASSERT_FALSE(damaged.empty());

  // Exact attention reads every row, the spilled ones too.
  std::vector<float> q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, 9);
  std::vector<float> out(q.size());
  const TensorView qv = host_view(q.data(), {spec.num_q_heads, spec.head_dim});
  const TensorView ov = host_view(out.data(), {spec.num_q_heads, spec.head_dim});
  const Status s = (*bad)->attend_exact(0, qv, ov, Stream::host());
  ASSERT_EQ(s.code(), StatusCode::kCorruption) << s.to_string();
  bool named = false;
  for (const fs::path& f : damaged)
    named = named || s.message().find(f.filename().string()) != std::string::npos;
  EXPECT_TRUE(named) << s.to_string();
  EXPECT_NE(s.message().find("page"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("drop the sequence and prefill it again"), std::string::npos)
      << s.to_string();

  // The other sequence still appends (spilling its own cold rows: the
  // budget is full) and attends.
  PQKV_EXPECT_OK(append_random(good->get(), 1, 3));
  for (int l = 0; l < spec.num_layers; ++l) {
    PQKV_EXPECT_OK((*good)->attend(l, qv, ov, Stream::host()));
    PQKV_EXPECT_OK((*good)->attend_exact(l, qv, ov, Stream::host()));
  }
}

// Decodes with each layer's queries repeating from step to step (so picks
// recur and cache blocks hit); returns every output and adds up the traces.
std::vector<float> decode_repeating(Sequence& seq, uint64_t seed, FetchTrace* total) {
  const ModelSpec& spec = seq.spec();
  std::vector<float> outs;
  PQKV_EXPECT_OK(append_random(&seq, kPrompt, seed));
  PQKV_EXPECT_OK(seq.finish_prefill());
  for (int step = 0; step < 8; ++step) {
    PQKV_EXPECT_OK(append_random(&seq, 1, seed + 1 + step));
    for (int l = 0; l < spec.num_layers; ++l) {
      auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + l);
      std::vector<float> out(q.size());
      AttendTrace trace;
      PQKV_EXPECT_OK(seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                Stream::host(), &trace));
      outs.insert(outs.end(), out.begin(), out.end());
      total->cache_hits += trace.fetch.cache_hits;
      total->ssd_rows += trace.fetch.ssd_rows;
      total->dram_rows += trace.fetch.dram_rows;
    }
  }
  return outs;
}

TEST_F(SpillTest, BlockCacheServesSpilledBlocksWithTheSameResults) {
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t total = sequence_bytes(spec, kPrompt + 8);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::printf("spill with a block cache, seed %llu\n", static_cast<unsigned long long>(seed));
  const auto open = [&](int64_t budget, int64_t cache_bytes) {
    StoreOptions o = budget > 0 ? spill_options(budget) : cpu_store_options(spec);
    o.block_cache_bytes = cache_bytes;
    o.block_cache_tokens = 32;
    auto store = Store::open(o);
    EXPECT_TRUE(store.ok()) << store.status().to_string();
    return std::move(store).value();
  };
  const int64_t cache_bytes = 64 * 32 * spec.row_bytes();
  FetchTrace dram_trace, spill_trace, cached_trace;
  auto dram = open(0, 0);
  auto dram_seq = dram->create_sequence("s", spill_sequence_options());
  PQKV_ASSERT_OK(dram_seq);
  const std::vector<float> expected = decode_repeating(**dram_seq, seed, &dram_trace);
  {
    auto store = open(total / 2, 0);
    auto seq = store->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(seq);
    EXPECT_EQ(decode_repeating(**seq, seed, &spill_trace), expected);
  }
  fs::remove_all(dir_);
  auto store = open(total / 2, cache_bytes);
  auto seq = store->create_sequence("s", spill_sequence_options());
  PQKV_ASSERT_OK(seq);
  PQKV_ASSERT_OK((*seq)->reserve(kPrompt + 8));  // takes the cache's slots
  const std::vector<float> got = decode_repeating(**seq, seed, &cached_trace);
  EXPECT_FALSE(spill_files(dir_).empty()) << "nothing was spilled";
  EXPECT_EQ(got, expected);
  EXPECT_GT(spill_trace.ssd_rows, 0);
  EXPECT_GT(cached_trace.cache_hits, 0);
  // Hot spilled blocks were admitted (read back whole) and then served
  // from their slots instead of the disk.
  EXPECT_LT(cached_trace.ssd_rows, spill_trace.ssd_rows);
}

TEST_F(SpillTest, OptionsAreChecked) {
  StoreOptions o = spill_options(0);
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
  o = spill_options(1 << 20);
  o.directory.clear();
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
  // A cpu store spills and caches at once (a CUDA store does not:
  // spill_cuda_test.cpp).
  o = spill_options(1 << 20);
  o.block_cache_bytes = 1 << 20;
  PQKV_EXPECT_OK(o.validate());
}

TEST_F(SpillTest, NoColdRowsLeftIsResourceExhausted) {
  const ModelSpec spec = ModelSpec::tiny();
  // Room for the sink and window blocks of a short prompt only.
  auto store = Store::open(spill_options(storage::KvRowStore::block_bytes(spec) * 8));
  PQKV_ASSERT_OK(store);
  SequenceOptions o = spill_sequence_options();
  o.budget.window = {0, 0.9};
  auto seq = (*store)->create_sequence("s", o);
  PQKV_ASSERT_OK(seq);
  const Status s = append_random(seq->get(), kPrompt, 1);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_LE((*store)->dram_bytes_used(), storage::KvRowStore::block_bytes(spec) * 8);
}

// With rows on disk no DRAM is taken up front, so a reserve past the machine's
// memory reaches the decode step's scratch: it is refused before anything is
// sized (a sanitizer build aborted on the allocation), and the sequence stays
// usable.
TEST_F(SpillTest, ReservePastTheMachinesMemoryIsResourceExhausted) {
  const ModelSpec spec = ModelSpec::tiny();
  auto store = Store::open(spill_options(storage::KvRowStore::block_bytes(spec) * 64));
  PQKV_ASSERT_OK(store);
  auto seq = (*store)->create_sequence("s", spill_sequence_options());
  PQKV_ASSERT_OK(seq);
  // The step's scratch takes at least 0.4 bytes a token here (a tenth of the
  // tokens per KV head, 2 heads, 4-byte positions): 16 bytes of machine
  // memory a token passes it, up to the 2^40 tokens a reserve allows.
  const int64_t past = std::min<int64_t>(int64_t{1} << 40, int64_t(16 * host_memory_bytes()));
  for (const int64_t tokens : {past / 2, past}) {
    const Status s = (*seq)->reserve(tokens);
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << tokens << ": " << s.to_string();
  }
  PQKV_EXPECT_OK((*seq)->reserve(kPrompt + kDecode));
  PQKV_EXPECT_OK(append_random(seq->get(), kPrompt, 3));
}

}  // namespace
}  // namespace pqkv::testing
