#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "index/cpu/pq_search_cpu.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::LayerCodebook;
using index::PqShape;
using index::SearchRequest;

constexpr int kKvHeads = 2;
constexpr int kHeadDim = 32;
constexpr int64_t kTokens = 50;

TEST(PqCodebookTest, ShapeValidation) {
  PQKV_EXPECT_OK(PqShape{128, 4, 8}.validate());
  PQKV_EXPECT_OK(PqShape{64, 32, 1}.validate());
  EXPECT_EQ((PqShape{0, 1, 8}.validate().code()), StatusCode::kInvalidArgument);
  EXPECT_EQ((PqShape{128, 3, 8}.validate().code()), StatusCode::kInvalidArgument);
  EXPECT_EQ((PqShape{128, 0, 8}.validate().code()), StatusCode::kInvalidArgument);
  EXPECT_EQ((PqShape{128, 128, 8}.validate().code()), StatusCode::kInvalidArgument);
  EXPECT_EQ((PqShape{128, 4, 0}.validate().code()), StatusCode::kInvalidArgument);
  EXPECT_EQ((PqShape{128, 4, 9}.validate().code()), StatusCode::kInvalidArgument);
}

TEST(PqCodebookTest, CodebookValidation) {
  LayerCodebook cb;
  cb.shape = {32, 4, 3};
  cb.num_kv_heads = 2;
  cb.centroids.assign(static_cast<size_t>(2 * cb.floats_per_head()), 0.5f);
  PQKV_EXPECT_OK(cb.validate());
  cb.objective.assign(8, 1.0);
  PQKV_EXPECT_OK(cb.validate());
  cb.objective.assign(3, 1.0);
  EXPECT_EQ(cb.validate().code(), StatusCode::kInvalidArgument);
  cb.objective.clear();
  cb.centroids.pop_back();
  EXPECT_EQ(cb.validate().code(), StatusCode::kInvalidArgument);
  cb.centroids.push_back(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(cb.validate().code(), StatusCode::kInvalidArgument);
  cb.centroids.back() = 0.0f;
  cb.num_kv_heads = 0;
  EXPECT_EQ(cb.validate().code(), StatusCode::kInvalidArgument);
  cb.num_kv_heads = 2;
  cb.shape.bits = 9;
  EXPECT_EQ(cb.validate().code(), StatusCode::kInvalidArgument);
}

TEST(LayerIndexCpuTest, FactoryChecksItsArguments) {
  const PqShape shape{kHeadDim, 4, 6};
  auto cpu = index::make_layer_index(Device::cpu(), shape, kKvHeads);
  PQKV_ASSERT_OK(cpu);
  EXPECT_EQ((*cpu)->device(), Device::cpu());
  EXPECT_EQ((*cpu)->shape(), shape);
  EXPECT_EQ((*cpu)->num_kv_heads(), kKvHeads);
  EXPECT_FALSE((*cpu)->trained());
  EXPECT_EQ((*cpu)->num_tokens(), 0);
  if (cuda_device_count() == 0) {
    // Built without CUDA, or no GPU: a clear Unavailable, not a crash.
    EXPECT_EQ(index::make_layer_index(Device::cuda(), shape, kKvHeads).status().code(),
              StatusCode::kUnavailable);
  }
  EXPECT_EQ(
      index::make_layer_index(Device::cpu(), PqShape{kHeadDim, 5, 6}, kKvHeads).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(index::make_layer_index(Device::cpu(), shape, 0).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(LayerIndexCpuTest, UntrainedIndexRefusesWork) {
  auto made = index::make_layer_index(Device::cpu(), PqShape{kHeadDim, 4, 6}, kKvHeads);
  PQKV_ASSERT_OK(made);
  auto& idx = *made.value();
  const auto keys = clustered_keys(4, kKvHeads, kHeadDim, 1);
  EXPECT_EQ(idx.add(host_view(keys.data(), {4, kKvHeads, kHeadDim}), Stream::host()).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx.codebook().status().code(), StatusCode::kFailedPrecondition);
  const auto q = random_floats(kKvHeads * kHeadDim, 1);
  int32_t out[4];
  EXPECT_EQ(
      idx.search({host_view(q.data(), {kKvHeads, kHeadDim}), 0, 0, 1}, out, Stream::host(), nullptr)
          .code(),
      StatusCode::kFailedPrecondition);
  PQKV_EXPECT_OK(idx.copy_codes(0, 0, 0, nullptr));
  EXPECT_EQ(idx.num_tokens(), 0);
}

class LayerIndexCpuBadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    keys_ = clustered_keys(kTokens, kKvHeads, kHeadDim, 12);
    idx_ = trained_index(keys_, kTokens, kKvHeads, kHeadDim, config_);
    queries_ = random_floats(4 * kHeadDim, 13);
    codes_before_ = {all_codes(*idx_, 0), all_codes(*idx_, 1)};
    centroids_before_ = idx_->codebook()->centroids;
  }

  // After any rejected call the index is as it was and still searches.
  void expect_unchanged_and_usable() {
    EXPECT_EQ(idx_->num_tokens(), kTokens);
    EXPECT_EQ(all_codes(*idx_, 0), codes_before_[0]);
    EXPECT_EQ(all_codes(*idx_, 1), codes_before_[1]);
    EXPECT_EQ(idx_->codebook()->centroids, centroids_before_);
    std::vector<int32_t> out(kKvHeads * 5);
    const Status s = idx_->search(good_request(), out.data(), Stream::host(), nullptr);
    PQKV_ASSERT_OK(s);
    for (int kv = 0; kv < kKvHeads; ++kv) {
      for (int i = 0; i < 5; ++i)
        EXPECT_TRUE(out[kv * 5 + i] >= 0 && out[kv * 5 + i] < kTokens);
    }
  }

  SearchRequest good_request() {
    return {host_view(queries_.data(), {4, kHeadDim}), 0, kTokens, 5};
  }

  void expect_search_error(const SearchRequest& request, StatusCode code, const char* what,
                           bool null_out = false) {
    std::vector<int32_t> out(kKvHeads * 64);
    const Status s =
        idx_->search(request, null_out ? nullptr : out.data(), Stream::host(), nullptr);
    EXPECT_EQ(s.code(), code) << what << ": " << s.to_string();
    EXPECT_FALSE(s.message().empty()) << what;
    expect_unchanged_and_usable();
  }

  PqConfig config_ = small_config(4, 6);
  std::vector<float> keys_;
  std::vector<float> queries_;
  std::unique_ptr<index::LayerIndex> idx_;
  std::vector<std::vector<uint8_t>> codes_before_;
  std::vector<float> centroids_before_;
};

TEST_F(LayerIndexCpuBadInputTest, Search) {
  using enum StatusCode;
  auto r = good_request();
  r.queries = host_view(queries_.data(), {3, kHeadDim});
  expect_search_error(r, kInvalidArgument, "3 query heads for 2 KV heads");
  r.queries = host_view(queries_.data(), {0, kHeadDim});
  expect_search_error(r, kInvalidArgument, "no query heads");
  r.queries = host_view(queries_.data(), {2, 2 * kHeadDim});
  expect_search_error(r, kInvalidArgument, "wrong head_dim");
  r.queries = host_view(queries_.data(), {4 * kHeadDim});
  expect_search_error(r, kInvalidArgument, "rank 1 queries");
  r.queries = TensorView(queries_.data(), DType::kBF16, Device::cpu(), {4, kHeadDim});
  expect_search_error(r, kInvalidArgument, "bf16 queries");
  r.queries = TensorView(queries_.data(), DType::kF32, Device::cuda(), {4, kHeadDim});
  expect_search_error(r, kInvalidArgument, "device queries");
  r.queries = TensorView(static_cast<float*>(nullptr), DType::kF32, Device::cpu(), {4, kHeadDim});
  expect_search_error(r, kInvalidArgument, "null queries");

  auto nan_queries = queries_;
  nan_queries[37] = std::numeric_limits<float>::quiet_NaN();
  r = good_request();
  r.queries = host_view(nan_queries.data(), {4, kHeadDim});
  expect_search_error(r, kInvalidArgument, "NaN query");

  r = good_request();
  r.begin = -1;
  expect_search_error(r, kInvalidArgument, "begin < 0");
  r = good_request();
  r.end = kTokens + 1;
  expect_search_error(r, kInvalidArgument, "end past the tokens");
  r = good_request();
  r.begin = 10;
  r.end = 9;
  expect_search_error(r, kInvalidArgument, "begin > end");
  r = good_request();
  r.k = -1;
  expect_search_error(r, kInvalidArgument, "k < 0");
  for (float share : {-0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    r = good_request();
    r.sm_share = share;
    expect_search_error(r, kInvalidArgument, "sm_share out of [0, 1]");
  }
  expect_search_error(good_request(), kInvalidArgument, "null output", /*null_out=*/true);

  // Nothing to keep: a null output is fine.
  r = good_request();
  r.k = 0;
  PQKV_EXPECT_OK(idx_->search(r, nullptr, Stream::host(), nullptr));
  r = good_request();
  r.begin = r.end = 20;
  PQKV_EXPECT_OK(idx_->search(r, nullptr, Stream::host(), nullptr));
  // A share of the device is a hint the CPU index takes and ignores.
  r = good_request();
  r.sm_share = 0.25f;
  std::vector<int32_t> shared(static_cast<size_t>(kKvHeads * r.k)), whole(shared.size());
  PQKV_EXPECT_OK(idx_->search(r, shared.data(), Stream::host(), nullptr));
  r.sm_share = 1.0f;
  PQKV_EXPECT_OK(idx_->search(r, whole.data(), Stream::host(), nullptr));
  EXPECT_EQ(shared, whole);
  expect_unchanged_and_usable();
}

TEST_F(LayerIndexCpuBadInputTest, TrainAddAndCodebook) {
  using enum StatusCode;
  const auto view = host_view(keys_.data(), {kTokens, kKvHeads, kHeadDim});
  EXPECT_EQ(
      idx_->train(host_view(keys_.data(), {0, kKvHeads, kHeadDim}), config_, Stream::host()).code(),
      kInvalidArgument);
  expect_unchanged_and_usable();
  EXPECT_EQ(
      idx_->train(host_view(keys_.data(), {kTokens, kKvHeads * kHeadDim}), config_, Stream::host())
          .code(),
      kInvalidArgument);
  EXPECT_EQ(
      idx_->train(host_view(keys_.data(), {kTokens / 2, 1, 2 * kHeadDim}), config_, Stream::host())
          .code(),
      kInvalidArgument);
  EXPECT_EQ(idx_->train(TensorView(keys_.data(), DType::kF32, Device::cuda(),
                                   {kTokens, kKvHeads, kHeadDim}),
                        config_, Stream::host())
                .code(),
            kInvalidArgument);
  EXPECT_EQ(idx_->train(view, small_config(2, 6), Stream::host()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->train(view, small_config(4, 6, 0), Stream::host()).code(), kInvalidArgument);
  auto nan_keys = keys_;
  nan_keys[500] = std::numeric_limits<float>::infinity();
  const auto nan_view = host_view(nan_keys.data(), {kTokens, kKvHeads, kHeadDim});
  EXPECT_EQ(idx_->train(nan_view, config_, Stream::host()).code(), kInvalidArgument);
  expect_unchanged_and_usable();

  EXPECT_EQ(idx_->add(nan_view, Stream::host()).code(), kInvalidArgument);
  EXPECT_EQ(
      idx_->add(host_view(keys_.data(), {kTokens, kKvHeads + 1, kHeadDim}), Stream::host()).code(),
      kInvalidArgument);
  PQKV_EXPECT_OK(idx_->add(host_view(keys_.data(), {0, kKvHeads, kHeadDim}), Stream::host()));
  expect_unchanged_and_usable();

  auto cb = idx_->codebook();
  PQKV_ASSERT_OK(cb);
  LayerCodebook wrong = *cb;
  wrong.num_kv_heads = 1;
  wrong.centroids.resize(static_cast<size_t>(wrong.floats_per_head()));
  EXPECT_EQ(idx_->set_codebook(wrong, Stream::host()).code(), kInvalidArgument);
  wrong = *cb;
  wrong.centroids.pop_back();
  EXPECT_EQ(idx_->set_codebook(wrong, Stream::host()).code(), kInvalidArgument);
  wrong = *cb;
  wrong.centroids[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(idx_->set_codebook(wrong, Stream::host()).code(), kInvalidArgument);
  expect_unchanged_and_usable();
}

TEST_F(LayerIndexCpuBadInputTest, CopyCodes) {
  using enum StatusCode;
  std::vector<uint8_t> out(static_cast<size_t>(kTokens) * 4);
  EXPECT_EQ(idx_->copy_codes(-1, 0, 1, out.data()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->copy_codes(kKvHeads, 0, 1, out.data()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->copy_codes(0, -1, 1, out.data()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->copy_codes(0, 3, 2, out.data()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->copy_codes(0, 0, kTokens + 1, out.data()).code(), kInvalidArgument);
  EXPECT_EQ(idx_->copy_codes(0, 0, 1, nullptr).code(), kInvalidArgument);
  PQKV_ASSERT_OK(idx_->copy_codes(1, 10, 13, out.data()));
  EXPECT_TRUE(std::equal(out.begin(), out.begin() + 12, codes_before_[1].begin() + 40));
  expect_unchanged_and_usable();
}

}  // namespace
}  // namespace pqkv::testing
