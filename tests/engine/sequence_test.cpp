#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "engine_test_util.h"

namespace pqkv {
namespace {

using testing::append_random;
using testing::open_small_store;
using testing::random_floats;
using testing::relative_error;

// Exact attention in double over host float keys/values [n, kv_heads, d].
std::vector<float> naive_attention(const ModelSpec& spec, const std::vector<float>& keys,
                                   const std::vector<float>& values, int64_t n,
                                   const std::vector<float>& q) {
  const int d = spec.head_dim;
  std::vector<float> out(static_cast<size_t>(spec.num_q_heads) * d);
  for (int h = 0; h < spec.num_q_heads; ++h) {
    const int kvh = h / spec.group_size();
    std::vector<double> s(n);
    double mx = -1e300;
    for (int64_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int c = 0; c < d; ++c)
        dot += double(q[h * d + c]) * keys[(t * spec.num_kv_heads + kvh) * d + c];
      s[t] = dot / std::sqrt(double(d));
      mx = std::max(mx, s[t]);
    }
    double sum = 0;
    for (auto& x : s)
      sum += (x = std::exp(x - mx));
    for (int c = 0; c < d; ++c) {
      double acc = 0;
      for (int64_t t = 0; t < n; ++t)
        acc += s[t] * values[(t * spec.num_kv_heads + kvh) * d + c];
      out[h * d + c] = static_cast<float>(acc / sum);
    }
  }
  return out;
}

TEST(SequenceTest, FullBudgetEqualsExactAttention) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    ModelSpec spec = ModelSpec::tiny();
    spec.dtype = dt;
    SequenceOptions opts;
    opts.budget = BudgetPolicy::everything();
    auto s = open_small_store(spec, opts);
    const int64_t n = 300;
    const int64_t per = n * spec.num_kv_heads * spec.head_dim;
    auto k = random_floats(per, 1);
    auto v = random_floats(per, 2);
    for (int l = 0; l < spec.num_layers; ++l) {
      PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {n, 2, 32}),
                                   host_view(v.data(), {n, 2, 32}), Stream::host()));
    }
    PQKV_ASSERT_OK(s.seq->finish_prefill());
    auto q = random_floats(spec.num_q_heads * spec.head_dim, 3);
    std::vector<float> out(q.size()), exact(q.size());
    AttendTrace trace;
    PQKV_ASSERT_OK(s.seq->attend(1, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                                 Stream::host(), &trace));
    PQKV_ASSERT_OK(s.seq->attend_exact(1, host_view(q.data(), {4, 32}),
                                       host_view(exact.data(), {4, 32}), Stream::host()));
    EXPECT_TRUE(trace.exact);
    const double tol = dt == DType::kF32 ? 1e-5 : 1e-2;
    EXPECT_LT(relative_error(out, exact), 1e-6) << dtype_name(dt);
    EXPECT_LT(relative_error(out, naive_attention(spec, k, v, n, q)), tol) << dtype_name(dt);
  }
}

TEST(SequenceTest, BudgetFollowsTheContextThroughALongGeneration) {
  // A 16-token prompt, then 2000 generated tokens: pqkv's budget grows with
  // the context, where PQCache's rule, frozen at the prompt, keeps attending
  // to the sink and the newest token only.
  ModelSpec spec = ModelSpec::tiny();
  SequenceOptions ours;
  ours.budget = BudgetPolicy::ratio_of_context(0.1);
  SequenceOptions frozen;
  frozen.budget = BudgetPolicy::pqcache(0.1, 0.5);
  for (bool grows : {true, false}) {
    auto s = open_small_store(spec, grows ? ours : frozen);
    PQKV_ASSERT_OK(append_random(s.seq, 16, 7));
    PQKV_ASSERT_OK(s.seq->finish_prefill());
    std::vector<float> q = random_floats(4 * 32, 8), out(4 * 32);
    AttendTrace trace;
    for (int step = 0; step < 2000; ++step) {
      PQKV_ASSERT_OK(append_random(s.seq, 1, 100 + step));
      if (step % 500 != 499) continue;
      for (int l = 0; l < spec.num_layers; ++l) {
        PQKV_ASSERT_OK(s.seq->attend(l, host_view(q.data(), {4, 32}),
                                     host_view(out.data(), {4, 32}), Stream::host(), &trace));
      }
    }
    const int64_t attended = static_cast<int64_t>(trace.attended[0].size());
    EXPECT_EQ(trace.context_length, 2016);
    if (grows) {
      EXPECT_EQ(attended, 32 + 101 + 101);
      EXPECT_EQ(trace.selected[0].size(), 101u);
    } else {
      EXPECT_EQ(attended, 32 + 1);  // sink + newest: what the frozen rule leaves
    }
  }
}

TEST(SequenceTest, ShortPromptStillAttendsAndNextPromptDoesNotWait) {
  // PQCache built no codebook when L - S <= 2^b and then attended only to the
  // current token. Here a 40-token prompt (8 past the sink, far fewer than 256
  // centroids) trains an index, and the step attends to sink + window + top-K.
  ModelSpec spec = ModelSpec::tiny();
  SequenceOptions opts;
  opts.budget.sink = {4, 0};
  opts.budget.window = {4, 0};
  opts.budget.top_k = {8, 0};
  for (int prompt = 0; prompt < 2; ++prompt) {
    auto s = open_small_store(spec, opts);
    PQKV_ASSERT_OK(append_random(s.seq, 40, 11 + prompt));
    PQKV_ASSERT_OK(s.seq->finish_prefill());
    std::vector<float> q = random_floats(4 * 32, 12), out(4 * 32);
    AttendTrace trace;
    PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                                 Stream::host(), &trace));
    EXPECT_EQ(trace.attended[0].size(), 16u);
    std::set<int64_t> unique(trace.attended[1].begin(), trace.attended[1].end());
    EXPECT_EQ(unique.size(), 16u);
    for (float x : out)
      EXPECT_TRUE(std::isfinite(x));
  }
}

TEST(SequenceTest, PromptShorterThanTheSinkTrainsWhenTheContextGrows) {
  ModelSpec spec = ModelSpec::tiny();
  SequenceOptions opts;
  opts.budget.sink = {32, 0};
  opts.budget.window = {8, 0};
  opts.budget.top_k = {8, 0};
  auto s = open_small_store(spec, opts);
  PQKV_ASSERT_OK(append_random(s.seq, 10, 3));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  std::vector<float> q = random_floats(4 * 32, 4), out(4 * 32);
  AttendTrace trace;
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                               Stream::host(), &trace));
  EXPECT_TRUE(trace.exact);
  for (int i = 0; i < 100; ++i)
    PQKV_ASSERT_OK(append_random(s.seq, 1, 50 + i));
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                               Stream::host(), &trace));
  EXPECT_FALSE(trace.exact);
  EXPECT_EQ(trace.selected[0].size(), 8u);
  for (int64_t t : trace.selected[0]) {
    EXPECT_GE(t, 32);
    EXPECT_LT(t, 110 - 8);
  }
}

TEST(SequenceTest, NewestTokenIsServedFresh) {
  // The original cache could serve a partly filled block's stale K/V. Every
  // step here plants a key that the query matches strongly in the newest
  // token, with a distinctive value: the output must be that value.
  ModelSpec spec = ModelSpec::tiny();
  spec.dtype = DType::kF32;
  SequenceOptions opts;
  opts.budget = BudgetPolicy::ratio_of_context(0.1);
  auto s = open_small_store(spec, opts);
  PQKV_ASSERT_OK(append_random(s.seq, 200, 5));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  std::vector<float> q(4 * 32, 0.0f);
  for (int h = 0; h < 4; ++h)
    q[h * 32] = 40.0f;
  for (int step = 0; step < 5; ++step) {
    for (int l = 0; l < spec.num_layers; ++l) {
      std::vector<float> k(2 * 32, 0.0f), v(2 * 32, float(step + 1));
      k[0] = k[32] = 40.0f + 2.0f * step;  // each step's key scores ~14 above the last
      PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {1, 2, 32}),
                                   host_view(v.data(), {1, 2, 32}), Stream::host()));
      std::vector<float> out(4 * 32);
      PQKV_ASSERT_OK(s.seq->attend(l, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                                   Stream::host(), nullptr));
      EXPECT_NEAR(out[0], float(step + 1), 1e-3) << "step " << step;
    }
  }
}

TEST(SequenceTest, TrainingReadsOnlyWrittenRows) {
  // Run the same short-prompt sequence twice: once in a fresh store and once
  // after a dropped sequence left poisoned memory behind for malloc to reuse.
  // Any read of an unwritten row would make the two outputs differ.
  ModelSpec spec = ModelSpec::tiny();
  SequenceOptions opts;
  opts.budget.sink = {4, 0};
  opts.budget.window = {2, 0};
  opts.budget.top_k = {6, 0};
  auto run = [&](bool poison) {
    StoreOptions so = testing::cpu_store_options(spec);
    auto store = std::move(Store::open(so)).value();
    if (poison) {
      auto junk = store->create_sequence("junk", opts).value();
      const int64_t n = 5000;
      std::vector<float> big(n * 2 * 32, 3.0e4f);
      for (int l = 0; l < 2; ++l) {
        PQKV_EXPECT_OK(junk->append(l, host_view(big.data(), {n, 2, 32}),
                                    host_view(big.data(), {n, 2, 32}), Stream::host()));
      }
      PQKV_EXPECT_OK(store->drop("junk"));
    }
    auto seq = store->create_sequence("s", opts).value();
    PQKV_EXPECT_OK(append_random(seq.get(), 20, 9));
    PQKV_EXPECT_OK(seq->finish_prefill());
    std::vector<float> q = random_floats(4 * 32, 10), out(4 * 32);
    PQKV_EXPECT_OK(seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                               Stream::host(), nullptr));
    return out;
  };
  EXPECT_EQ(run(false), run(true));
}

TEST(SequenceTest, PlantedNeedleIsSelected) {
  ModelSpec spec = ModelSpec::tiny();
  SequenceOptions opts;
  opts.budget.sink = {8, 0};
  opts.budget.window = {16, 0};
  opts.budget.top_k = {20, 0};
  auto s = open_small_store(spec, opts);
  const int64_t n = 2000;
  const int64_t needle = 777;
  const int64_t per = n * 2 * 32;
  auto k = random_floats(per, 21, 0.5f);
  auto v = random_floats(per, 22);
  for (int h = 0; h < 2; ++h) {
    for (int c = 0; c < 32; ++c)
      k[(needle * 2 + h) * 32 + c] = (c % 2 ? 3.0f : -3.0f);
  }
  for (int l = 0; l < 2; ++l) {
    PQKV_ASSERT_OK(s.seq->append(l, host_view(k.data(), {n, 2, 32}),
                                 host_view(v.data(), {n, 2, 32}), Stream::host()));
  }
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  std::vector<float> q(4 * 32), out(4 * 32);
  for (int h = 0; h < 4; ++h) {
    for (int c = 0; c < 32; ++c)
      q[h * 32 + c] = (c % 2 ? 1.0f : -1.0f);
  }
  AttendTrace trace;
  PQKV_ASSERT_OK(s.seq->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                               Stream::host(), &trace));
  for (int h = 0; h < 2; ++h) {
    const auto& sel = trace.selected[h];
    EXPECT_NE(std::find(sel.begin(), sel.end(), needle), sel.end()) << "kv head " << h;
  }
}

// Nothing on a cpu store runs on a device, so there is no device length to
// take: sync_length is OK and changes nothing, and direct calls go on.
TEST(SequenceTest, SyncLengthOnACpuStoreChangesNothing) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  PQKV_ASSERT_OK(append_random(s.seq, 40, 3));
  PQKV_ASSERT_OK(s.seq->finish_prefill());
  PQKV_ASSERT_OK(s.seq->sync_length(Stream::host()));
  EXPECT_EQ(s.seq->length(0), 40);
  EXPECT_EQ(s.seq->length(1), 40);
  PQKV_ASSERT_OK(append_random(s.seq, 1, 4));
  EXPECT_EQ(s.seq->length(1), 41);
}

}  // namespace
}  // namespace pqkv
