// Store::save and Store::open_sequence on CUDA stores, for every code the
// CUDA index scores, in one stage or two: a CUDA save reopened on a CUDA store answers as before
// (the same positions, the same outputs), and a save of either backend
// reopens on the other with the index restored byte for byte and the same
// selection up to near-ties of the two backends' score arithmetic (exact
// top-k parity: index/layer_index_cuda_snapshot_test.cpp). Skipped without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "engine/inspector.h"
#include "engine_test_util.h"
#include "pqkv/store.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

struct Answers {
  std::vector<float> out;          // [layer][q_head][head_dim]
  std::vector<int32_t> positions;  // [layer][kv_head][max_selected], -1 padded
  int64_t max_selected = 0;
};

Answers answers_of(Store& store, Sequence& seq, uint64_t seed) {
  const ModelSpec& spec = seq.spec();
  Answers a;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + l);
    std::vector<float> out(q.size());
    PQKV_EXPECT_OK(seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                              host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                              Stream::host()));
    a.out.insert(a.out.end(), out.begin(), out.end());
    auto max_sel = seq.max_selected(l);
    PQKV_EXPECT_OK(max_sel.status());
    a.max_selected = *max_sel;
    std::vector<int32_t> positions(static_cast<size_t>(spec.num_kv_heads * *max_sel));
    std::vector<int32_t> lengths(static_cast<size_t>(spec.num_kv_heads));
    SequenceStep step{&seq, host_view(q.data(), {spec.num_q_heads, spec.head_dim}), {}};
    PQKV_EXPECT_OK(store.select(l, {&step, 1},
                                {positions.data(), *max_sel, lengths.data(), Device::cpu()},
                                Stream::host()));
    a.positions.insert(a.positions.end(), positions.begin(), positions.end());
  }
  return a;
}

// The share of each (layer, KV head)'s selected positions found in the
// other's, as sets (the backends write them in different orders).
double position_overlap(const Answers& a, const Answers& b) {
  if (a.positions.size() != b.positions.size() || a.max_selected == 0) return 0;
  int64_t same = 0, total = 0;
  for (size_t r = 0; r < a.positions.size(); r += static_cast<size_t>(a.max_selected)) {
    std::set<int32_t> x(a.positions.begin() + r, a.positions.begin() + r + a.max_selected);
    std::set<int32_t> y(b.positions.begin() + r, b.positions.begin() + r + b.max_selected);
    x.erase(-1), y.erase(-1);
    for (int32_t p : x)
      same += y.count(p);
    total += static_cast<int64_t>(std::max(x.size(), y.size()));
  }
  return total == 0 ? 1.0 : static_cast<double>(same) / static_cast<double>(total);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float d = a.size() == b.size() ? 0.0f : INFINITY;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

class PersistenceCudaTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = fs::temp_directory_path() /
           ("pqkv-persist-cuda-test-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  static ModelSpec spec() {
    ModelSpec s = ModelSpec::tiny();
    s.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
    s.num_q_heads = 8;
    return s;
  }
  StoreOptions options(Device device) const {
    StoreOptions o;
    o.spec = spec();
    o.device = device;
    o.directory = dir_.string();
    o.model_fingerprint = "model-a";
    return o;
  }
  SequenceOptions sequence_options() const {
    SequenceOptions o;
    auto sel = SelectionConfig::parse(GetParam());
    EXPECT_TRUE(sel.ok()) << sel.status().to_string();
    o.selection = *sel;
    o.pq = PqConfig{8, 6};
    o.budget = BudgetPolicy::ratio_of_context(0.2);
    o.budget.sink = {4, 0.0};
    return o;
  }
  // Makes, prefills (`prompt` tokens, then 3 decode tokens), answers and
  // saves sequence "ctx" on a store of `device`; returns its answers.
  Answers save_on(Device device, Answers* after_append = nullptr) {
    auto store = Store::open(options(device));
    PQKV_EXPECT_OK(store.status());
    if (!store.ok()) return {};
    auto seq = (*store)->create_sequence("ctx", sequence_options());
    PQKV_EXPECT_OK(seq.status());
    if (!seq.ok()) return {};
    PQKV_EXPECT_OK(append_random(seq->get(), 1500, 7));
    PQKV_EXPECT_OK((*seq)->finish_prefill());
    for (int i = 0; i < 3; ++i)
      PQKV_EXPECT_OK(append_random(seq->get(), 1, 100 + i));
    Answers before = answers_of(**store, **seq, 11);
    PQKV_EXPECT_OK((*store)->save(**seq));
    snapshots_ = snapshots(**seq);
    if (after_append != nullptr) {
      PQKV_EXPECT_OK(append_random(seq->get(), 1, 99));
      *after_append = answers_of(**store, **seq, 13);
    }
    return before;
  }
  static std::vector<index::IndexSnapshot> snapshots(const Sequence& seq) {
    std::vector<index::IndexSnapshot> out;
    for (int l = 0; l < seq.spec().num_layers; ++l) {
      const index::LayerIndex* idx = engine::Inspector::layer_index(seq, l);
      EXPECT_NE(idx, nullptr) << "layer " << l;
      if (idx == nullptr) continue;
      auto snap = idx->snapshot();
      PQKV_EXPECT_OK(snap.status());
      if (snap.ok()) out.push_back(std::move(*snap));
    }
    return out;
  }
  void expect_same_index(const Sequence& seq) const {
    const auto got = snapshots(seq);
    ASSERT_EQ(got.size(), snapshots_.size());
    for (size_t l = 0; l < got.size(); ++l) {
      SCOPED_TRACE("layer " + std::to_string(l));
      ASSERT_EQ(got[l].num_tokens, snapshots_[l].num_tokens);
      ASSERT_EQ(got[l].stages.size(), snapshots_[l].stages.size());
      for (size_t s = 0; s < got[l].stages.size(); ++s) {
        EXPECT_TRUE(got[l].stages[s].codec_state == snapshots_[l].stages[s].codec_state)
            << "stage " << s;
        EXPECT_TRUE(got[l].stages[s].codes == snapshots_[l].stages[s].codes) << "stage " << s;
      }
    }
  }

  fs::path dir_;
  std::vector<index::IndexSnapshot> snapshots_;  // of the saved sequence
};

TEST_P(PersistenceCudaTest, CudaSaveReopensOnCudaAsBefore) {
  SCOPED_TRACE(std::string("selection ") + GetParam());
  Answers after_append;
  const Answers before = save_on(Device::cuda(0), &after_append);
  auto store = Store::open(options(Device::cuda(0)));
  PQKV_ASSERT_OK(store.status());
  auto seq = (*store)->open_sequence("ctx");
  PQKV_ASSERT_OK(seq.status());
  EXPECT_EQ((*seq)->length(0), 1503);
  expect_same_index(**seq);
  const Answers after = answers_of(**store, **seq, 11);
  EXPECT_TRUE(after.positions == before.positions) << "selected positions";
  EXPECT_LE(max_abs_diff(after.out, before.out), 1e-6f) << "attend outputs";
  // A decode token after reopening is encoded and selected as it was before.
  PQKV_ASSERT_OK(append_random(seq->get(), 1, 99));
  const Answers next = answers_of(**store, **seq, 13);
  EXPECT_TRUE(next.positions == after_append.positions) << "positions after one more token";
  EXPECT_LE(max_abs_diff(next.out, after_append.out), 1e-6f);
}

TEST_P(PersistenceCudaTest, CudaSaveReopensOnCpu) {
  SCOPED_TRACE(std::string("selection ") + GetParam());
  const Answers before = save_on(Device::cuda(0));
  auto store = Store::open(options(Device::cpu()));
  PQKV_ASSERT_OK(store.status());
  auto seq = (*store)->open_sequence("ctx");
  PQKV_ASSERT_OK(seq.status());
  expect_same_index(**seq);
  const double overlap = position_overlap(answers_of(**store, **seq, 11), before);
  EXPECT_GE(overlap, 0.98) << "selected positions shared with the CUDA store's";
}

TEST_P(PersistenceCudaTest, CpuSaveReopensOnCuda) {
  SCOPED_TRACE(std::string("selection ") + GetParam());
  const Answers before = save_on(Device::cpu());
  auto store = Store::open(options(Device::cuda(0)));
  PQKV_ASSERT_OK(store.status());
  auto seq = (*store)->open_sequence("ctx");
  PQKV_ASSERT_OK(seq.status());
  expect_same_index(**seq);
  const double overlap = position_overlap(answers_of(**store, **seq, 11), before);
  EXPECT_GE(overlap, 0.98) << "selected positions shared with the CPU store's";
}

INSTANTIATE_TEST_SUITE_P(KeyCodes, PersistenceCudaTest,
                         ::testing::Values("pq", "int8", "int4", "exact", "pq+int8:4",
                                           "int4+int8:2"));

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
