// `pqkv inspect DIR --recall` and the computation behind it
// (tools/index_recall.h): exact keys select the exact top-K (recall 1), int4
// keys nearly so, PQ less; the stored keys read back are the appended ones in
// the row dtype; the JSON and the usage errors of the flags.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "pqkv/store.h"
#include "test_util.h"
#include "tools/cli_run.h"
#include "tools/index_recall.h"

namespace pqkv::tools {
namespace {

constexpr int64_t kTokens = 700;
constexpr uint64_t kSeed = 20261201;

// The keys appended to every layer: Normal(0, 1) from kSeed, layer l scaled
// by l + 1 so that layers differ.
std::vector<float> layer_keys(const ModelSpec& spec, int layer) {
  auto k = testing::random_floats(static_cast<size_t>(kTokens) * spec.num_kv_heads * spec.head_dim,
                                  kSeed);
  for (float& x : k)
    x *= static_cast<float>(layer + 1);
  return k;
}

// Sequences "exact", "int4", "int8" and "pq" (m 8, 6 bits) of kTokens tokens,
// prefilled, and "raw", saved before finish_prefill (no index).
void write_store(const fs::path& dir) {
  StoreOptions o;
  o.spec = ModelSpec::tiny();
  o.directory = dir.string();
  o.model_fingerprint = "tiny-recall";
  auto store = Store::open(o);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const int kv = o.spec.num_kv_heads, d = o.spec.head_dim;
  const auto values = testing::random_floats(static_cast<size_t>(kTokens * kv * d), kSeed + 1);
  for (const char* name : {"exact", "int4", "int8", "pq", "raw"}) {
    SequenceOptions so;
    const std::string n = name;
    if (n != "raw") {
      auto sel = SelectionConfig::parse(n);
      ASSERT_TRUE(sel.ok()) << sel.status().to_string();
      so.selection = *sel;
    }
    so.pq.m = 8;
    so.pq.bits = 6;
    auto seq = (*store)->create_sequence(name, so);
    ASSERT_TRUE(seq.ok()) << name << ": " << seq.status().to_string();
    for (int l = 0; l < o.spec.num_layers; ++l) {
      const auto keys = layer_keys(o.spec, l);
      PQKV_ASSERT_OK((*seq)->append(l, host_view(keys.data(), {kTokens, kv, d}),
                                    host_view(values.data(), {kTokens, kv, d}), Stream::host()));
    }
    if (n != "raw") PQKV_ASSERT_OK((*seq)->finish_prefill());
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
}

TEST(InspectReadOnlyTest, ReadsAStoreThatIsOpenAndWritesNothingThere) {
  TempDir dir;
  StoreOptions o;
  o.spec = ModelSpec::tiny();
  o.directory = dir.path().string();
  auto store = Store::open(o);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto seq = (*store)->create_sequence("s", SequenceOptions());
  ASSERT_TRUE(seq.ok()) << seq.status().to_string();
  const int kv = o.spec.num_kv_heads, d = o.spec.head_dim;
  const auto values = testing::random_floats(static_cast<size_t>(kTokens * kv * d), kSeed + 2);
  for (int l = 0; l < o.spec.num_layers; ++l) {
    const auto keys = layer_keys(o.spec, l);
    PQKV_ASSERT_OK((*seq)->append(l, host_view(keys.data(), {kTokens, kv, d}),
                                  host_view(values.data(), {kTokens, kv, d}), Stream::host()));
  }
  PQKV_ASSERT_OK((*seq)->finish_prefill());
  PQKV_ASSERT_OK((*store)->save(**seq));
  // The store stays open (holding RocksDB's lock) while inspect reads it.
  const auto before = testing::file_listing(dir.path());
  const CliRun i = pqkv("inspect '" + dir.path().string() + "' --json --verify --recall");
  ASSERT_EQ(i.code, 0) << describe(i);
  const auto j = nlohmann::json::parse(i.out);
  ASSERT_EQ(j["sequences"].size(), 1u);
  EXPECT_EQ(j["sequences"][0]["name"], "s");
  EXPECT_EQ(j["sequences"][0]["tokens"], kTokens);
  EXPECT_EQ(testing::file_listing(dir.path()), before);
}

class IndexRecallTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    write_store(dir_->path());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string store() { return dir_->path().string(); }
  std::unique_ptr<engine::SavedSequences> open() const {
    auto saved = engine::SavedSequences::open(store(), engine::SavedSequences::Access::kReadOnly);
    EXPECT_TRUE(saved.ok()) << saved.status().to_string();
    return saved.ok() ? std::move(*saved) : nullptr;
  }

  static TempDir* dir_;
};
TempDir* IndexRecallTest::dir_ = nullptr;

TEST_F(IndexRecallTest, ReadKeysReturnsTheStoredKeys) {
  auto saved = open();
  ASSERT_NE(saved, nullptr);
  const ModelSpec spec = ModelSpec::tiny();
  for (int l = 0; l < spec.num_layers; ++l) {
    auto keys = saved->read_keys("int4", l);
    PQKV_ASSERT_OK(keys);
    const auto appended = layer_keys(spec, l);
    ASSERT_EQ(keys->size(), appended.size());
    // Stored as bf16: each key is its appended value rounded to bf16.
    for (size_t i = 0; i < appended.size(); ++i)
      ASSERT_EQ((*keys)[i], bf16_to_float(float_to_bf16(appended[i]))) << "element " << i;
  }
  EXPECT_EQ(saved->read_keys("int4", 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(saved->read_keys("missing", 0).status().code(), StatusCode::kNotFound);
}

TEST_F(IndexRecallTest, ExactKeysSelectTheExactTopK) {
  auto saved = open();
  ASSERT_NE(saved, nullptr);
  RecallOptions o;
  o.queries = 16;
  o.seed = kSeed;
  for (int64_t k : {int64_t{1}, int64_t{7}, int64_t{70}, kTokens}) {
    SCOPED_TRACE("K " + std::to_string(k) + ", seed " + std::to_string(o.seed));
    o.top_k = k;
    auto r = sequence_recall(*saved, "exact", o);
    PQKV_ASSERT_OK(r);
    ASSERT_EQ(r->layers.size(), 2u);
    EXPECT_EQ(r->mean, 1.0);
    EXPECT_EQ(r->min, 1.0);
    for (const LayerRecall& l : r->layers) {
      EXPECT_EQ(l.k, k);
      EXPECT_EQ(l.tokens, kTokens);
      ASSERT_EQ(l.heads.size(), 2u);
      for (const HeadRecall& h : l.heads)
        EXPECT_EQ(h.min, 1.0);
    }
  }
}

TEST_F(IndexRecallTest, ScalarCodesRecallHighAndPqLess) {
  auto saved = open();
  ASSERT_NE(saved, nullptr);
  RecallOptions o;
  o.queries = 32;
  o.seed = kSeed;
  o.top_k = 35;  // 5%
  SCOPED_TRACE("seed " + std::to_string(o.seed));
  auto int8 = sequence_recall(*saved, "int8", o);
  auto int4 = sequence_recall(*saved, "int4", o);
  auto pq = sequence_recall(*saved, "pq", o);
  PQKV_ASSERT_OK(int8);
  PQKV_ASSERT_OK(int4);
  PQKV_ASSERT_OK(pq);
  EXPECT_EQ(int4->selection, "int4");
  std::printf("recall@35 of seed %llu: int8 %.4f, int4 %.4f, pq m=8,b=6 %.4f\n",
              static_cast<unsigned long long>(o.seed), int8->mean, int4->mean, pq->mean);
  EXPECT_GT(int8->mean, 0.97);
  EXPECT_GT(int4->mean, 0.85);
  EXPECT_LT(int4->mean, 1.0);
  EXPECT_GE(int8->mean, int4->mean);
  EXPECT_GT(pq->mean, 0.4);
  EXPECT_LT(pq->mean, int4->mean);
  for (const auto* r : {&*int8, &*int4, &*pq}) {
    EXPECT_LE(r->min, r->mean);
    for (const LayerRecall& l : r->layers) {
      for (const HeadRecall& h : l.heads) {
        EXPECT_GE(h.min, 0.0);
        EXPECT_LE(h.min, h.mean);
        EXPECT_LE(h.mean, 1.0);
      }
    }
  }
  // The same seed gives the same figures.
  auto again = sequence_recall(*saved, "pq", o);
  PQKV_ASSERT_OK(again);
  EXPECT_EQ(again->mean, pq->mean);
}

TEST_F(IndexRecallTest, DefaultKIsTheSequenceBudgetAndFractionsResolve) {
  auto saved = open();
  ASSERT_NE(saved, nullptr);
  auto info = saved->info("int4");
  PQKV_ASSERT_OK(info);
  RecallOptions o;
  auto k = recall_k(*info, kTokens, o);
  PQKV_ASSERT_OK(k);
  EXPECT_EQ(*k, std::max<int64_t>(1, info->options.budget.resolve(kTokens, kTokens).top_k));
  o.top_fraction = 0.1;
  EXPECT_EQ(*recall_k(*info, kTokens, o), 70);
  o.top_fraction.reset();
  o.top_k = kTokens + 1;
  EXPECT_EQ(recall_k(*info, kTokens, o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(sequence_recall(*saved, "raw", RecallOptions{}).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST_F(IndexRecallTest, CliPrintsRecallAndJson) {
  const CliRun t = pqkv("inspect '" + store() + "' --recall --sequence int4 --queries 4");
  ASSERT_EQ(t.code, 0) << describe(t);
  EXPECT_NE(t.out.find("recall@K of int4"), std::string::npos) << describe(t);
  EXPECT_NE(t.out.find("seed 1"), std::string::npos) << describe(t);
  EXPECT_NE(t.out.find("layer 1:"), std::string::npos) << describe(t);
  EXPECT_EQ(t.out.find("exact:"), std::string::npos) << describe(t);  // --sequence limits

  const CliRun j =
      pqkv("inspect '" + store() + "' --recall --json --queries 8 --top-k 20 --seed 5");
  // "raw" has no index to measure: skipped, not damage (it was exit 1 and
  // "DIR is damaged ... restore it from a backup").
  ASSERT_EQ(j.code, 0) << describe(j);
  EXPECT_EQ(j.err.find("damaged"), std::string::npos) << describe(j);
  const auto doc = nlohmann::json::parse(j.out);
  ASSERT_EQ(doc["sequences"].size(), 5u);
  for (const auto& s : doc["sequences"]) {
    SCOPED_TRACE(s.dump());
    EXPECT_EQ(s["tokens"], kTokens);
    const std::string name = s["name"];
    ASSERT_TRUE(s.contains("recall"));
    const auto& r = s["recall"];
    if (name == "raw") {
      EXPECT_TRUE(r.contains("skipped"));
      continue;
    }
    EXPECT_EQ(r["queries"], 8);
    EXPECT_EQ(r["seed"], 5);
    ASSERT_EQ(r["layers"].size(), 2u);
    EXPECT_EQ(r["layers"][0]["k"], 20);
    ASSERT_EQ(r["layers"][0]["heads"].size(), 2u);
    if (name == "exact") {
      EXPECT_EQ(r["mean"], 1.0);
      EXPECT_EQ(r["min"], 1.0);
    } else {
      EXPECT_GT(r["mean"].get<double>(), 0.4);
    }
  }
}

TEST_F(IndexRecallTest, BadFlagsAreUsageErrors) {
  const std::string dir = "'" + store() + "'";
  struct Case {
    std::string args;
    std::string message;
  };
  const Case cases[] = {
      {"--recall --queries 0", "--queries must be in 1..100000"},
      // Ran for hours (2e9 queries); an explicit 0 ran as the default K;
      // noise past fp32 made the queries Inf, reported as a damaged store (exit 1).
      {"--recall --queries 2000000000", "--queries must be in 1..100000"},
      {"--recall --top-k 0", "--top-k must be at least 1, got 0"},
      {"--recall --top-fraction 0", "--top-fraction must be in (0, 1], got 0"},
      {"--recall --perturb 1e308", "--perturb must be a finite value in 0..1000"},
      {"--recall --seed -1", "--seed: must be a whole number in 0..18446744073709551615"},
      {"--recall --seed 18446744073709551616", "must be a whole number"},
      {"--recall --top-k 701", "passes the 700 tokens"},
      {"--recall --top-k 5 --top-fraction 0.1", "not both"},
      {"--recall --top-fraction 1.5", "--top-fraction must be in (0, 1]"},
      {"--recall --perturb -1", "--perturb must be"},
      {"--recall --sequence nope", "no saved sequence named 'nope'"},
      {"--queries 4", "apply to --recall"},
      {"--recall --sequence raw", "saved without an index (before finish_prefill)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const CliRun r = pqkv("inspect " + dir + " " + c.args);
    EXPECT_EQ(r.code, 2) << describe(r);
    EXPECT_NE(r.err.find(c.message), std::string::npos) << describe(r);
    // Under --json the same error is JSON on stdout.
    const CliRun j = pqkv("inspect --json " + dir + " " + c.args);
    EXPECT_EQ(j.code, 2) << describe(j);
    const auto parsed = nlohmann::json::parse(j.out, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(parsed.is_discarded()) << "stdout is not JSON: " << describe(j);
    EXPECT_NE(parsed["error"]["message"].get<std::string>().find(c.message), std::string::npos)
        << describe(j);
  }
  const CliRun help = pqkv("inspect --help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--perturb"), std::string::npos) << describe(help);
  EXPECT_NE(help.out.find("exact top-K"), std::string::npos) << describe(help);
}

TEST_F(IndexRecallTest, DamagedKeysAreNamedAndFailTheRecall) {
  TempDir copy;
  const fs::path dir = copy.path() / "store";
  fs::copy(store(), dir, fs::copy_options::recursive);
  auto info = open()->info("int4");
  PQKV_ASSERT_OK(info);
  const fs::path seg = dir / info->segment_file;
  fs::resize_file(seg, fs::file_size(seg) / 2);
  {
    auto saved =
        engine::SavedSequences::open(dir.string(), engine::SavedSequences::Access::kReadOnly);
    PQKV_ASSERT_OK(saved);
    auto keys = (*saved)->read_keys("int4", 1);
    ASSERT_FALSE(keys.ok());
    EXPECT_EQ(keys.status().code(), StatusCode::kCorruption) << keys.status().to_string();
    EXPECT_NE(keys.status().message().find(info->segment_file), std::string::npos)
        << keys.status().to_string();
  }
  const CliRun r = pqkv("inspect '" + dir.string() + "' --recall --sequence int4 --queries 2");
  EXPECT_EQ(r.code, 1) << describe(r);
  EXPECT_NE(r.out.find("recall FAILED"), std::string::npos) << describe(r);
  EXPECT_NE(r.out.find(info->segment_file), std::string::npos) << describe(r);
}

TEST(InspectRecallOfBenchTest, RecallOfWhatBenchSaved) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  const CliRun b = pqkv(
      "bench --model tiny --context 600 --steps 2 --no-quality --selection oracle --selection "
      "int4 --save '" +
      store.string() + "'");
  ASSERT_EQ(b.code, 0) << describe(b);
  const CliRun i = pqkv("inspect '" + store.string() + "' --recall --json --top-fraction 0.05");
  ASSERT_EQ(i.code, 0) << describe(i);
  const auto doc = nlohmann::json::parse(i.out);
  ASSERT_EQ(doc["sequences"].size(), 2u) << i.out;
  for (const auto& s : doc["sequences"]) {
    SCOPED_TRACE(s.dump());
    EXPECT_EQ(s["recall"]["layers"][0]["k"], 30);  // 5% of 602
    if (s["name"] == "oracle") {
      EXPECT_EQ(s["recall"]["mean"], 1.0);
    } else {
      EXPECT_GT(s["recall"]["mean"].get<double>(), 0.8);
    }
  }
}

}  // namespace
}  // namespace pqkv::tools
