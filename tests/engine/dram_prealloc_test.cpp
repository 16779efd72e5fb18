// StoreOptions::dram_prealloc_bytes and Store::preallocate_dram: rows taken
// before the appends serve them (the DRAM charge does not move), the charge
// is exact, a preallocation over the budget takes nothing and loses nothing,
// and the answers are those of a store without preallocation. The CPU store
// (heap rows) runs everywhere; the same checks on a CUDA store (pinned rows)
// skip without a GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "engine_test_util.h"
#include "storage/kv_row_store.h"

namespace pqkv {
namespace {

using testing::random_floats;

constexpr int64_t kTokensPerBlock = storage::KvRowStore::kTokensPerBlock;

ModelSpec prealloc_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.head_dim = 64;  // the CUDA kernels are built for head_dim 64 and 128
  spec.num_q_heads = 8;
  return spec;
}

Result<std::unique_ptr<Store>> open_store(Device device, int64_t prealloc, int64_t budget = 0) {
  StoreOptions so;
  so.spec = prealloc_spec();
  so.device = device;
  so.dram_prealloc_bytes = prealloc;
  so.dram_budget_bytes = budget;
  return Store::open(so);
}

// Attention outputs of every layer for one query, after `n` random tokens
// (seed) were appended in two parts and the prefill finished.
Result<std::vector<float>> prefill_and_attend(Store& store, int64_t n, uint64_t seed) {
  PQKV_ASSIGN_OR_RETURN(auto seq, store.create_sequence("s", SequenceOptions{}));
  PQKV_RETURN_IF_ERROR(testing::append_random(seq.get(), n / 3, seed));
  PQKV_RETURN_IF_ERROR(testing::append_random(seq.get(), n - n / 3, seed + 1));
  PQKV_RETURN_IF_ERROR(seq->finish_prefill());
  const ModelSpec& spec = store.options().spec;
  const auto q = random_floats(spec.num_q_heads * spec.head_dim, seed + 2);
  std::vector<float> out(q.size() * spec.num_layers);
  for (int l = 0; l < spec.num_layers; ++l) {
    PQKV_RETURN_IF_ERROR(seq->attend(
        l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
        host_view(out.data() + l * q.size(), {spec.num_q_heads, spec.head_dim}), Stream::host()));
  }
  return out;
}

void check_prealloc_at_open_serves_appends(Device device) {
  const uint64_t seed = 11;
  const int64_t n = 5 * kTokensPerBlock;  // whole blocks: the preallocation is used to its end
  std::printf("seed %llu, %lld tokens, %s\n", static_cast<unsigned long long>(seed),
              static_cast<long long>(n), device.to_string().c_str());
  auto probe = open_store(device, 0);
  PQKV_ASSERT_OK(probe);
  const int64_t need = (*probe)->dram_bytes_for_tokens(n);
  const ModelSpec spec = prealloc_spec();
  EXPECT_EQ(need, 5 * spec.num_layers * spec.num_kv_heads * storage::KvRowStore::block_bytes(spec));
  EXPECT_EQ((*probe)->dram_bytes_used(), 0);

  auto store = open_store(device, need);
  PQKV_ASSERT_OK(store);
  EXPECT_EQ((*store)->dram_bytes_used(), need) << "charged to the budget when the store opens";
  auto with = prefill_and_attend(**store, n, seed);
  PQKV_ASSERT_OK(with);
  EXPECT_EQ((*store)->dram_bytes_used(), need) << "the appends took no further chunk";

  auto plain = open_store(device, 0);
  PQKV_ASSERT_OK(plain);
  auto without = prefill_and_attend(**plain, n, seed);
  PQKV_ASSERT_OK(without);
  EXPECT_EQ(*with, *without) << "the same answers with and without preallocation";
}

void check_preallocate_later_is_idempotent_and_exact(Device device) {
  const uint64_t seed = 21;
  const int64_t n = 3 * kTokensPerBlock;
  std::printf("seed %llu, %lld tokens, %s\n", static_cast<unsigned long long>(seed),
              static_cast<long long>(n), device.to_string().c_str());
  auto store = open_store(device, 0);
  PQKV_ASSERT_OK(store);
  Store& s = **store;
  const int64_t need = s.dram_bytes_for_tokens(n);
  PQKV_ASSERT_OK(s.preallocate_dram(need));
  EXPECT_EQ(s.dram_bytes_used(), need);
  EXPECT_EQ(s.dram_bytes_free(), need);
  PQKV_ASSERT_OK(s.preallocate_dram(need));
  EXPECT_EQ(s.dram_bytes_used(), need) << "a repeated call takes nothing";
  PQKV_ASSERT_OK(s.preallocate_dram(0));
  EXPECT_EQ(s.preallocate_dram(-1).code(), StatusCode::kInvalidArgument);

  auto seq = s.create_sequence("a", SequenceOptions{});
  PQKV_ASSERT_OK(seq);
  PQKV_ASSERT_OK(testing::append_random(seq->get(), n, seed));
  EXPECT_EQ(s.dram_bytes_used(), need) << "the appends used the preallocated rows";
  EXPECT_EQ(s.dram_bytes_free(), 0);
  // The rows are in use now: the same call takes them again for the next prompt.
  PQKV_ASSERT_OK(s.preallocate_dram(need));
  EXPECT_EQ(s.dram_bytes_used(), 2 * need);
  auto other = s.create_sequence("b", SequenceOptions{});
  PQKV_ASSERT_OK(other);
  PQKV_ASSERT_OK(testing::append_random(other->get(), n, seed + 1));
  EXPECT_EQ(s.dram_bytes_used(), 2 * need);
  // One token past the preallocation takes a chunk.
  PQKV_ASSERT_OK(testing::append_random(other->get(), 1, seed + 2));
  EXPECT_GT(s.dram_bytes_used(), 2 * need);
}

void check_over_budget_takes_nothing(Device device) {
  const uint64_t seed = 31;
  const int64_t n = 2 * kTokensPerBlock + 17;
  std::printf("seed %llu, %lld tokens, %s\n", static_cast<unsigned long long>(seed),
              static_cast<long long>(n), device.to_string().c_str());
  const int64_t budget = int64_t{24} << 20;
  auto store = open_store(device, 0, budget);
  PQKV_ASSERT_OK(store);
  Store& s = **store;
  auto before = prefill_and_attend(s, n, seed);
  PQKV_ASSERT_OK(before);
  const int64_t used = s.dram_bytes_used();
  ASSERT_GT(used, 0);

  const ModelSpec& spec = s.options().spec;
  const int64_t block = storage::KvRowStore::block_bytes(spec);
  const int64_t room = s.dram_bytes_free() + (budget - used);  // what the budget can still serve
  ASSERT_EQ(room % block, 0) << "the budget and the chunks are whole blocks";
  const Status over = s.preallocate_dram(room + 1);
  EXPECT_EQ(over.code(), StatusCode::kResourceExhausted) << over.to_string();
  for (const char* word : {"preallocat", "dram_budget_bytes", "nothing was taken"}) {
    EXPECT_NE(over.message().find(word), std::string::npos) << word << ": " << over.to_string();
  }
  EXPECT_EQ(s.dram_bytes_used(), used);

  // Nothing held was lost: the sequence answers as before.
  auto seq = s.get_sequence("s");
  PQKV_ASSERT_OK(seq);
  const auto q = random_floats(spec.num_q_heads * spec.head_dim, seed + 2);
  std::vector<float> out(q.size());
  for (int l = 0; l < spec.num_layers; ++l) {
    PQKV_ASSERT_OK((*seq)->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                  host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                  Stream::host()));
    EXPECT_EQ(out, std::vector<float>(before->begin() + l * q.size(),
                                      before->begin() + (l + 1) * q.size()))
        << "layer " << l;
  }
  // Up to the budget's last block is fine.
  PQKV_ASSERT_OK(s.preallocate_dram(room));
  EXPECT_EQ(s.dram_bytes_used(), budget);
  EXPECT_EQ(s.dram_bytes_free(), room);
}

TEST(DramPreallocTest, PreallocationAtOpenServesTheAppends) {
  check_prealloc_at_open_serves_appends(Device::cpu());
}

TEST(DramPreallocTest, PreallocateLaterIsIdempotentAndExact) {
  check_preallocate_later_is_idempotent_and_exact(Device::cpu());
}

TEST(DramPreallocTest, OverTheBudgetTakesNothingAndLosesNothing) {
  check_over_budget_takes_nothing(Device::cpu());
}

TEST(DramPreallocTest, OptionsPastTheBudgetAreRefusedAtOpen) {
  auto negative = open_store(Device::cpu(), -1);
  EXPECT_EQ(negative.status().code(), StatusCode::kInvalidArgument);
  auto past = open_store(Device::cpu(), int64_t{2} << 20, int64_t{1} << 20);
  EXPECT_EQ(past.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(past.status().message().find("dram_prealloc_bytes"), std::string::npos)
      << past.status().to_string();
  EXPECT_EQ(open_store(Device::cpu(), 0).value()->dram_bytes_for_tokens(0), 0);
}

TEST(DramPreallocCudaTest, PreallocationAtOpenServesTheAppends) {
  PQKV_SKIP_IF_NO_GPU();
  check_prealloc_at_open_serves_appends(Device::cuda(0));
}

TEST(DramPreallocCudaTest, PreallocateLaterIsIdempotentAndExact) {
  PQKV_SKIP_IF_NO_GPU();
  check_preallocate_later_is_idempotent_and_exact(Device::cuda(0));
}

TEST(DramPreallocCudaTest, OverTheBudgetTakesNothingAndLosesNothing) {
  PQKV_SKIP_IF_NO_GPU();
  check_over_budget_takes_nothing(Device::cuda(0));
}

}  // namespace
}  // namespace pqkv
