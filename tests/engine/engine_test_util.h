// Builds small sequences from random keys and values for the engine tests.
#pragma once

#include <memory>
#include <vector>

#include "pqkv/store.h"
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
