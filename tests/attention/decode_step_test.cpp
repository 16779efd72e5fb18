// The stateless CPU decode step: the step over a row store's host view and
// an index equals exact attention over the positions it lists.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "attention/cpu/decode_step_cpu.h"
#include "attention/cpu/sparse_attention_cpu.h"
#include "storage/kv_row_store.h"
#include "test_util.h"
#include "tiering/fetch_plan.h"

namespace pqkv::testing {
namespace {

TEST(DecodeStepCpuTest, StepEqualsExactAttentionOverItsPositions) {
  const uint64_t seed = 21;
  SCOPED_TRACE("seed 21, tiny geometry (2 KV heads, group 2, head_dim 32), 700 tokens");
  const ModelSpec spec = ModelSpec::tiny();
  const int64_t n = 700;
  storage::KvRowStore kv(spec, storage::BlockArena::heap(storage::KvRowStore::block_bytes(spec)));
  const int64_t elems = n * spec.num_kv_heads * spec.head_dim;
  const auto k = random_floats(elems, seed);
  const auto v = random_floats(elems, seed + 1);
  const int layer = 1;
  PQKV_ASSERT_OK(kv.append(layer, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                           host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim})));
  PqConfig pq;
  pq.m = 4;
  pq.bits = 4;
  auto made = index::make_layer_index(Device::cpu(), index::PqShape::from_config(spec.head_dim, pq),
                                      spec.num_kv_heads);
  PQKV_ASSERT_OK(made);
  std::vector<float> keys(elems);
  PQKV_ASSERT_OK(kv.keys_as_float(layer, 0, n, keys.data()));
  Status s = (*made)->train(host_view(keys.data(), {n, spec.num_kv_heads, spec.head_dim}), pq,
                            Stream::host());
  PQKV_ASSERT_OK(s);
  s = (*made)->add(host_view(keys.data(), {n, spec.num_kv_heads, spec.head_dim}), Stream::host());
  PQKV_ASSERT_OK(s);

  BudgetPolicy budget;
  budget.sink = {8, 0};
  budget.window = {16, 0};
  budget.top_k = {40, 0};
  const tiering::FetchPlanner tiers;
  attention::DecodeStepInputs in;
  in.spec = &spec;
  in.plan = attention::plan_decode_step(budget, n, n);
  in.rows = kv.host_table(layer);
  in.index = made->get();
  in.tiers = &tiers;
  ASSERT_EQ(in.plan.search_k, 40);

  const auto q = random_floats(int64_t{spec.num_q_heads} * spec.head_dim, seed + 2);
  std::vector<float> out(q.size()), want(q.size());
  attention::DecodeStepCpuWorkspace ws;
  PQKV_ASSERT_OK(ws.reserve(spec, in.plan));
  AttendTrace trace;
  s = attention::run_decode_step_cpu(in, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                     host_view(out.data(), {spec.num_q_heads, spec.head_dim}), ws,
                                     &trace);
  PQKV_ASSERT_OK(s);
  ASSERT_EQ(ws.positions.size(), size_t{2} * (8 + 16 + 40));
  PQKV_ASSERT_OK(attention::sparse_attention_cpu(kv, layer, q.data(), ws.positions.data(),
                                                 8 + 16 + 40, want.data(), nullptr));
  EXPECT_EQ(out, want);
  // The list holds the sink, 40 picks from the middle and the window.
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    std::vector<int32_t> list(ws.positions.begin() + h * 64, ws.positions.begin() + (h + 1) * 64);
    std::sort(list.begin(), list.end());
    EXPECT_EQ(std::adjacent_find(list.begin(), list.end()), list.end()) << "duplicates";
    EXPECT_EQ(list.front(), 0);
    EXPECT_EQ(list.back(), n - 1);
    EXPECT_EQ(trace.attended[h].size(), 64u);
    // The CPU step reads every row from DRAM.
    EXPECT_EQ(trace.fetch.dram_rows, int64_t{spec.num_kv_heads} * 64);
  }
}

}  // namespace
}  // namespace pqkv::testing
