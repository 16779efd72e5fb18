// The key codecs on the host (scalar-quantized int8 and int4 keys, exact keys,
// PQ through the codec interface) and the code index's one- and two-stage
// search against exact top-K.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <vector>

#include "index/cpu/key_codecs_cpu.h"
#include "index/cpu/pq_search_cpu.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::KeyCodec;

std::unique_ptr<KeyCodec> trained_codec(KeyCode code, const std::vector<float>& keys, int64_t n,
                                        int kv_heads, int head_dim) {
  auto made = index::make_key_codec(code, head_dim, kv_heads, small_config(4, 6));
  PQKV_EXPECT_OK(made);
  auto codec = std::move(made).value();
  auto host = index::cpu::HostKeys::from_view(host_view(keys.data(), {n, kv_heads, head_dim}),
                                              kv_heads, head_dim, "keys");
  PQKV_EXPECT_OK(host);
  const Status s = codec->train(*host, small_config(4, 6));
  PQKV_EXPECT_OK(s);
  return codec;
}

// Every token's score through the codec, [kv_head][n], for one query per KV head.
std::vector<float> codec_scores(const KeyCodec& codec, const std::vector<float>& keys, int64_t n,
                                const std::vector<float>& queries) {
  const int kv_heads = codec.num_kv_heads();
  const int d = codec.head_dim();
  auto host = index::cpu::HostKeys::from_view(host_view(keys.data(), {n, kv_heads, d}), kv_heads, d,
                                              "keys");
  std::vector<float> out(static_cast<size_t>(kv_heads) * n);
  for (int h = 0; h < kv_heads; ++h) {
    std::vector<uint8_t> codes(static_cast<size_t>(n) * codec.code_size());
    codec.encode(*host, h, codes.data());
    std::vector<float> table;
    codec.prepare(h, queries.data() + static_cast<size_t>(h) * d, &table);
    codec.scan(table.data(), codes.data(), 0, n, out.data() + static_cast<size_t>(h) * n);
    // The positions scan agrees with the range scan.
    std::vector<int32_t> positions;
    for (int64_t t = n - 1; t >= 0; t -= 3)
      positions.push_back(static_cast<int32_t>(t));
    std::vector<float> picked(positions.size());
    codec.scan_positions(table.data(), codes.data(), positions.data(),
                         static_cast<int64_t>(positions.size()), picked.data());
    for (size_t i = 0; i < positions.size(); ++i)
      EXPECT_EQ(picked[i], out[static_cast<size_t>(h) * n + positions[i]]);
  }
  return out;
}

TEST(KeyCodecCpuTest, ParsesSelections) {
  auto s = SelectionConfig::parse("oracle");
  PQKV_ASSERT_OK(s);
  EXPECT_TRUE(s->is_oracle());
  s = SelectionConfig::parse("pq+int4:4");
  PQKV_ASSERT_OK(s);
  EXPECT_EQ(s->code, KeyCode::kPq);
  EXPECT_EQ(s->rerank, KeyCode::kInt4);
  EXPECT_EQ(s->candidates, 4);
  EXPECT_EQ(s->to_string(), "pq+int4:4");
  for (const char* bad : {"", "int3", "pq+int8", "pq+int8:0", "pq+int8:x", "pq+:4"}) {
    EXPECT_EQ(SelectionConfig::parse(bad).status().code(), StatusCode::kInvalidArgument) << bad;
  }
  // C out of range names its range.
  for (const char* bad : {"pq+int8:0", "int4+int8:1025", "int8+int4:1000000"}) {
    const Status st = SelectionConfig::parse(bad).status();
    EXPECT_NE(st.message().find("must be 1 to 1024"), std::string::npos) << st.to_string();
  }
  PQKV_EXPECT_OK(SelectionConfig::parse("int4+int8:1024"));
  SelectionConfig c;
  c.candidates = 1025;
  EXPECT_EQ(c.validate().code(), StatusCode::kInvalidArgument);
}

// Scalar codes: each score is the query dotted with the decoded key, within
// half a step per channel of the exact score; sizes 1, 17, 97 and 4099 tokens.
TEST(KeyCodecCpuTest, ScalarScoresBoundedByHalfAStep) {
  for (KeyCode code : {KeyCode::kInt8, KeyCode::kInt4}) {
    for (int64_t n : {1, 17, 97, 4099}) {
      const uint64_t seed = 100 + static_cast<uint64_t>(n);
      SCOPED_TRACE(std::string(key_code_name(code)) + " n=" + std::to_string(n) +
                   " seed=" + std::to_string(seed));
      const int kv_heads = 2;
      const int d = 64;
      const auto keys = clustered_keys(n, kv_heads, d, seed);
      const auto queries = random_floats(static_cast<size_t>(kv_heads) * d, seed + 9);
      auto codec = trained_codec(code, keys, n, kv_heads, d);
      ASSERT_TRUE(codec->trained());
      EXPECT_EQ(codec->code_size(), code == KeyCode::kInt8 ? d : d / 2);
      const auto scores = codec_scores(*codec, keys, n, queries);
      const auto& sq = static_cast<const index::cpu::ScalarCodecCpu&>(*codec);
      for (int h = 0; h < kv_heads; ++h) {
        double bound = 0;
        for (int c = 0; c < d; ++c)
          bound += 0.5 * std::abs(queries[h * d + c]) * sq.scale()[h * d + c];
        for (int64_t t = 0; t < n; ++t) {
          double exact = 0;
          for (int c = 0; c < d; ++c)
            exact += double(queries[h * d + c]) * keys[(t * kv_heads + h) * d + c];
          ASSERT_NEAR(scores[h * n + t], exact, bound * 1.001 + 1e-2) << "token " << t;
        }
      }
    }
  }
}

TEST(KeyCodecCpuTest, ExactCodecScoresAreDotProducts) {
  const int64_t n = 97;
  const int kv_heads = 3;
  const int d = 17;  // odd head_dim
  const uint64_t seed = 5;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const auto keys = random_floats(static_cast<size_t>(n) * kv_heads * d, seed);
  const auto queries = random_floats(static_cast<size_t>(kv_heads) * d, seed + 1);
  auto codec = trained_codec(KeyCode::kExact, keys, n, kv_heads, d);
  const auto scores = codec_scores(*codec, keys, n, queries);
  for (int h = 0; h < kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      float exact = 0;
      for (int c = 0; c < d; ++c)
        exact += queries[h * d + c] * keys[(t * kv_heads + h) * d + c];
      ASSERT_NEAR(scores[h * n + t], exact, 1e-5f * (1.0f + std::abs(exact))) << "token " << t;
    }
  }
}

TEST(KeyCodecCpuTest, Int4NeedsAnEvenHeadDim) {
  EXPECT_EQ(index::make_key_codec(KeyCode::kInt4, 17, 1, PqConfig{}).status().code(),
            StatusCode::kInvalidArgument);
  PQKV_EXPECT_OK(index::make_key_codec(KeyCode::kInt8, 17, 1, PqConfig{}));
}

// The selected set of exact top-K per KV head, from the stage functions of
// pq_search_cpu.h over exact scores (the exact codec's dot products, checked
// above, so that the comparison below is of the search stages).
std::vector<std::set<int32_t>> oracle_sets(const std::vector<float>& keys, int64_t n, int kv_heads,
                                           int d, const std::vector<float>& q, int q_heads,
                                           int64_t begin, int64_t k, GqaAggregation agg) {
  const int group = q_heads / kv_heads;
  const int64_t count = n - begin;
  std::vector<std::set<int32_t>> out(static_cast<size_t>(kv_heads));
  for (int kv = 0; kv < kv_heads; ++kv) {
    std::vector<float> probs(static_cast<size_t>(group) * count);
    for (int g = 0; g < group; ++g) {
      const float* qh = q.data() + static_cast<size_t>(kv * group + g) * d;
      for (int64_t t = begin; t < n; ++t) {
        std::vector<uint8_t> code(sizeof(float) * d);
        std::memcpy(code.data(), keys.data() + (t * kv_heads + kv) * d, code.size());
        const index::cpu::ExactCodecCpu exact(d, 1);
        exact.scan(qh, code.data(), 0, 1, &probs[g * count + t - begin]);
      }
      index::cpu::softmax_scores(probs.data() + g * count, count, d);
    }
    std::vector<float> agg_scores(static_cast<size_t>(count));
    index::cpu::aggregate_group(probs.data(), group, count, agg, agg_scores.data());
    std::vector<uint64_t> scratch;
    std::vector<int32_t> picked(static_cast<size_t>(std::min(k, count)));
    index::cpu::select_top_k(agg_scores.data(), count, k, begin, scratch, picked.data());
    out[kv].insert(picked.begin(), picked.end());
  }
  return out;
}

// Runs `selection` on a CPU index over `keys` and returns each KV head's picks.
std::vector<std::set<int32_t>> index_sets(const SelectionConfig& selection,
                                          const std::vector<float>& keys, int64_t n, int kv_heads,
                                          int d, const std::vector<float>& q, int q_heads,
                                          int64_t begin, int64_t k, GqaAggregation agg) {
  auto made = index::make_layer_index(Device::cpu(), d, kv_heads, small_config(4, 6), selection);
  PQKV_EXPECT_OK(made);
  auto& idx = **made;
  const auto view = host_view(keys.data(), {n, kv_heads, d});
  Status s = idx.train(view, small_config(4, 6), Stream::host());
  PQKV_EXPECT_OK(s);
  s = idx.add(view, Stream::host());
  PQKV_EXPECT_OK(s);
  index::SearchRequest request{host_view(q.data(), {q_heads, d}), begin, n, k, agg};
  const int64_t kept = std::min(k, n - begin);
  std::vector<int32_t> out(static_cast<size_t>(kv_heads) * kept);
  s = idx.search(request, out.data(), Stream::host(), nullptr);
  PQKV_EXPECT_OK(s);
  std::vector<std::set<int32_t>> sets(static_cast<size_t>(kv_heads));
  for (int kv = 0; kv < kv_heads; ++kv)
    sets[kv].insert(out.begin() + kv * kept, out.begin() + (kv + 1) * kept);
  return sets;
}

// The oracle and exact+exact two stages pick exactly what exact top-K picks,
// for both aggregations and odd sizes.
TEST(CodeIndexCpuTest, OracleAndExactRerankPickExactTopK) {
  const int kv_heads = 2;
  const int q_heads = 8;
  const int d = 32;
  for (int64_t n : {17, 97, 4099}) {
    for (GqaAggregation agg : {GqaAggregation::kSoftmaxSum, GqaAggregation::kMax}) {
      const uint64_t seed = 300 + static_cast<uint64_t>(n);
      SCOPED_TRACE("n=" + std::to_string(n) + " seed=" + std::to_string(seed) + " " +
                   gqa_aggregation_name(agg));
      const auto keys = clustered_keys(n, kv_heads, d, seed);
      const auto q = random_floats(static_cast<size_t>(q_heads) * d, seed + 3);
      const int64_t begin = 1;
      const int64_t k = std::max<int64_t>(1, n / 10);
      const auto want = oracle_sets(keys, n, kv_heads, d, q, q_heads, begin, k, agg);
      EXPECT_EQ(
          index_sets(SelectionConfig::oracle(), keys, n, kv_heads, d, q, q_heads, begin, k, agg),
          want);
      SelectionConfig two;
      two.code = KeyCode::kExact;
      two.rerank = KeyCode::kExact;
      two.candidates = 3;
      EXPECT_EQ(index_sets(two, keys, n, kv_heads, d, q, q_heads, begin, k, agg), want);
    }
  }
}

// On keys whose scores are hard to tell apart (clustered keys plus isotropic
// noise): int8 keeps nearly all of exact top-K; int4 keeps most, and int4
// candidates re-ranked by int8 keep nearly all; PQ re-ranked by int8 keeps more
// than PQ alone.
TEST(CodeIndexCpuTest, ScalarCodesSelectLikeTheOracle) {
  const int kv_heads = 2;
  const int q_heads = 8;
  const int d = 64;
  const int64_t n = 4099;
  const uint64_t seed = 77;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const auto keys = clustered_keys(n, kv_heads, d, seed);
  const auto q = random_floats(static_cast<size_t>(q_heads) * d, seed + 1, 1.5f);
  const int64_t k = 200;
  const auto want =
      oracle_sets(keys, n, kv_heads, d, q, q_heads, 0, k, GqaAggregation::kSoftmaxSum);
  const auto overlap = [&](const char* text) {
    auto selection = SelectionConfig::parse(text);
    PQKV_EXPECT_OK(selection);
    const auto got =
        index_sets(*selection, keys, n, kv_heads, d, q, q_heads, 0, k, GqaAggregation::kSoftmaxSum);
    double hits = 0;
    for (int kv = 0; kv < kv_heads; ++kv) {
      for (int32_t t : got[kv])
        hits += want[kv].count(t);
    }
    return hits / double(k * kv_heads);
  };
  EXPECT_GE(overlap("int8"), 0.97);
  EXPECT_GE(overlap("int4"), 0.8);
  EXPECT_GE(overlap("int4+int8:2"), 0.97);
  EXPECT_GT(overlap("pq+int8:4"), overlap("pq") + 0.05);
}

TEST(CodeIndexCpuTest, PqCallsAnswerForIndexesWithoutPq) {
  auto made = index::make_layer_index(Device::cpu(), 16, 1, PqConfig{}, SelectionConfig::oracle());
  PQKV_ASSERT_OK(made);
  EXPECT_EQ((*made)->codebook().status().code(), StatusCode::kFailedPrecondition);
  uint8_t out[4];
  EXPECT_EQ((*made)->copy_codes(0, 0, 0, out).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ((*made)->code_bytes_per_token(), 64);
  PQKV_EXPECT_OK((*made)->wait_ready(Stream::host()));
  EXPECT_TRUE((*made)->background_stream().host_only);
}

// Both backends make two-stage indexes; without a GPU the CUDA one says there
// is none (two_stage_cuda_test.cpp compares the two on a GPU).
TEST(CodeIndexCpuTest, CudaMakesTwoStages) {
  auto two = SelectionConfig::parse("pq+int8:4");
  ASSERT_TRUE(two.ok()) << two.status().to_string();
  auto made = index::make_layer_index(Device::cuda(0), 64, 1, PqConfig{}, *two);
  if (cuda_device_count() == 0) {
    EXPECT_EQ(made.status().code(), StatusCode::kUnavailable) << made.status().to_string();
    return;
  }
  PQKV_ASSERT_OK(made.status());
  EXPECT_EQ((*made)->selection().to_string(), "pq+int8:4");
  EXPECT_EQ((*made)->code_bytes_per_token(), 8 + 64);
}

}  // namespace
}  // namespace pqkv::testing
