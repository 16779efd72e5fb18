#include <faiss/impl/ProductQuantizer.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "index_test_util.h"

namespace pqkv::testing {
namespace {

double sq_distance(const float* x, const float* c, int dsub) {
  double d2 = 0;
  for (int d = 0; d < dsub; ++d) {
    const double diff = double(x[d]) - c[d];
    d2 += diff * diff;
  }
  return d2;
}

double sq_norm(const float* x, int dsub) {
  double s = 0;
  for (int d = 0; d < dsub; ++d)
    s += double(x[d]) * x[d];
  return s;
}

struct Geometry {
  int head_dim, m, bits;
};

class PqEncodeCpuTest : public ::testing::TestWithParam<Geometry> {};

// Our codes are Faiss's, except where the two nearest centroids are equally
// near up to float rounding (Faiss computes ||x||^2 + ||c||^2 - 2<x,c> with
// BLAS for wide sub-spaces, we sum squared differences).
TEST_P(PqEncodeCpuTest, CodesEqualFaissComputeCodes) {
  const auto [head_dim, m, bits] = GetParam();
  const int kv_heads = 2;
  const int64_t n = 400;
  const auto keys = clustered_keys(n, kv_heads, head_dim, 21 + bits);
  const auto config = small_config(m, bits, 3);
  auto idx = trained_index(keys, n, kv_heads, head_dim, config);
  auto cb = idx->codebook();
  PQKV_ASSERT_OK(cb);
  const auto& s = cb->shape;
  int64_t near_ties = 0;
  for (int h = 0; h < kv_heads; ++h) {
    const auto ours = all_codes(*idx, h);
    faiss::ProductQuantizer pq(head_dim, m, bits);
    pq.centroids.assign(cb->head(h), cb->head(h) + cb->floats_per_head());
    std::vector<float> x(static_cast<size_t>(n) * head_dim);
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(keys.begin() + (t * kv_heads + h) * head_dim, head_dim, x.begin() + t * head_dim);
    }
    std::vector<uint8_t> packed(static_cast<size_t>(n) * pq.code_size);
    pq.compute_codes(x.data(), packed.data(), n);
    for (int64_t t = 0; t < n; ++t) {
      faiss::PQDecoderGeneric decoder(packed.data() + t * pq.code_size, bits);
      for (int j = 0; j < m; ++j) {
        const int theirs = int(decoder.decode());
        const int mine = ours[t * m + j];
        if (theirs == mine) continue;
        const float* sub = x.data() + t * head_dim + j * s.dsub();
        const double d_mine = sq_distance(sub, cb->sub(h, j) + mine * s.dsub(), s.dsub());
        const double d_theirs = sq_distance(sub, cb->sub(h, j) + theirs * s.dsub(), s.dsub());
        const double scale =
            sq_norm(sub, s.dsub()) + sq_norm(cb->sub(h, j) + theirs * s.dsub(), s.dsub()) + 1.0;
        EXPECT_NEAR(d_mine, d_theirs, 1e-5 * scale)
            << "head " << h << " token " << t << " sub-space " << j << ": ours " << mine
            << ", Faiss " << theirs;
        ++near_ties;
      }
    }
  }
  EXPECT_LE(near_ties, n * m * kv_heads / 100) << "more than 1% of codes differ from Faiss";
}

INSTANTIATE_TEST_SUITE_P(Geometries, PqEncodeCpuTest,
                         ::testing::Values(Geometry{32, 2, 1}, Geometry{32, 4, 3},
                                           Geometry{32, 16, 8}, Geometry{64, 2, 5},
                                           Geometry{64, 4, 8}, Geometry{64, 8, 7},
                                           Geometry{64, 32, 8}, Geometry{128, 2, 6},
                                           Geometry{128, 4, 8}, Geometry{128, 32, 2},
                                           Geometry{128, 64, 4}),
                         [](const auto& info) {
                           std::string name = "d";
                           name += std::to_string(info.param.head_dim);
                           name += "_m";
                           name += std::to_string(info.param.m);
                           name += "_b";
                           name += std::to_string(info.param.bits);
                           return name;
                         });

TEST(PqAddCpuTest, OneAtATimeEqualsOneBatch) {
  const int kv_heads = 2;
  const int head_dim = 64;
  const int64_t n = 97;
  const auto keys = clustered_keys(n, kv_heads, head_dim, 4);
  const auto config = small_config(4, 8, 3);
  auto batch = trained_index(keys, n, kv_heads, head_dim, config);
  auto made = index::make_layer_index(Device::cpu(), batch->shape(), kv_heads);
  PQKV_ASSERT_OK(made);
  auto single = std::move(made).value();
  PQKV_ASSERT_OK(
      single->train(host_view(keys.data(), {n, kv_heads, head_dim}), config, Stream::host()));
  for (int64_t t = 0; t < n; ++t) {
    const Status s = single->add(
        host_view(keys.data() + t * kv_heads * head_dim, {1, kv_heads, head_dim}), Stream::host());
    PQKV_ASSERT_OK(s);
  }
  ASSERT_EQ(single->num_tokens(), n);
  for (int h = 0; h < kv_heads; ++h)
    EXPECT_EQ(all_codes(*single, h), all_codes(*batch, h));
}

// Keys encode the same whatever dtype they arrive in; a new codebook, trained
// here or installed, drops the old codes, and re-adding the keys gives what a
// fresh index with that codebook gives.
TEST(PqAddCpuTest, NewCodebookDropsCodesAndReaddedKeysMatchAFreshIndex) {
  const int kv_heads = 2;
  const int head_dim = 32;
  const int64_t n = 300;
  auto keys = clustered_keys(n, kv_heads, head_dim, 8);
  // The first half arrives as bf16, so the values are their bf16 roundings.
  const int64_t half = n / 2;
  std::vector<uint16_t> bf16(static_cast<size_t>(half) * kv_heads * head_dim);
  for (size_t i = 0; i < bf16.size(); ++i) {
    bf16[i] = float_to_bf16(keys[i]);
    keys[i] = bf16_to_float(bf16[i]);
  }
  const auto first = small_config(4, 6, 2);
  auto second = small_config(4, 6, 6);
  second.seed = 99;
  auto idx = trained_index(keys, n, kv_heads, head_dim, first);  // tokens 0..n-1 once
  auto made = index::make_layer_index(Device::cpu(), idx->shape(), kv_heads);
  PQKV_ASSERT_OK(made);
  auto mixed = std::move(made).value();
  PQKV_ASSERT_OK(
      mixed->train(host_view(keys.data(), {n, kv_heads, head_dim}), first, Stream::host()));
  PQKV_ASSERT_OK(
      mixed->add(TensorView(bf16.data(), DType::kBF16, Device::cpu(), {half, kv_heads, head_dim}),
                 Stream::host()));
  PQKV_ASSERT_OK(mixed->add(
      host_view(keys.data() + half * kv_heads * head_dim, {n - half, kv_heads, head_dim}),
      Stream::host()));
  for (int h = 0; h < kv_heads; ++h)
    EXPECT_EQ(all_codes(*mixed, h), all_codes(*idx, h));

  const auto view = host_view(keys.data(), {n, kv_heads, head_dim});
  PQKV_ASSERT_OK(mixed->train(view, second, Stream::host()));
  EXPECT_EQ(mixed->num_tokens(), 0);
  PQKV_ASSERT_OK(mixed->add(view, Stream::host()));
  auto fresh = trained_index(keys, n, kv_heads, head_dim, second);
  bool changed = false;
  for (int h = 0; h < kv_heads; ++h) {
    EXPECT_EQ(all_codes(*mixed, h), all_codes(*fresh, h));
    changed |= all_codes(*mixed, h) != all_codes(*idx, h);
  }
  EXPECT_TRUE(changed) << "the second codebook should encode some token differently";

  auto cb = fresh->codebook();
  PQKV_ASSERT_OK(cb);
  PQKV_ASSERT_OK(idx->set_codebook(*cb, Stream::host()));
  EXPECT_EQ(idx->num_tokens(), 0);
  PQKV_ASSERT_OK(idx->add(view, Stream::host()));
  for (int h = 0; h < kv_heads; ++h)
    EXPECT_EQ(all_codes(*idx, h), all_codes(*fresh, h));
}

}  // namespace
}  // namespace pqkv::testing
