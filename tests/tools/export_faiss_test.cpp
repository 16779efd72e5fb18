// `pqkv export-faiss`: the file Faiss's own read_index loads searches (inner
// product) with pqkv's scores of the same saved codes, for every key code.
#include <faiss/Index.h>
#include <faiss/index_io.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "index/key_codec.h"
#include "pqkv/store.h"
#include "test_util.h"
#include "tools/cli_run.h"

namespace pqkv::tools {
namespace {

struct CodeCase {
  const char* name;
  KeyCode code;
  int pq_m;
  int pq_bits;
};

// Bits 6 and 3 exercise Faiss's bit-packed PQ codes; 8 its one byte each.
const CodeCase kCases[] = {
    {"pq_m4_b6", KeyCode::kPq, 4, 6},   {"pq_m8_b8", KeyCode::kPq, 8, 8},
    {"pq_m16_b3", KeyCode::kPq, 16, 3}, {"int4", KeyCode::kInt4, 0, 8},
    {"int8", KeyCode::kInt8, 0, 8},     {"exact", KeyCode::kExact, 0, 8},
};
constexpr int64_t kTokens = 301;
constexpr uint64_t kSeed = 20261201;

// One saved sequence per case, keys Normal(0, 1) from kSeed.
void write_store(const fs::path& dir) {
  StoreOptions o;
  o.spec = ModelSpec::tiny();
  o.directory = dir.string();
  o.model_fingerprint = "tiny-export";
  auto store = Store::open(o);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const int kv = o.spec.num_kv_heads, d = o.spec.head_dim;
  const auto keys = testing::random_floats(static_cast<size_t>(kTokens * kv * d), kSeed);
  const auto values = testing::random_floats(keys.size(), kSeed + 1);
  for (const CodeCase& c : kCases) {
    SequenceOptions so;
    so.selection.code = c.code;
    so.pq.m = c.pq_m;
    so.pq.bits = c.pq_bits;
    auto seq = (*store)->create_sequence(c.name, so);
    ASSERT_TRUE(seq.ok()) << c.name << ": " << seq.status().to_string();
    for (int l = 0; l < o.spec.num_layers; ++l) {
      PQKV_ASSERT_OK((*seq)->append(l, host_view(keys.data(), {kTokens, kv, d}),
                                    host_view(values.data(), {kTokens, kv, d}), Stream::host()));
    }
    PQKV_ASSERT_OK((*seq)->finish_prefill());
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
}

TEST(ExportFaissTest, FaissSearchesTheSavedCodesAsPqkvScoresThem) {
  TempDir dir;
  const fs::path store_dir = dir.path() / "store";
  ASSERT_NO_FATAL_FAILURE(write_store(store_dir));
  const ModelSpec spec = ModelSpec::tiny();
  constexpr int kQueries = 16;
  constexpr int64_t kTop = 10;

  for (const CodeCase& c : kCases) {
    for (int layer = 0; layer < spec.num_layers; ++layer) {
      for (int head = 0; head < spec.num_kv_heads; ++head) {
        const uint64_t seed = kSeed + 100 * layer + 10 * head + static_cast<int>(c.code);
        SCOPED_TRACE(std::string(c.name) + " layer " + std::to_string(layer) + " head " +
                     std::to_string(head) + " query seed " + std::to_string(seed));
        const fs::path out = dir.path() / (std::string(c.name) + ".faiss");
        const CliRun r = pqkv("export-faiss '" + store_dir.string() + "' --sequence " + c.name +
                              " --layer " + std::to_string(layer) + " --head " +
                              std::to_string(head) + " --out '" + out.string() + "' --json");
        ASSERT_EQ(r.code, 0) << describe(r);
        EXPECT_TRUE(std::regex_search(r.out, std::regex(R"("vectors": 301)"))) << describe(r);

        std::unique_ptr<faiss::Index> loaded(faiss::read_index(out.string().c_str()));
        ASSERT_EQ(loaded->ntotal, kTokens);
        ASSERT_EQ(loaded->d, spec.head_dim);
        EXPECT_EQ(loaded->metric_type, faiss::METRIC_INNER_PRODUCT);

        // pqkv's scores of the same codes, through its own codec.
        auto saved = engine::SavedSequences::open(store_dir.string(),
                                                  engine::SavedSequences::Access::kReadOnly);
        ASSERT_TRUE(saved.ok()) << saved.status().to_string();
        auto info = (*saved)->info(c.name);
        ASSERT_TRUE(info.ok()) << info.status().to_string();
        auto snap = (*saved)->read_index(c.name, layer);
        ASSERT_TRUE(snap.ok()) << snap.status().to_string();
        const auto& stage = snap->stages[0];
        auto codec =
            index::make_key_codec(stage.code, spec.head_dim, spec.num_kv_heads, info->options.pq);
        ASSERT_TRUE(codec.ok()) << codec.status().to_string();
        PQKV_ASSERT_OK((*codec)->read_state(stage.codec_state));

        const auto queries =
            testing::random_floats(static_cast<size_t>(kQueries * spec.head_dim), seed);
        std::vector<float> distances(kQueries * kTop);
        std::vector<faiss::Index::idx_t> labels(kQueries * kTop);
        loaded->search(kQueries, queries.data(), kTop, distances.data(), labels.data());

        std::vector<float> table, scores(kTokens);
        for (int q = 0; q < kQueries; ++q) {
          (*codec)->prepare(head, queries.data() + q * spec.head_dim, &table);
          (*codec)->scan(table.data(), stage.codes[head].data(), 0, kTokens, scores.data());
          std::vector<float> best = scores;
          std::partial_sort(best.begin(), best.begin() + kTop, best.end(), std::greater<>());
          float scale = 1.0f;
          for (float s : scores)
            scale = std::max(scale, std::abs(s));
          const float tol = 1e-5f * scale * static_cast<float>(spec.head_dim);
          for (int64_t i = 0; i < kTop; ++i) {
            const faiss::Index::idx_t id = labels[q * kTop + i];
            ASSERT_GE(id, 0);
            ASSERT_LT(id, kTokens);
            // The ith distance is pqkv's ith best score, and Faiss's token
            // scores that much in pqkv too: the same top-K up to ties.
            EXPECT_NEAR(distances[q * kTop + i], best[i], tol) << "query " << q << " rank " << i;
            EXPECT_NEAR(scores[id], distances[q * kTop + i], tol) << "query " << q << " id " << id;
          }
        }
      }
    }
  }
}

TEST(ExportFaissTest, NamesWhatIsMissingAndExitsWithTwo) {
  TempDir dir;
  const fs::path store_dir = dir.path() / "store";
  ASSERT_NO_FATAL_FAILURE(write_store(store_dir));
  const std::string base =
      "export-faiss '" + store_dir.string() + "' --out '" + (dir.path() / "x.faiss").string() + "'";

  const CliRun h = pqkv("export-faiss --help");
  EXPECT_EQ(h.code, 0) << describe(h);
  for (const char* word : {"IndexPQ", "IndexScalarQuantizer", "IndexFlatIP", "--sequence"})
    EXPECT_NE(h.out.find(word), std::string::npos) << word << "\n" << describe(h);

  const CliRun seq = pqkv(base + " --sequence nope --layer 0 --head 0");
  EXPECT_EQ(seq.code, 2) << describe(seq);
  EXPECT_NE(seq.err.find("no saved sequence named 'nope'"), std::string::npos) << describe(seq);
  EXPECT_NE(seq.err.find("int4"), std::string::npos) << "lists the saved names\n" << describe(seq);

  const CliRun layer = pqkv(base + " --sequence int4 --layer 2 --head 0");
  EXPECT_EQ(layer.code, 2) << describe(layer);
  EXPECT_NE(layer.err.find("--layer 2 is out of range"), std::string::npos) << describe(layer);

  const CliRun head = pqkv(base + " --sequence int4 --layer 0 --head -1");
  EXPECT_EQ(head.code, 2) << describe(head);
  EXPECT_NE(head.err.find("--head -1 is out of range"), std::string::npos) << describe(head);

  const CliRun rerank = pqkv(base + " --sequence int4 --layer 0 --head 0 --rerank");
  EXPECT_EQ(rerank.code, 2) << describe(rerank);

  EXPECT_EQ(
      pqkv("export-faiss '" + dir.path().string() + "' --sequence int4 --layer 0 --head 0 --out x")
          .code,
      2);
  EXPECT_EQ(pqkv("export-faiss '" + store_dir.string() + "' --layer 0 --head 0 --out x").code, 2);
  EXPECT_FALSE(fs::exists(dir.path() / "x.faiss"));
}

}  // namespace
}  // namespace pqkv::tools
