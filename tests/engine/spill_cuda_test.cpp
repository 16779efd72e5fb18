// StoreOptions::spill_to_disk on a CUDA store: a sequence past the DRAM
// budget moves cold rows to spill files, its steps read the selected spilled
// rows back and gather them from staging, and it answers exactly as the
// same sequence on a CUDA store holding every row in DRAM (and, for exact
// attention, as the CPU store within the backends' rounding); a step with
// spilled rows refuses a graph capture. Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "engine_test_util.h"
#include "pqkv/store.h"
#include "storage/kv_row_store.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kPrompt = 3000;  // not a whole number of blocks
constexpr int kDecode = 4;

ModelSpec spill_spec() {
  ModelSpec s = ModelSpec::tiny();
  s.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
  s.num_q_heads = 8;
  return s;
}

SequenceOptions spill_sequence_options() {
  SequenceOptions o;
  o.pq = PqConfig{8, 6};
  o.budget = BudgetPolicy::ratio_of_context(0.1);
  o.budget.sink = {16, 0.0};
  o.budget.window = {64, 0.0};
  return o;
}

struct Outputs {
  std::vector<float> steps;  // [step][layer][q_head][head_dim]
  std::vector<float> exact;  // [layer][q_head][head_dim]
};

class SpillCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = fs::temp_directory_path() /
           ("pqkv-spill-cuda-test-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  StoreOptions options(Device device, int64_t budget) const {
    StoreOptions o;
    o.spec = spill_spec();
    o.device = device;
    if (budget > 0) {
      o.directory = dir_.string();
      o.dram_budget_bytes = budget;
      o.spill_to_disk = true;
    }
    return o;
  }

  // Prefill, build the indexes, decode kDecode tokens attending every
  // layer, then exact attention of every layer; checks the DRAM budget.
  Outputs run(Store& store, Sequence& seq, uint64_t seed, int64_t budget) {
    const ModelSpec& spec = seq.spec();
    Outputs o;
    PQKV_EXPECT_OK(append_random(&seq, kPrompt, seed));
    if (budget > 0) {
      EXPECT_LE(store.dram_bytes_used(), budget);
    }
    PQKV_EXPECT_OK(seq.finish_prefill());
    const auto q_view = [&](float* p) { return host_view(p, {spec.num_q_heads, spec.head_dim}); };
    for (int step = 0; step < kDecode; ++step) {
      PQKV_EXPECT_OK(append_random(&seq, 1, seed + 1 + step));
      if (budget > 0) {
        EXPECT_LE(store.dram_bytes_used(), budget);
      }
      for (int l = 0; l < spec.num_layers; ++l) {
        auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim,
                               seed * 31 + step * 7 + l);
        std::vector<float> out(q.size());
        PQKV_EXPECT_OK(seq.attend(l, q_view(q.data()), q_view(out.data()), Stream::host()));
        o.steps.insert(o.steps.end(), out.begin(), out.end());
      }
    }
    for (int l = 0; l < spec.num_layers; ++l) {
      auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + 77 + l);
      std::vector<float> out(q.size());
      PQKV_EXPECT_OK(seq.attend_exact(l, q_view(q.data()), q_view(out.data()), Stream::host()));
      o.exact.insert(o.exact.end(), out.begin(), out.end());
    }
    return o;
  }

  fs::path dir_;
};

TEST_F(SpillCudaTest, SpilledSequenceAttendsAsAllInDram) {
  const ModelSpec spec = spill_spec();
  const int64_t total = sequence_bytes(spec, kPrompt + kDecode);
  const uint64_t base_seed = std::random_device{}();
  for (const double fraction : {0.5, 0.85}) {
    const uint64_t seed = base_seed + static_cast<uint64_t>(fraction * 100);
    SCOPED_TRACE("fraction on disk " + std::to_string(fraction) + ", seed " + std::to_string(seed));
    std::printf("cuda spill fraction %.2f seed %llu\n", fraction,
                static_cast<unsigned long long>(seed));
    auto dram = Store::open(options(Device::cuda(0), 0));
    PQKV_ASSERT_OK(dram);
    auto dram_seq = (*dram)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(dram_seq);
    const Outputs expected = run(**dram, **dram_seq, seed, 0);

    const auto budget = static_cast<int64_t>((1.0 - fraction) * static_cast<double>(total));
    auto store = Store::open(options(Device::cuda(0), budget));
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(seq);
    const Outputs got = run(**store, **seq, seed, budget);
    EXPECT_FALSE(spill_files(dir_).empty()) << "nothing was spilled";
    // The same rows, the same index (trained on the same values), the same
    // kernels: bit for bit.
    EXPECT_EQ(got.steps, expected.steps);
    EXPECT_EQ(got.exact, expected.exact);

    // Exact attention on the CPU store: equal within the backends' rounding.
    auto cpu = Store::open(options(Device::cpu(), 0));
    PQKV_ASSERT_OK(cpu);
    auto cpu_seq = (*cpu)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(cpu_seq);
    const Outputs reference = run(**cpu, **cpu_seq, seed, 0);
    ASSERT_EQ(reference.exact.size(), got.exact.size());
    EXPECT_LT(relative_error(got.exact, reference.exact), 2e-3)
        << "CUDA exact attention with spilled rows vs the CPU store";

    seq->reset();
    PQKV_EXPECT_OK((*store)->drop("s"));
    EXPECT_TRUE(spill_files(dir_).empty());
  }
}

TEST_F(SpillCudaTest, StepWithSpilledRowsRefusesCapture) {
  const ModelSpec spec = spill_spec();
  auto store = Store::open(options(Device::cuda(0), sequence_bytes(spec, kPrompt) / 2));
  PQKV_ASSERT_OK(store);
  auto seq = (*store)->create_sequence("s", spill_sequence_options());
  PQKV_ASSERT_OK(seq);
  PQKV_ASSERT_OK(append_random(seq->get(), kPrompt, 3));
  PQKV_ASSERT_OK((*seq)->finish_prefill());
  ASSERT_FALSE(spill_files(dir_).empty());
  const size_t q_elems = static_cast<size_t>(spec.num_q_heads) * spec.head_dim;
  float* q = nullptr;
  float* out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&q), q_elems * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), q_elems * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemset(q, 0, q_elems * sizeof(float)), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const TensorView qv(q, DType::kF32, Device::cuda(0), {spec.num_q_heads, spec.head_dim});
  const TensorView ov(out, DType::kF32, Device::cuda(0), {spec.num_q_heads, spec.head_dim});
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status captured = (*seq)->attend(0, qv, ov, Stream::cuda(stream));
  cudaGraph_t g = nullptr;
  cudaStreamEndCapture(stream, &g);
  if (g != nullptr) cudaGraphDestroy(g);
  EXPECT_EQ(captured.code(), StatusCode::kFailedPrecondition) << captured.to_string();
  EXPECT_NE(captured.message().find("spilled"), std::string::npos) << captured.to_string();
  // The same step run directly on that stream works.
  PQKV_EXPECT_OK((*seq)->attend(0, qv, ov, Stream::cuda(stream)));
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  cudaFree(q);
  cudaFree(out);
}

TEST_F(SpillCudaTest, SpilledSequenceSavesAndReopensAsItWas) {
  const ModelSpec spec = spill_spec();
  const int64_t budget = sequence_bytes(spec, kPrompt + kDecode) / 2;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::printf("cuda spill save seed %llu\n", static_cast<unsigned long long>(seed));
  const auto attend_all = [&](Sequence& seq) {
    std::vector<float> outs;
    for (int l = 0; l < spec.num_layers; ++l) {
      auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + 500 + l);
      std::vector<float> out(q.size());
      PQKV_EXPECT_OK(seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                Stream::host()));
      outs.insert(outs.end(), out.begin(), out.end());
    }
    return outs;
  };
  std::vector<float> before;
  {
    auto store = Store::open(options(Device::cuda(0), budget));
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", spill_sequence_options());
    PQKV_ASSERT_OK(seq);
    run(**store, **seq, seed, budget);
    ASSERT_FALSE(spill_files(dir_).empty()) << "nothing was spilled";
    before = attend_all(**seq);
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
  // Reopened with every row in DRAM, and again under the same budget (the
  // load spills as it goes).
  for (const int64_t reopen_budget : {int64_t{0}, budget}) {
    SCOPED_TRACE("reopened under a DRAM budget of " + std::to_string(reopen_budget));
    StoreOptions o = options(Device::cuda(0), reopen_budget);
    o.directory = dir_.string();
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->open_sequence("s");
    PQKV_ASSERT_OK(seq);
    EXPECT_EQ((*seq)->length(0), kPrompt + kDecode);
    EXPECT_EQ(attend_all(**seq), before);
    if (reopen_budget > 0) {
      EXPECT_LE((*store)->dram_bytes_used(), reopen_budget);
    }
  }
}

TEST_F(SpillCudaTest, BlockCacheWithSpillIsUnimplemented) {
  StoreOptions o = options(Device::cuda(0), 1 << 20);
  o.block_cache_bytes = 1 << 20;
  const Status s = Store::open(o).status();
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.to_string();
  EXPECT_NE(s.message().find("block cache"), std::string::npos) << s.to_string();
}

}  // namespace
}  // namespace pqkv::testing

#endif  // PQKV_HAVE_CUDA

#if !PQKV_HAVE_CUDA
TEST(SpillCudaTest, SkippedWithoutCuda) {
  GTEST_SKIP() << "pqkv built without CUDA: GPU test skipped; run this suite on a machine with a "
                  "GPU";
}
#endif
