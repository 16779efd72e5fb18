// GPU tests of the row kernels: rows written on the GPU into pinned blocks equal
// the rows the CPU path writes, byte for byte.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cstring>

#include "storage/cuda/device_row_table.h"
#include "storage/cuda/row_transfer_cuda.h"
#include "storage/kv_row_store.h"
#include "test_util.h"

namespace pqkv::storage {
namespace {

using pqkv::testing::random_floats;

TEST(RowTransferCudaTest, GpuWrittenRowsEqualCpuWrittenRows) {
  PQKV_SKIP_IF_NO_GPU();
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    ModelSpec spec = ModelSpec::tiny();
    spec.dtype = dt;
    const int64_t n = KvRowStore::kTokensPerBlock + 97;  // crosses a block boundary
    const int64_t elems = n * spec.num_kv_heads * spec.head_dim;
    auto k = random_floats(elems, 1);
    auto v = random_floats(elems, 2);
    KvRowStore cpu(spec, BlockArena::heap(KvRowStore::block_bytes(spec)));
    PQKV_ASSERT_OK(cpu.append(0, host_view(k.data(), {n, 2, 32}), host_view(v.data(), {n, 2, 32})));
    auto pinned = BlockArena::pinned(KvRowStore::block_bytes(spec));
    PQKV_ASSERT_OK(pinned);
    KvRowStore gpu(spec, *pinned);
    PQKV_ASSERT_OK(gpu.extend(0, n));
    auto made = DeviceRowTable::create(gpu, 0, n);
    PQKV_ASSERT_OK(made);
    DeviceRowTable table = std::move(made).value();
    PQKV_ASSERT_OK(table.update(nullptr));
    float* dk = nullptr;
    float* dv = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dk), elems * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dv), elems * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dk, k.data(), elems * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dv, v.data(), elems * 4, cudaMemcpyHostToDevice), cudaSuccess);
    // Two launches, 17 tokens then the rest, as prefill chunks arrive.
    PQKV_ASSERT_OK(write_rows_cuda(table.view(), dk, dv, DType::kF32, 0, 17, nullptr));
    PQKV_ASSERT_OK(write_rows_cuda(table.view(), dk + 17 * 64, dv + 17 * 64, DType::kF32, 17,
                                   n - 17, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (int64_t t = 0; t < n; ++t) {
      for (int h = 0; h < 2; ++h) {
        ASSERT_EQ(std::memcmp(cpu.row(0, h, t), gpu.row(0, h, t), spec.row_bytes()), 0)
            << dtype_name(dt) << " token " << t << " head " << h;
      }
    }
    // Keys read back equal the stored keys, across the block boundary.
    const int64_t b = KvRowStore::kTokensPerBlock - 30;
    const int64_t e = n;
    void* out = nullptr;
    ASSERT_EQ(cudaMalloc(&out, (e - b) * 64 * dtype_size(dt)), cudaSuccess);
    PQKV_ASSERT_OK(read_keys_cuda(table.view(), b, e, out, nullptr));
    std::vector<std::byte> back((e - b) * 64 * dtype_size(dt));
    ASSERT_EQ(cudaMemcpy(back.data(), out, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<float> got((e - b) * 64), want((e - b) * 64);
    convert_to_float(back.data(), dt, got.size(), got.data());
    PQKV_ASSERT_OK(cpu.keys_as_float(0, b, e, want.data()));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0)
          << dtype_name(dt) << " key element " << i << " (token " << b + int64_t(i) / 64
          << ", head " << (i / 32) % 2 << ", dim " << i % 32 << "): got " << got[i] << " want "
          << want[i];
    }
    cudaFree(out);
    cudaFree(dk);
    cudaFree(dv);
  }
}

}  // namespace
}  // namespace pqkv::storage
#endif  // PQKV_HAVE_CUDA
