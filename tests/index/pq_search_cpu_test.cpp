#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "index/cpu/pq_search_cpu.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

namespace cpu = index::cpu;

struct SearchCase {
  int head_dim, m, bits, q_heads;
  int64_t tokens, begin, end, k;
  GqaAggregation aggregation;
};

std::string describe(const SearchCase& c) {
  std::string s = "head_dim=" + std::to_string(c.head_dim);
  s += " m=" + std::to_string(c.m) + " bits=" + std::to_string(c.bits);
  s += " q_heads=" + std::to_string(c.q_heads) + " tokens=" + std::to_string(c.tokens);
  s += " range=[" + std::to_string(c.begin) + "," + std::to_string(c.end) + ")";
  s += " k=" + std::to_string(c.k) + " agg=" + gqa_aggregation_name(c.aggregation);
  return s;
}

// gtest prints parameters in test names and failures; without this it dumps
// the struct's bytes, padding included.
void PrintTo(const SearchCase& c, std::ostream* os) {
  *os << describe(c);
}

constexpr int kKvHeads = 2;
constexpr int64_t kTrainKeys = 600;

// An index trained on kTrainKeys keys and holding the first `tokens` of them.
std::unique_ptr<index::LayerIndex> index_for(const SearchCase& c, std::vector<float>& keys) {
  keys = clustered_keys(kTrainKeys, kKvHeads, c.head_dim, 31);
  auto made = index::make_layer_index(
      Device::cpu(), index::PqShape::from_config(c.head_dim, small_config(c.m, c.bits)), kKvHeads);
  PQKV_EXPECT_OK(made);
  auto idx = std::move(made).value();
  PQKV_EXPECT_OK(idx->train(host_view(keys.data(), {kTrainKeys, kKvHeads, c.head_dim}),
                            small_config(c.m, c.bits), Stream::host()));
  PQKV_EXPECT_OK(
      idx->add(host_view(keys.data(), {c.tokens, kKvHeads, c.head_dim}), Stream::host()));
  return idx;
}

cpu::SearchInputs inputs_for(const SearchCase& c, const index::LayerCodebook& cb,
                             const std::vector<std::vector<uint8_t>>& codes,
                             const std::vector<float>& queries) {
  cpu::SearchInputs in;
  in.codebook = &cb;
  for (const auto& head : codes)
    in.codes.push_back(head.data());
  in.queries = queries.data();
  in.q_heads = c.q_heads;
  in.begin = c.begin;
  in.end = c.end;
  in.aggregation = c.aggregation;
  return in;
}

class PqSearchCpuTest : public ::testing::TestWithParam<SearchCase> {};

TEST_P(PqSearchCpuTest, MatchesBruteForceReference) {
  const SearchCase c = GetParam();
  SCOPED_TRACE(describe(c));
  std::vector<float> keys;
  auto idx = index_for(c, keys);
  auto cb = idx->codebook();
  PQKV_ASSERT_OK(cb);
  // Queries near some keys, so that a few tokens stand out.
  auto queries = random_floats(static_cast<size_t>(c.q_heads) * c.head_dim, 77);
  for (int h = 0; h < c.q_heads; ++h) {
    const int kv = h / (c.q_heads / kKvHeads);
    const int64_t t = (h * 7) % c.tokens;
    for (int d = 0; d < c.head_dim; ++d) {
      queries[h * c.head_dim + d] += 2.0f * keys[(t * kKvHeads + kv) * c.head_dim + d];
    }
  }
  const int64_t kept = cpu::clamped_k(c.k, c.begin, c.end);
  ASSERT_EQ(kept, std::min(c.k, c.end - c.begin));
  std::vector<int32_t> out(static_cast<size_t>(kKvHeads * std::max<int64_t>(kept, 1)), -7);
  index::SearchRequest request;
  request.queries = host_view(queries.data(), {c.q_heads, c.head_dim});
  request.begin = c.begin;
  request.end = c.end;
  request.k = c.k;
  request.aggregation = c.aggregation;
  index::SearchTimings timings{-1, -1};
  const Status s = idx->search(request, out.data(), Stream::host(), &timings);
  PQKV_ASSERT_OK(s);
  EXPECT_GE(timings.score_us, 0);
  EXPECT_GE(timings.topk_us, 0);
  if (kept == 0) {
    EXPECT_EQ(out[0], -7) << "nothing may be written when nothing is kept";
    return;
  }

  const auto reference =
      brute_force_scores(*idx, *cb, queries, c.q_heads, c.begin, c.end, c.aggregation);
  const int64_t count = c.end - c.begin;
  std::vector<std::vector<uint8_t>> codes;
  for (int h = 0; h < kKvHeads; ++h)
    codes.push_back(all_codes(*idx, h));
  const auto in = inputs_for(c, *cb, codes, queries);
  const auto ours = cpu::score_layer(in);
  for (int kv = 0; kv < kKvHeads; ++kv) {
    const std::vector<double> ref(reference.begin() + kv * count,
                                  reference.begin() + (kv + 1) * count);
    const int32_t* row = out.data() + kv * kept;
    expect_top_k(ref, c.begin, kept, row, 1e-6, "KV head " + std::to_string(kv));
    // Rows come best first; equal scores by lower position.
    for (int64_t i = 1; i < kept; ++i) {
      const float prev = ours[kv * count + row[i - 1] - c.begin];
      const float cur = ours[kv * count + row[i] - c.begin];
      EXPECT_TRUE(prev > cur || (prev == cur && row[i - 1] < row[i]))
          << "KV head " << kv << " entries " << i - 1 << ", " << i;
    }
    for (int64_t i = 0; i < count; ++i) {
      EXPECT_NEAR(ours[kv * count + i], ref[i], 1e-5 * (1 + std::abs(ref[i])));
    }
    PQKV_EXPECT_OK(cpu::verify_top_k(ours.data() + kv * count, count, c.begin, c.k, row, 0));
  }
  // The free-function reference is exactly what the index returns.
  const auto direct = cpu::search_layer(in, c.k);
  EXPECT_EQ(direct, std::vector<int32_t>(out.begin(), out.begin() + kKvHeads * kept));
}

std::vector<SearchCase> search_cases() {
  std::vector<SearchCase> cases;
  for (const auto agg : {GqaAggregation::kSoftmaxSum, GqaAggregation::kMax}) {
    for (const int q_heads : {2, 8}) {
      cases.push_back({64, 4, 8, q_heads, 1, 0, 1, 1, agg});
      cases.push_back({64, 4, 8, q_heads, 1, 0, 1, 5, agg});
      cases.push_back({64, 4, 8, q_heads, 17, 0, 17, 5, agg});
      cases.push_back({64, 4, 8, q_heads, 17, 3, 17, 20, agg});
      cases.push_back({64, 4, 8, q_heads, 17, 0, 17, 0, agg});
      cases.push_back({64, 4, 8, q_heads, 17, 9, 9, 4, agg});
      cases.push_back({32, 2, 6, q_heads, 97, 0, 97, 10, agg});
      cases.push_back({32, 2, 6, q_heads, 97, 40, 97, 13, agg});
      cases.push_back({128, 8, 8, q_heads, 97, 5, 90, 33, agg});
      cases.push_back({128, 2, 6, q_heads, 600, 32, 600, 60, agg});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, PqSearchCpuTest, ::testing::ValuesIn(search_cases()));

// With 1 bit and 2 sub-spaces a KV head has 4 distinct codes, so most scores
// tie exactly: the tie rule alone decides which tokens are kept.
TEST(PqSearchCpuTieTest, EqualScoresKeepLowerPositions) {
  const SearchCase c{32, 2, 1, 4, 97, 5, 97, 10, GqaAggregation::kSoftmaxSum};
  std::vector<float> keys;
  auto idx = index_for(c, keys);
  auto cb = idx->codebook();
  PQKV_ASSERT_OK(cb);
  const auto queries = random_floats(static_cast<size_t>(c.q_heads) * c.head_dim, 3);
  std::vector<std::vector<uint8_t>> codes;
  for (int h = 0; h < kKvHeads; ++h)
    codes.push_back(all_codes(*idx, h));
  const auto scores = cpu::score_layer(inputs_for(c, *cb, codes, queries));
  std::vector<int32_t> out(kKvHeads * c.k);
  index::SearchRequest request{host_view(queries.data(), {c.q_heads, c.head_dim}), c.begin, c.end,
                               c.k, c.aggregation};
  PQKV_ASSERT_OK(idx->search(request, out.data(), Stream::host(), nullptr));
  const int64_t count = c.end - c.begin;
  for (int kv = 0; kv < kKvHeads; ++kv) {
    std::vector<int32_t> want(static_cast<size_t>(count));
    std::iota(want.begin(), want.end(), int32_t(c.begin));
    std::stable_sort(want.begin(), want.end(), [&](int32_t a, int32_t b) {
      return scores[kv * count + a - c.begin] > scores[kv * count + b - c.begin];
    });
    want.resize(static_cast<size_t>(c.k));
    EXPECT_EQ(std::vector<int32_t>(out.begin() + kv * c.k, out.begin() + (kv + 1) * c.k), want)
        << "KV head " << kv;
  }
}

TEST(PqSearchCpuStagesTest, EachStageDoesWhatItSays) {
  const int head_dim = 32;
  const auto keys = clustered_keys(300, kKvHeads, head_dim, 2);
  auto idx = trained_index(keys, 300, kKvHeads, head_dim, small_config(4, 5));
  auto cb = idx->codebook();
  PQKV_ASSERT_OK(cb);
  const auto& s = cb->shape;
  const int q_heads = 4;
  const auto queries = random_floats(static_cast<size_t>(q_heads) * head_dim, 5);
  const auto luts = cpu::build_luts(*cb, queries.data(), q_heads);
  ASSERT_EQ(luts.size(), static_cast<size_t>(q_heads * s.m * s.ksub()));
  for (int h = 0; h < q_heads; ++h) {
    for (int j = 0; j < s.m; ++j) {
      for (int c = 0; c < s.ksub(); ++c) {
        double dot = 0;
        for (int d = 0; d < s.dsub(); ++d) {
          dot += double(queries[h * head_dim + j * s.dsub() + d]) *
                 cb->sub(h / 2, j)[c * s.dsub() + d];
        }
        EXPECT_NEAR(luts[(h * s.m + j) * s.ksub() + c], dot, 1e-5 * (1 + std::abs(dot)));
      }
    }
  }
  const auto codes = all_codes(*idx, 1);
  std::vector<float> p(300);
  cpu::score_tokens(s, luts.data() + 2 * s.m * s.ksub(), codes.data(), 0, 300, p.data());
  float expected = 0;
  for (int j = 0; j < s.m; ++j)
    expected += luts[(2 * s.m + j) * s.ksub() + codes[7 * s.m + j]];
  EXPECT_EQ(p[7], expected);
  cpu::softmax_scores(p.data(), 300, head_dim);
  EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 1.0, 1e-5);

  const std::vector<float> probs = {0.1f, 0.5f, 0.4f, 0.3f, 0.2f, 0.5f};
  std::vector<float> agg(3);
  cpu::aggregate_group(probs.data(), 2, 3, GqaAggregation::kSoftmaxSum, agg.data());
  EXPECT_EQ(agg, (std::vector<float>{0.4f, 0.7f, 0.9f}));
  cpu::aggregate_group(probs.data(), 2, 3, GqaAggregation::kMax, agg.data());
  EXPECT_EQ(agg, (std::vector<float>{0.3f, 0.5f, 0.5f}));

  std::vector<uint64_t> scratch;
  std::vector<int32_t> top(3);
  const std::vector<float> scores = {1.0f, 3.0f, -0.0f, 3.0f, 0.0f};
  EXPECT_EQ(cpu::select_top_k(scores.data(), 5, 3, 10, scratch, top.data()), 3);
  EXPECT_EQ(top, (std::vector<int32_t>{11, 13, 10}));
  // k past the count keeps everything; -0 and +0 tie, so the lower position leads.
  std::vector<int32_t> all(5);
  EXPECT_EQ(cpu::select_top_k(scores.data(), 5, 9, 10, scratch, all.data()), 5);
  EXPECT_EQ(all, (std::vector<int32_t>{11, 13, 10, 12, 14}));
  EXPECT_EQ(cpu::select_top_k(scores.data(), 5, 0, 10, scratch, nullptr), 0);
}

TEST(PqSearchCpuStagesTest, VerifyTopKCatchesWrongSets) {
  const std::vector<float> scores = {0.1f, 0.9f, 0.5f, 0.5f, 0.2f};
  const std::vector<int32_t> good = {103, 101};  // 0.9 and one of the tied 0.5s
  PQKV_EXPECT_OK(cpu::verify_top_k(scores.data(), 5, 100, 2, good.data(), 0));
  const std::vector<int32_t> tie = {101, 102};
  PQKV_EXPECT_OK(cpu::verify_top_k(scores.data(), 5, 100, 2, tie.data(), 0));
  const std::vector<int32_t> misses_best = {102, 103};
  EXPECT_FALSE(cpu::verify_top_k(scores.data(), 5, 100, 2, misses_best.data(), 0).ok());
  PQKV_EXPECT_OK(cpu::verify_top_k(scores.data(), 5, 100, 2, misses_best.data(), 0.5f));
  const std::vector<int32_t> twice = {101, 101};
  EXPECT_FALSE(cpu::verify_top_k(scores.data(), 5, 100, 2, twice.data(), 0).ok());
  const std::vector<int32_t> outside = {101, 99};
  EXPECT_FALSE(cpu::verify_top_k(scores.data(), 5, 100, 2, outside.data(), 0).ok());
  const std::vector<int32_t> low = {101, 104};
  EXPECT_FALSE(cpu::verify_top_k(scores.data(), 5, 100, 2, low.data(), 0).ok());
}

}  // namespace
}  // namespace pqkv::testing
