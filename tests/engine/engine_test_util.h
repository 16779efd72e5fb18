// Builds small sequences from random keys and values for the engine tests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <system_error>
#include <vector>

#include "pqkv/store.h"
#include "storage/kv_row_store.h"
#include "test_util.h"

namespace pqkv::testing {

struct SmallStore {
  std::unique_ptr<Store> store;
  Sequence* seq = nullptr;
};

inline StoreOptions cpu_store_options(const ModelSpec& spec) {
  StoreOptions o;
  o.spec = spec;
  o.device = Device::cpu();
  return o;
}

inline SmallStore open_small_store(const ModelSpec& spec, const SequenceOptions& seq_options,
                                   int64_t dram_budget = 0) {
  SmallStore s;
  StoreOptions o = cpu_store_options(spec);
  o.dram_budget_bytes = dram_budget;
  auto store = Store::open(o);
  PQKV_EXPECT_OK(store);
  s.store = std::move(store).value();
  auto seq = s.store->create_sequence("s", seq_options);
  PQKV_EXPECT_OK(seq);
  s.seq = seq.value().get();
  return s;
}

// Appends `n` random tokens (keys and values of every layer) from `seed`.
inline Status append_random(Sequence* seq, int64_t n, uint64_t seed) {
  const ModelSpec& spec = seq->spec();
  const int64_t per_layer = n * spec.num_kv_heads * spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto k = random_floats(per_layer, seed * 1000 + l * 2);
    auto v = random_floats(per_layer, seed * 1000 + l * 2 + 1);
    PQKV_RETURN_IF_ERROR(seq->append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                     host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                     Stream::host()));
  }
  return ok_status();
}

// Bytes of every row of a sequence of `tokens` tokens, in whole row blocks:
// the DRAM a spilling store's budget is measured against.
inline int64_t sequence_bytes(const ModelSpec& spec, int64_t tokens) {
  const int64_t blocks =
      (tokens + storage::KvRowStore::kTokensPerBlock - 1) / storage::KvRowStore::kTokensPerBlock;
  return blocks * spec.num_layers * spec.num_kv_heads * storage::KvRowStore::block_bytes(spec);
}

// The spill files of a store opened on `dir` (none when dir/spill is missing).
inline std::vector<std::filesystem::path> spill_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir / "spill", ec))
    files.push_back(e.path());
  return files;
}

// Appends `n` tokens to every layer whose keys are random floats times
// `scale` plus `offset`: drifted away from a fit on unit normals.
inline Status append_moved(Sequence* seq, int64_t n, uint64_t seed, float scale, float offset) {
  const ModelSpec& spec = seq->spec();
  const int64_t per_layer = n * spec.num_kv_heads * spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto k = random_floats(per_layer, seed * 1000 + l * 2, scale);
    for (float& v : k)
      v += offset;
    auto v = random_floats(per_layer, seed * 1000 + l * 2 + 1);
    PQKV_RETURN_IF_ERROR(seq->append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                     host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                     Stream::host()));
  }
  return ok_status();
}

}  // namespace pqkv::testing
