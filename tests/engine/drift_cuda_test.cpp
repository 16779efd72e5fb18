// Drift and refits on a CUDA store (SequenceOptions::refit_threshold): the
// error ratio measured on the GPU as tokens are appended, agreeing with a
// cpu store's; drifted appends that start a refit on the build stream, the
// swap at a later append, and decoding over the new codes. Skips without a
// GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "engine_test_util.h"

namespace pqkv::testing {
namespace {

// The CUDA decode path is built for head_dim 64 and 128.
ModelSpec cuda_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.head_dim = 64;
  return spec;
}

SequenceOptions refit_options(double threshold, int64_t min_tokens) {
  SequenceOptions o;
  o.selection.code = KeyCode::kInt8;
  o.refit_threshold = threshold;
  o.refit_min_tokens = min_tokens;
  return o;
}

std::unique_ptr<Store> open_store(const Device& device) {
  StoreOptions so;
  so.spec = cuda_spec();
  so.device = device;
  auto store = Store::open(so);
  PQKV_EXPECT_OK(store);
  return store.ok() ? std::move(store).value() : nullptr;
}

TEST(DriftCudaTest, RatiosAgreeWithACpuStore) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 43;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<DriftStats> got;
  for (const Device device : {Device::cuda(0), Device::cpu()}) {
    auto store = open_store(device);
    ASSERT_NE(store, nullptr);
    auto seq = store->create_sequence("s", refit_options(0, 512));
    PQKV_ASSERT_OK(seq);
    Sequence* s = seq->get();
    PQKV_ASSERT_OK(append_random(s, 2048, seed));
    PQKV_ASSERT_OK(s->finish_prefill());
    PQKV_ASSERT_OK(append_random(s, 64, seed + 1));
    for (int t = 0; t < 64; ++t)
      PQKV_ASSERT_OK(append_moved(s, 1, seed + 2 + t, 2.0f, 1.0f));
    // Host appends finish before they return: what the GPU published is final.
    auto d = s->drift_stats(1);
    PQKV_ASSERT_OK(d);
    got.push_back(*d);
  }
  const DriftStats& gpu = got[0];
  const DriftStats& cpu = got[1];
  EXPECT_TRUE(gpu.tracking);
  EXPECT_EQ(gpu.fit_tokens, cpu.fit_tokens);
  EXPECT_EQ(gpu.tokens_since_fit, 128);
  EXPECT_EQ(cpu.tokens_since_fit, 128);
  ASSERT_EQ(gpu.head_error_ratio.size(), cpu.head_error_ratio.size());
  for (size_t h = 0; h < gpu.head_error_ratio.size(); ++h) {
    // The cpu store measures the stored (bf16) keys, the GPU the appended ones.
    EXPECT_NEAR(gpu.head_error_ratio[h], cpu.head_error_ratio[h], 0.05 * cpu.head_error_ratio[h])
        << "KV head " << h;
  }
  EXPECT_GT(gpu.max_error_ratio, 1.5);
}

TEST(DriftCudaTest, DriftedAppendsStartARefitOffTheDecodePath) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 41;
  SCOPED_TRACE("seed " + std::to_string(seed));
  auto store = open_store(Device::cuda(0));
  ASSERT_NE(store, nullptr);
  auto made = store->create_sequence("s", refit_options(2, 64));
  PQKV_ASSERT_OK(made);
  Sequence* s = made->get();
  PQKV_ASSERT_OK(s->reserve(4096));
  PQKV_ASSERT_OK(append_random(s, 2048, seed));
  PQKV_ASSERT_OK(s->finish_prefill());
  // In-distribution tokens: no refit however many.
  for (int t = 0; t < 96; ++t)
    PQKV_ASSERT_OK(append_random(s, 1, seed + 1 + t));
  auto d = s->drift_stats(0);
  PQKV_ASSERT_OK(d);
  EXPECT_EQ(d->tokens_since_fit, 96);
  EXPECT_LT(d->max_error_ratio, 1.5);
  EXPECT_EQ(d->refits, 0);
  // Drifted tokens: the first one passes the threshold (64 tokens since the
  // fit are in), and the refit is enqueued in that append.
  PQKV_ASSERT_OK(append_moved(s, 1, seed + 200, 3.0f, 4.0f));
  for (int l = 0; l < 2; ++l) {
    d = s->drift_stats(l);
    PQKV_ASSERT_OK(d);
    EXPECT_GT(d->max_error_ratio, 2.0);
    EXPECT_TRUE(d->refit_running) << "layer " << l;
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // The next append swaps the refit in: fit on every key but the sink.
  PQKV_ASSERT_OK(append_moved(s, 1, seed + 201, 3.0f, 4.0f));
  for (int l = 0; l < 2; ++l) {
    d = s->drift_stats(l);
    PQKV_ASSERT_OK(d);
    EXPECT_EQ(d->refits, 1) << "layer " << l;
    EXPECT_FALSE(d->refit_running);
    EXPECT_TRUE(d->last_refit_error.empty()) << d->last_refit_error;
    EXPECT_EQ(d->fit_tokens, 2048 + 96 + 1 - 32);
    EXPECT_EQ(d->tokens_since_fit, 1);
    EXPECT_GT(d->last_refit_ms, 0.0);
  }
  // Decoding goes on over the new codes.
  const ModelSpec spec = cuda_spec();
  std::vector<float> q = random_floats(spec.num_q_heads * spec.head_dim, seed + 400);
  std::vector<float> out(q.size());
  for (int l = 0; l < 2; ++l) {
    PQKV_ASSERT_OK(s->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                             host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                             Stream::host()));
  }
  PQKV_ASSERT_OK(s->check_health());
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
