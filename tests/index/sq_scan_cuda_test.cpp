// The scalar-quantized key kernels (index/cuda/sq_scan.cuh) against the CPU
// codec (ScalarCodecCpu): the same codes and the same scores, int8 and int4,
// fp32 and bf16 keys, odd sizes. Every test skips without a GPU.
#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cpu/key_codecs_cpu.h"
#include "index/cuda/sq_scan.cuh"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

#define SQ_ASSERT_OK(expr)                    \
  do {                                        \
    const ::pqkv::Status sq_status_ = (expr); \
    PQKV_ASSERT_OK(sq_status_);               \
  } while (0)

template <class T>
gpu::DeviceArray<T> upload(const std::vector<T>& host, cudaStream_t s) {
  auto made = gpu::DeviceArray<T>::allocate(std::max<int64_t>(1, int64_t(host.size())), s);
  PQKV_EXPECT_OK(made);
  EXPECT_EQ(
      cudaMemcpyAsync(made->get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, s),
      cudaSuccess);
  return std::move(made).value();
}

template <class T>
std::vector<T> download(const gpu::DeviceArray<T>& dev, int64_t count, cudaStream_t s) {
  std::vector<T> host(static_cast<size_t>(count));
  EXPECT_EQ(cudaMemcpyAsync(host.data(), dev.get(), count * sizeof(T), cudaMemcpyDeviceToHost, s),
            cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  return host;
}

TEST(SqScanCudaTest, MatchesTheCpuCodec) {
  PQKV_SKIP_IF_NO_GPU();
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  const int kv_heads = 2;
  const int q_heads = 6;
  for (int bits : {8, 4}) {
    for (int head_dim : {64, 128}) {
      for (int64_t n : {1, 17, 97, 4099}) {
        for (DType dtype : {DType::kF32, DType::kBF16}) {
          const uint64_t seed = 900 + static_cast<uint64_t>(n) + bits + head_dim;
          SCOPED_TRACE("bits=" + std::to_string(bits) + " head_dim=" + std::to_string(head_dim) +
                       " n=" + std::to_string(n) + " dtype=" + dtype_name(dtype) +
                       " seed=" + std::to_string(seed));
          auto keys = clustered_keys(n, kv_heads, head_dim, seed);
          // Keys as the GPU reads them, and as floats the CPU codec reads.
          std::vector<uint16_t> half(keys.size());
          if (dtype == DType::kBF16) {
            for (size_t i = 0; i < keys.size(); ++i) {
              half[i] = float_to_bf16(keys[i]);
              keys[i] = bf16_to_float(half[i]);
            }
          }
          const auto queries = random_floats(static_cast<size_t>(q_heads) * head_dim, seed + 1);
          index::cpu::ScalarCodecCpu codec(bits, head_dim, kv_heads);
          auto host = index::cpu::HostKeys::from_view(
              host_view(keys.data(), {n, kv_heads, head_dim}), kv_heads, head_dim, "keys");
          SQ_ASSERT_OK(host.status());
          SQ_ASSERT_OK(codec.train(*host, PqConfig{}));
          const int size = codec.code_size();
          std::vector<uint8_t> want_codes(static_cast<size_t>(kv_heads) * n * size);
          for (int h = 0; h < kv_heads; ++h)
            codec.encode(*host, h, want_codes.data() + static_cast<size_t>(h) * n * size);

          auto d_keys_f = upload(keys, s);
          auto d_keys_h = upload(half, s);
          auto d_scale = upload(codec.scale(), s);
          auto d_offset = upload(codec.offset(), s);
          auto d_queries = upload(queries, s);
          auto d_codes = gpu::DeviceArray<uint8_t>::allocate(int64_t(want_codes.size()), s);
          SQ_ASSERT_OK(d_codes.status());
          index::cuda::SqEncodeArgs enc;
          enc.geo = {kv_heads, head_dim, bits};
          enc.keys = dtype == DType::kF32 ? static_cast<const void*>(d_keys_f.get())
                                          : static_cast<const void*>(d_keys_h.get());
          enc.dtype = dtype;
          enc.n = n;
          enc.scale = d_scale.get();
          enc.offset = d_offset.get();
          enc.codes = d_codes->get();
          enc.head_stride = n * size;
          SQ_ASSERT_OK(index::cuda::launch_sq_encode(enc, s));
          const auto got_codes = download(*d_codes, int64_t(want_codes.size()), s);
          ASSERT_EQ(got_codes, want_codes);

          const int64_t begin = n > 2 ? 1 : 0;
          auto d_tables = gpu::DeviceArray<float>::allocate(q_heads * (head_dim + 1), s);
          auto d_scores = gpu::DeviceArray<float>::allocate(q_heads * std::max<int64_t>(1, n), s);
          SQ_ASSERT_OK(d_tables.status());
          SQ_ASSERT_OK(d_scores.status());
          index::cuda::SqScanArgs scan;
          scan.geo = enc.geo;
          scan.q_heads = q_heads;
          scan.queries = d_queries.get();
          scan.scale = d_scale.get();
          scan.offset = d_offset.get();
          scan.codes = d_codes->get();
          scan.head_stride = n * size;
          scan.begin = begin;
          scan.end = n;
          scan.tables = d_tables->get();
          scan.scores = d_scores->get();
          SQ_ASSERT_OK(index::cuda::launch_sq_scan(scan, s));
          const int64_t count = n - begin;
          const auto got = download(*d_scores, q_heads * count, s);
          const int group = q_heads / kv_heads;
          for (int h = 0; h < q_heads; ++h) {
            std::vector<float> table;
            codec.prepare(h / group, queries.data() + static_cast<size_t>(h) * head_dim, &table);
            std::vector<float> want(static_cast<size_t>(count));
            codec.scan(table.data(), want_codes.data() + static_cast<size_t>(h / group) * n * size,
                       begin, n, want.data());
            // fp32 sums in another order (and with FMA): bounded by the terms' magnitude.
            double magnitude = std::abs(table[head_dim]);
            for (int c = 0; c < head_dim; ++c)
              magnitude += std::abs(table[c]) * ((1 << bits) - 1);
            const double tolerance = 1e-5 * magnitude + 1e-6;
            for (int64_t i = 0; i < count; ++i) {
              ASSERT_NEAR(got[h * count + i], want[i], tolerance)
                  << "query head " << h << ", token " << begin + i;
            }
          }
        }
      }
    }
  }
  ASSERT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

TEST(SqScanCudaTest, RefusesBadGeometry) {
  index::cuda::SqScanArgs scan;
  scan.geo = {1, 17, 4};  // int4 needs an even head_dim
  scan.q_heads = 1;
  EXPECT_EQ(index::cuda::launch_sq_scan(scan, nullptr).code(), StatusCode::kInvalidArgument);
  scan.geo = {2, 64, 8};
  scan.q_heads = 3;
  EXPECT_EQ(index::cuda::launch_sq_scan(scan, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
