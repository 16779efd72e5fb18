// Helpers for the GPU tests of the decode-step kernels: row stores in pinned
// mapped memory filled with random keys and values, token lists, and copies
// to and from the device.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/cuda/launch_config.h"
#include "core/cuda_handles.h"
#include "storage/block_arena.h"
#include "storage/cuda/device_row_table.h"
#include "storage/kv_row_store.h"
#include "test_util.h"

namespace pqkv::testing {

// Binds `lhs` to the value of a Result, failing the test on an error.
#define PQKV_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  PQKV_ASSERT_OK_AND_ASSIGN_IMPL_(PQKV_CONCAT_(pqkv_test_result_, __LINE__), lhs, expr)
#define PQKV_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr)               \
  auto tmp = (expr);                                                  \
  ASSERT_TRUE(tmp.ok()) << #expr << ": " << tmp.status().to_string(); \
  lhs = std::move(tmp).value()

inline ModelSpec attention_spec(int kv_heads, int group, int head_dim, DType dtype) {
  ModelSpec spec;
  spec.name = "test";
  spec.num_layers = 2;
  spec.num_kv_heads = kv_heads;
  spec.num_q_heads = kv_heads * group;
  spec.head_dim = head_dim;
  spec.dtype = dtype;
  return spec;
}

// A store in pinned mapped blocks holding `tokens` random tokens in every layer.
inline Result<std::unique_ptr<storage::KvRowStore>> make_pinned_store(const ModelSpec& spec,
                                                                      int64_t tokens,
                                                                      uint64_t seed) {
  PQKV_ASSIGN_OR_RETURN(auto arena,
                        storage::BlockArena::pinned(storage::KvRowStore::block_bytes(spec)));
  auto kv = std::make_unique<storage::KvRowStore>(spec, std::move(arena));
  const int64_t per_layer = tokens * spec.num_kv_heads * spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    const auto k = random_floats(per_layer, seed * 101 + l * 2);
    const auto v = random_floats(per_layer, seed * 101 + l * 2 + 1);
    PQKV_RETURN_IF_ERROR(
        kv->append(l, host_view(k.data(), {tokens, spec.num_kv_heads, spec.head_dim}),
                   host_view(v.data(), {tokens, spec.num_kv_heads, spec.head_dim})));
  }
  return kv;
}

// Gather arguments over `table`: `positions` [kv_heads, tokens] and `out` in
// device memory.
inline attention::cuda::GatherRowsArgs gather_args(const storage::DeviceRowTable& table,
                                                   const int32_t* positions, int64_t tokens,
                                                   std::byte* out) {
  attention::cuda::GatherRowsArgs a;
  a.table = table.view();
  a.positions = positions;
  a.tokens = tokens;
  a.out = out;
  return a;
}

// `n` distinct positions in [0, length) per KV head, in random order; when
// `straddle` is set each list also holds the tokens either side of the first
// block boundary (length must exceed it).
inline std::vector<int32_t> pick_tokens(int64_t length, int64_t n, int kv_heads, uint64_t seed,
                                        bool straddle) {
  // More positions than tokens would read past the store: a broken test.
  EXPECT_LE(n, length) << "pick_tokens: " << n << " distinct positions of " << length << " tokens";
  n = std::min(n, length);
  std::mt19937_64 rng(seed);
  std::vector<int32_t> all(length);
  std::vector<int32_t> out;
  for (int h = 0; h < kv_heads; ++h) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> list(all.begin(), all.begin() + n);
    if (straddle && n >= 2) {
      const int32_t edge = static_cast<int32_t>(storage::KvRowStore::kTokensPerBlock);
      std::erase_if(list, [&](int32_t t) { return t == edge - 1 || t == edge; });
      list.resize(n - 2);
      list.insert(list.begin() + list.size() / 2, {edge - 1, edge});
    }
    out.insert(out.end(), list.begin(), list.end());
  }
  return out;
}

// The setup helpers below finish their work before they return (the kernels
// under test run on other, non-blocking streams).

// Copies a host vector to device memory at `dst`.
template <class T>
Status upload(void* dst, const std::vector<T>& v) {
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return ok_status();
}

// Copies a host vector into new device memory.
template <class T>
Result<gpu::DeviceBuffer> to_device(const std::vector<T>& v) {
  PQKV_ASSIGN_OR_RETURN(auto buf, gpu::DeviceBuffer::allocate(v.size() * sizeof(T)));
  PQKV_RETURN_IF_ERROR(upload(buf.data(), v));
  return Result<gpu::DeviceBuffer>(std::move(buf));
}

// Copies `bytes` of device memory to the host once the device is idle.
inline Result<std::vector<std::byte>> to_host(const void* device, size_t bytes) {
  std::vector<std::byte> out(bytes);
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.data(), device, bytes, cudaMemcpyDeviceToHost));
  return out;
}

// Values of a host buffer of `dtype` as floats.
inline std::vector<float> as_floats(const std::vector<std::byte>& bytes, DType dtype) {
  std::vector<float> out(bytes.size() / dtype_size(dtype));
  convert_to_float(bytes.data(), dtype, static_cast<int64_t>(out.size()), out.data());
  return out;
}

// Fills device memory with 0xff bytes (NaN in every float type), so that an
// element a kernel failed to write shows up in the comparison.
inline Status poison(void* device, size_t bytes) {
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemset(device, 0xff, bytes));
  PQKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return ok_status();
}

}  // namespace pqkv::testing
