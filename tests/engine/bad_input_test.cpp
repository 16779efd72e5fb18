#include <gtest/gtest.h>

#include <limits>

#include "engine_test_util.h"

namespace pqkv {
namespace {

using testing::append_random;
using testing::open_small_store;
using testing::random_floats;

bool mentions(const Status& s, const char* text) {
  return s.message().find(text) != std::string::npos;
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    s_ = open_small_store(ModelSpec::tiny(), SequenceOptions{});
    seq_ = s_.seq;
  }
  // After every refused call, the sequence still takes a good prompt and decodes.
  void expect_still_usable() {
    PQKV_ASSERT_OK(append_random(seq_, 64, 1));
    PQKV_ASSERT_OK(seq_->finish_prefill());
    PQKV_ASSERT_OK(append_random(seq_, 1, 2));
    std::vector<float> q = random_floats(4 * 32, 3), out(4 * 32);
    PQKV_ASSERT_OK(seq_->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}),
                                Stream::host()));
  }
  testing::SmallStore s_;
  Sequence* seq_ = nullptr;
};

TEST_F(BadInputTest, WrongShapes) {
  std::vector<float> k(10 * 3 * 32), v(10 * 2 * 32);
  Status s = seq_->append(0, host_view(k.data(), {10, 3, 32}), host_view(v.data(), {10, 2, 32}),
                          Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(mentions(s, "keys must have shape [*, 2, 32], got [10, 3, 32]")) << s.to_string();
  s = seq_->append(0, host_view(v.data(), {10, 2, 32}), host_view(v.data(), {9, 2, 32}),
                   Stream::host());
  EXPECT_TRUE(mentions(s, "values must have shape [10, 2, 32]")) << s.to_string();
  s = seq_->append(7, host_view(v.data(), {10, 2, 32}), host_view(v.data(), {10, 2, 32}),
                   Stream::host());
  EXPECT_TRUE(mentions(s, "layer 7 is out of range")) << s.to_string();
  EXPECT_EQ(seq_->length(0), 0);
  expect_still_usable();
  std::vector<float> q(4 * 16), out(4 * 32);
  s = seq_->attend(0, host_view(q.data(), {4, 16}), host_view(out.data(), {4, 32}), Stream::host());
  EXPECT_TRUE(mentions(s, "queries must have shape [4, 32]")) << s.to_string();
}

TEST_F(BadInputTest, NanOrInfInKeysIsRefusedAndNothingAppended) {
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto k = random_floats(5 * 2 * 32, 4);
    auto v = random_floats(5 * 2 * 32, 5);
    k[3 * 64 + 32 + 7] = bad;
    Status s = seq_->append(0, host_view(k.data(), {5, 2, 32}), host_view(v.data(), {5, 2, 32}),
                            Stream::host());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(mentions(s, "at token 3, head 1, dim 7")) << s.to_string();
    EXPECT_EQ(seq_->length(0), 0);
  }
  expect_still_usable();
}

TEST_F(BadInputTest, AttendBeforePrefill) {
  PQKV_ASSERT_OK(append_random(seq_, 8, 1));
  std::vector<float> q(4 * 32), out(4 * 32);
  Status s =
      seq_->attend(0, host_view(q.data(), {4, 32}), host_view(out.data(), {4, 32}), Stream::host());
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(mentions(s, "finish_prefill")) << s.to_string();
}

TEST_F(BadInputTest, UnevenPrefillAndOutOfOrderDecodeAppends) {
  std::vector<float> k = random_floats(10 * 64, 6);
  PQKV_ASSERT_OK(seq_->append(0, host_view(k.data(), {10, 2, 32}), host_view(k.data(), {10, 2, 32}),
                              Stream::host()));
  Status s = seq_->finish_prefill();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(mentions(s, "layer 1 holds 0")) << s.to_string();
  PQKV_ASSERT_OK(seq_->append(1, host_view(k.data(), {10, 2, 32}), host_view(k.data(), {10, 2, 32}),
                              Stream::host()));
  PQKV_ASSERT_OK(seq_->finish_prefill());
  EXPECT_EQ(seq_->finish_prefill().code(), StatusCode::kFailedPrecondition);

  // Layer 1 may not run ahead of layer 0.
  s = seq_->append(1, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}),
                   Stream::host());
  EXPECT_TRUE(mentions(s, "out of order")) << s.to_string();
  PQKV_ASSERT_OK(seq_->append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}),
                              Stream::host()));
  // Layer 0 may not start the next step before layer 1 finished this one.
  s = seq_->append(0, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}),
                   Stream::host());
  EXPECT_TRUE(mentions(s, "has not received the previous token")) << s.to_string();
  PQKV_ASSERT_OK(seq_->append(1, host_view(k.data(), {1, 2, 32}), host_view(k.data(), {1, 2, 32}),
                              Stream::host()));
  EXPECT_EQ(seq_->length(0), 11);
  EXPECT_EQ(seq_->length(1), 11);
}

TEST(StoreTest, DramBudgetExhaustedMidPrefillKeepsEarlierLayers) {
  ModelSpec spec = ModelSpec::tiny();  // a block is 128 rows x 128 B = 16 KiB
  auto s = open_small_store(spec, SequenceOptions{}, /*dram_budget=*/3 << 19);
  const int64_t n = 4096;  // 32 blocks x 2 KV heads = 1 MiB per layer
  auto k = random_floats(n * 64, 1);
  PQKV_ASSERT_OK(s.seq->append(0, host_view(k.data(), {n, 2, 32}), host_view(k.data(), {n, 2, 32}),
                               Stream::host()));
  Status st = s.seq->append(1, host_view(k.data(), {n, 2, 32}), host_view(k.data(), {n, 2, 32}),
                            Stream::host());
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(mentions(st, "dram_budget_bytes")) << st.to_string();
  EXPECT_EQ(s.seq->length(0), n);
  EXPECT_EQ(s.seq->length(1), 0);
  EXPECT_EQ(s.store->dram_bytes_used(), 2 << 19);
  // Dropping gives the blocks back to the store, which keeps them for the
  // next sequence: the same tokens fit again without more memory.
  PQKV_ASSERT_OK(s.store->drop("s"));
  EXPECT_EQ(s.store->dram_bytes_used(), 2 << 19);
  auto next = s.store->create_sequence("t", SequenceOptions{});
  PQKV_ASSERT_OK(next);
  st = (*next)->append(0, host_view(k.data(), {n, 2, 32}), host_view(k.data(), {n, 2, 32}),
                       Stream::host());
  PQKV_ASSERT_OK(st);
  EXPECT_EQ(s.store->dram_bytes_used(), 2 << 19);
}

TEST(StoreTest, NamesAreUniqueAndLookedUp) {
  auto store = std::move(Store::open(testing::cpu_store_options(ModelSpec::tiny()))).value();
  PQKV_ASSERT_OK(store->create_sequence("a", {}));
  EXPECT_EQ(store->create_sequence("a", {}).status().code(), StatusCode::kAlreadyExists);
  PQKV_EXPECT_OK(store->get_sequence("a"));
  EXPECT_EQ(store->get_sequence("b").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store->drop("b").code(), StatusCode::kNotFound);
  SequenceOptions bad;
  bad.pq.m = 5;
  EXPECT_EQ(store->create_sequence("c", bad).status().code(), StatusCode::kInvalidArgument);
  StoreOptions so;
  so.spec = ModelSpec::tiny();
  so.spec.num_q_heads = 3;
  EXPECT_EQ(Store::open(so).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv
