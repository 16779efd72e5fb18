// LayerIndexCuda::snapshot and restore against the CPU index, for every code
// the CUDA index scores: a snapshot of either backend restores into the
// other byte for byte (codec state and codes), and the restored index
// selects a top-k of the CPU codec's reference scores (the scalar-vs-tensor-
// core tolerance of code_index_cuda_test.cpp); CUDA to CUDA selects exactly
// the same positions. Every test skips without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cpu/pq_search_cpu.h"
#include "index/key_codec.h"
#include "index/layer_index.h"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

struct SnapCase {
  const char* selection;
  int head_dim;
  std::string to_string() const {
    return std::string(selection) + " head_dim=" + std::to_string(head_dim);
  }
};

constexpr int kKvHeads = 2;
constexpr int kGroup = 4;
constexpr int64_t kTokens = 1037;
constexpr int64_t kK = 41;

PqConfig pq_config() {
  PqConfig pq = small_config(16, 6);
  pq.seed = 11;
  return pq;
}

void expect_same_snapshot(const index::IndexSnapshot& a, const index::IndexSnapshot& b) {
  ASSERT_EQ(a.num_tokens, b.num_tokens);
  ASSERT_EQ(a.stages.size(), b.stages.size());
  for (size_t s = 0; s < a.stages.size(); ++s) {
    EXPECT_EQ(a.stages[s].code, b.stages[s].code);
    EXPECT_EQ(a.stages[s].code_size, b.stages[s].code_size);
    EXPECT_TRUE(a.stages[s].codec_state == b.stages[s].codec_state) << "codec state of stage " << s;
    ASSERT_EQ(a.stages[s].codes.size(), b.stages[s].codes.size());
    for (size_t h = 0; h < a.stages[s].codes.size(); ++h)
      EXPECT_TRUE(a.stages[s].codes[h] == b.stages[s].codes[h]) << "codes of KV head " << h;
  }
}

class LayerIndexCudaSnapshotTest : public ::testing::TestWithParam<SnapCase> {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    const SnapCase c = GetParam();
    auto sel = SelectionConfig::parse(c.selection);
    ASSERT_TRUE(sel.ok()) << sel.status().to_string();
    selection_ = *sel;
    d_ = c.head_dim;
    seed_ = 7300 + static_cast<uint64_t>(selection_.code) * 13 + d_;
    keys_ = clustered_keys(kTokens, kKvHeads, d_, seed_);
    for (float& x : keys_)
      x = bf16_to_float(float_to_bf16(x));  // as a store's rows hold them
    queries_ = random_floats(static_cast<size_t>(kKvHeads) * kGroup * d_, seed_ + 1, 2.0f);
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      cudaStreamDestroy(stream_);
    }
  }

  std::unique_ptr<index::LayerIndex> make(Device device) {
    auto made = index::make_layer_index(device, d_, kKvHeads, pq_config(), selection_);
    EXPECT_TRUE(made.ok()) << made.status().to_string();
    return made.ok() ? std::move(made).value() : nullptr;
  }
  // A CPU index trained on and holding keys_, into *cpu, and its snapshot.
  Result<index::IndexSnapshot> trained_cpu(std::unique_ptr<index::LayerIndex>* cpu) {
    PQKV_ASSIGN_OR_RETURN(
        *cpu, index::make_layer_index(Device::cpu(), d_, kKvHeads, pq_config(), selection_));
    const TensorView host_keys = keys_view(Device::cpu(), keys_.data());
    PQKV_RETURN_IF_ERROR((*cpu)->train(host_keys, pq_config(), Stream::host()));
    PQKV_RETURN_IF_ERROR((*cpu)->add(host_keys, Stream::host()));
    return (*cpu)->snapshot();
  }
  TensorView keys_view(Device device, const float* data) const {
    return TensorView(const_cast<float*>(data), DType::kF32, device, {kTokens, kKvHeads, d_});
  }

  // Positions [kv_heads][kK] the index selects for queries_ over every token.
  std::vector<int32_t> select(index::LayerIndex& index) {
    const TensorView q_host = host_view(queries_.data(), {kKvHeads * kGroup, d_});
    std::vector<int32_t> picked(static_cast<size_t>(kKvHeads * kK));
    if (index.device().is_cpu()) {
      const Status s =
          index.search({q_host, 0, kTokens, kK}, picked.data(), Stream::host(), nullptr);
      EXPECT_TRUE(s.ok()) << s.to_string();
      return picked;
    }
    auto q = gpu::DeviceArray<float>::allocate(int64_t(queries_.size()), stream_);
    auto out = gpu::DeviceArray<int32_t>::allocate(int64_t(picked.size()), stream_);
    EXPECT_TRUE(q.ok() && out.ok());
    EXPECT_EQ(
        cudaMemcpyAsync(q->get(), queries_.data(), q->bytes(), cudaMemcpyHostToDevice, stream_),
        cudaSuccess);
    const TensorView qv(q->get(), DType::kF32, index.device(), {kKvHeads * kGroup, d_});
    const Status s = index.search({qv, 0, kTokens, kK}, out->get(), Stream::cuda(stream_), nullptr);
    EXPECT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(
        cudaMemcpyAsync(picked.data(), out->get(), out->bytes(), cudaMemcpyDeviceToHost, stream_),
        cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    return picked;
  }

  // `picked` is a top-k of the CPU codec's aggregated scores of `snap`'s codes.
  void expect_top_k(const index::IndexSnapshot& snap, const std::vector<int32_t>& picked,
                    float relative_tolerance) {
    auto codec = index::make_key_codec(selection_.code, d_, kKvHeads, pq_config());
    PQKV_ASSERT_OK(codec.status());
    PQKV_ASSERT_OK((*codec)->read_state(snap.stages[0].codec_state));
    std::vector<float> probs(static_cast<size_t>(kGroup) * kTokens), ref(kTokens), table;
    for (int kv = 0; kv < kKvHeads; ++kv) {
      SCOPED_TRACE("KV head " + std::to_string(kv));
      for (int g = 0; g < kGroup; ++g) {
        const int h = kv * kGroup + g;
        (*codec)->prepare(kv, queries_.data() + static_cast<size_t>(h) * d_, &table);
        float* p = probs.data() + static_cast<size_t>(g) * kTokens;
        (*codec)->scan(table.data(), snap.stages[0].codes[kv].data(), 0, kTokens, p);
        index::cpu::softmax_scores(p, kTokens, d_);
      }
      index::cpu::aggregate_group(probs.data(), kGroup, kTokens, GqaAggregation::kSoftmaxSum,
                                  ref.data());
      const float top = *std::max_element(ref.begin(), ref.end());
      const Status s = index::cpu::verify_top_k(ref.data(), kTokens, 0, kK, picked.data() + kv * kK,
                                                relative_tolerance * top);
      EXPECT_TRUE(s.ok()) << s.to_string();
    }
  }

  cudaStream_t stream_ = nullptr;
  SelectionConfig selection_;
  int d_ = 0;
  uint64_t seed_ = 0;
  std::vector<float> keys_;
  std::vector<float> queries_;
};

TEST_P(LayerIndexCudaSnapshotTest, CpuSnapshotRestoresOnCudaAndBack) {
  SCOPED_TRACE("seed=" + std::to_string(seed_) + " " + GetParam().to_string());
  std::unique_ptr<index::LayerIndex> cpu;
  auto saved = trained_cpu(&cpu);
  PQKV_ASSERT_OK(saved.status());

  auto gpu = make(Device::cuda(0));
  ASSERT_NE(gpu, nullptr);
  PQKV_ASSERT_OK(gpu->restore(*saved, Stream::cuda(stream_)));
  EXPECT_TRUE(gpu->trained());
  EXPECT_EQ(gpu->num_tokens(), kTokens);
  auto back = gpu->snapshot();
  PQKV_ASSERT_OK(back.status());
  expect_same_snapshot(*saved, *back);

  expect_top_k(*saved, select(*cpu), 1e-6f);
  expect_top_k(*saved, select(*gpu), 2e-5f);

  // Decode tokens after a restore are encoded as the CPU encodes them.
  auto extra = random_floats(static_cast<size_t>(3) * kKvHeads * d_, seed_ + 5);
  auto extra_dev = gpu::DeviceArray<float>::allocate(int64_t(extra.size()), stream_);
  PQKV_ASSERT_OK(extra_dev.status());
  ASSERT_EQ(cudaMemcpyAsync(extra_dev->get(), extra.data(), extra_dev->bytes(),
                            cudaMemcpyHostToDevice, stream_),
            cudaSuccess);
  PQKV_ASSERT_OK(cpu->add(host_view(extra.data(), {3, kKvHeads, d_}), Stream::host()));
  PQKV_ASSERT_OK(
      gpu->add(TensorView(extra_dev->get(), DType::kF32, Device::cuda(0), {3, kKvHeads, d_}),
               Stream::cuda(stream_)));
  auto cpu_after = cpu->snapshot();
  auto gpu_after = gpu->snapshot();
  PQKV_ASSERT_OK(cpu_after.status());
  PQKV_ASSERT_OK(gpu_after.status());
  if (selection_.code != KeyCode::kPq) {
    expect_same_snapshot(*cpu_after, *gpu_after);
    return;
  }
  // PQ: the GPU's nearest centroid may differ from the CPU's on a tie
  // (layer_index_cuda_test.cpp), so only the restored part is compared.
  EXPECT_EQ(gpu_after->num_tokens, kTokens + 3);
  EXPECT_TRUE(gpu_after->stages[0].codec_state == saved->stages[0].codec_state);
  for (int h = 0; h < kKvHeads; ++h) {
    const auto& codes = gpu_after->stages[0].codes[h];
    EXPECT_TRUE(std::equal(saved->stages[0].codes[h].begin(), saved->stages[0].codes[h].end(),
                           codes.begin()))
        << "restored codes of KV head " << h;
  }
}

TEST_P(LayerIndexCudaSnapshotTest, CudaSnapshotRestoresOnCudaAndCpu) {
  SCOPED_TRACE("seed=" + std::to_string(seed_) + " " + GetParam().to_string());
  auto gpu = make(Device::cuda(0));
  ASSERT_NE(gpu, nullptr);
  auto keys = gpu::DeviceArray<float>::allocate(int64_t(keys_.size()), stream_);
  PQKV_ASSERT_OK(keys.status());
  ASSERT_EQ(
      cudaMemcpyAsync(keys->get(), keys_.data(), keys->bytes(), cudaMemcpyHostToDevice, stream_),
      cudaSuccess);
  const TensorView dev_keys = keys_view(Device::cuda(0), keys->get());
  PQKV_ASSERT_OK(gpu->train(dev_keys, pq_config(), Stream::cuda(stream_)));
  PQKV_ASSERT_OK(gpu->add(dev_keys, Stream::cuda(stream_)));
  // No wait here: the snapshot waits for the build still running.
  auto saved = gpu->snapshot();
  PQKV_ASSERT_OK(saved.status());
  ASSERT_EQ(saved->num_tokens, kTokens);
  const std::vector<int32_t> want = select(*gpu);
  expect_top_k(*saved, want, 2e-5f);

  auto again = make(Device::cuda(0));
  ASSERT_NE(again, nullptr);
  PQKV_ASSERT_OK(again->restore(*saved, Stream::host()));  // a host stream waits
  EXPECT_EQ(select(*again), want) << "CUDA to CUDA selects the same positions";

  auto cpu = make(Device::cpu());
  ASSERT_NE(cpu, nullptr);
  PQKV_ASSERT_OK(cpu->restore(*saved, Stream::host()));
  auto back = cpu->snapshot();
  PQKV_ASSERT_OK(back.status());
  expect_same_snapshot(*saved, *back);
  expect_top_k(*saved, select(*cpu), 1e-6f);
}

TEST_P(LayerIndexCudaSnapshotTest, BadSnapshotsLeaveTheIndexAsItWas) {
  SCOPED_TRACE("seed=" + std::to_string(seed_) + " " + GetParam().to_string());
  std::unique_ptr<index::LayerIndex> cpu;
  auto saved = trained_cpu(&cpu);
  PQKV_ASSERT_OK(saved.status());
  auto gpu = make(Device::cuda(0));
  ASSERT_NE(gpu, nullptr);
  PQKV_ASSERT_OK(gpu->restore(*saved, Stream::cuda(stream_)));

  auto short_codes = *saved;
  short_codes.stages[0].codes[1].pop_back();
  auto other_code = *saved;
  other_code.stages[0].code = selection_.code == KeyCode::kInt8 ? KeyCode::kInt4 : KeyCode::kInt8;
  auto bad_state = *saved;
  bad_state.stages[0].codec_state.resize(2);
  auto two_stages = *saved;
  two_stages.stages.push_back(saved->stages[0]);
  for (const auto* bad : {&short_codes, &other_code, &bad_state, &two_stages}) {
    EXPECT_EQ(gpu->restore(*bad, Stream::cuda(stream_)).code(), StatusCode::kCorruption);
    EXPECT_EQ(gpu->num_tokens(), kTokens);
  }
  auto still = gpu->snapshot();
  PQKV_ASSERT_OK(still.status());
  expect_same_snapshot(*saved, *still);
}

INSTANTIATE_TEST_SUITE_P(Codes, LayerIndexCudaSnapshotTest,
                         ::testing::Values(SnapCase{"pq", 128}, SnapCase{"pq", 64},
                                           SnapCase{"int8", 128}, SnapCase{"int4", 128},
                                           SnapCase{"int4", 64}, SnapCase{"exact", 128}),
                         [](const auto& info) {
                           return std::string(info.param.selection) + "_d" +
                                  std::to_string(info.param.head_dim);
                         });

TEST(LayerIndexCudaSnapshotCallsTest, UntrainedPqHasNothingToSave) {
  PQKV_SKIP_IF_NO_GPU();
  auto made = index::make_layer_index(Device::cuda(0), 128, 2, PqConfig{}, SelectionConfig::pq());
  PQKV_ASSERT_OK(made.status());
  EXPECT_EQ((*made)->snapshot().status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace pqkv::testing

#else
TEST(LayerIndexCudaSnapshotTest, SkippedWithoutCuda) {
  GTEST_SKIP() << "pqkv built without CUDA: GPU test skipped";
}
#endif
