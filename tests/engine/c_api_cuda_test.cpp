// The C ABI on a CUDA store with device pointers (as torch hands them over):
// every pointer's memory is found through CUDA, never read on the host.
#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pqkv/pqkv.h"
#include "test_util.h"

namespace {

// Device memory holding a copy of `host`, freed at scope exit.
struct DeviceCopy {
  explicit DeviceCopy(size_t bytes, const void* host = nullptr) {
    EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess);
    if (host != nullptr) {
      EXPECT_EQ(cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  ~DeviceCopy() { cudaFree(ptr); }
  DeviceCopy(const DeviceCopy&) = delete;
  DeviceCopy& operator=(const DeviceCopy&) = delete;
  void* ptr = nullptr;
};

void expect_near(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-5f + 1e-5f * std::fabs(want[i])) << what << ", element " << i;
}

TEST(CApiCudaTest, DevicePointersOnACudaStore) {
  PQKV_SKIP_IF_NO_GPU();
  SCOPED_TRACE("seeds 1..5, 2 layers, 2 KV heads x group 4, head_dim 64, bf16 rows");
  pqkv_model_spec spec{2, 8, 2, 64, PQKV_BF16};
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  so.cuda_device = 0;
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* dev_seq = nullptr;
  pqkv_sequence* host_seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "device", &qo, &dev_seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_create(store, "host", &qo, &host_seq), PQKV_OK) << pqkv_last_error();

  const int64_t n = 1000;
  const auto k = pqkv::testing::random_floats(n * 2 * 64, 1);
  const auto v = pqkv::testing::random_floats(n * 2 * 64, 2);
  DeviceCopy dk(k.size() * 4, k.data());
  DeviceCopy dv(v.size() * 4, v.data());
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  for (int l = 0; l < 2; ++l) {
    ASSERT_EQ(pqkv_sequence_append(dev_seq, l, dk.ptr, dv.ptr, n, PQKV_F32, stream), PQKV_OK)
        << pqkv_last_error();
    ASSERT_EQ(pqkv_sequence_append(host_seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(pqkv_sequence_finish_prefill(dev_seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_finish_prefill(host_seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_reserve(dev_seq, 4096), PQKV_OK) << pqkv_last_error();

  // One step, device pointers against host pointers, on the same sequence.
  const auto q = pqkv::testing::random_floats(8 * 64, 3);
  DeviceCopy dq(q.size() * 4, q.data());
  DeviceCopy dout(q.size() * 4);
  ASSERT_EQ(pqkv_sequence_attend(dev_seq, 1, dq.ptr, dout.ptr, PQKV_F32, stream), PQKV_OK)
      << pqkv_last_error();
  std::vector<float> from_device(q.size()), from_host(q.size()), other(q.size());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(from_device.data(), dout.ptr, q.size() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  ASSERT_EQ(pqkv_sequence_attend(dev_seq, 1, q.data(), from_host.data(), PQKV_F32, nullptr),
            PQKV_OK)
      << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_attend(host_seq, 1, q.data(), other.data(), PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
  expect_near(from_device, from_host, "device vs host pointers");

  // Batched, device pointers for queries and outputs.
  pqkv_sequence* seqs[2] = {dev_seq, host_seq};
  const void* queries[2] = {dq.ptr, dq.ptr};
  DeviceCopy dout2(q.size() * 4);
  void* outs[2] = {dout.ptr, dout2.ptr};
  ASSERT_EQ(pqkv_attend_batch(store, 1, 2, seqs, queries, outs, PQKV_F32, stream), PQKV_OK)
      << pqkv_last_error();
  std::vector<float> batched0(q.size()), batched1(q.size());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(batched0.data(), dout.ptr, q.size() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(batched1.data(), dout2.ptr, q.size() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  expect_near(batched0, from_host, "batched, sequence 0");
  expect_near(batched1, other, "batched, sequence 1");

  // The selector into device memory equals the selector into host memory.
  const int64_t max_selected = pqkv_sequence_max_selected(dev_seq, 1);
  ASSERT_GT(max_selected, 0) << pqkv_last_error();
  const int64_t room = max_selected + 5;
  DeviceCopy dpos(2 * 2 * room * 4);
  DeviceCopy dlen(2 * 2 * 4);
  ASSERT_EQ(pqkv_select_batch(store, 1, 2, seqs, queries, PQKV_F32, static_cast<int32_t*>(dpos.ptr),
                              room, static_cast<int32_t*>(dlen.ptr), stream),
            PQKV_OK)
      << pqkv_last_error();
  std::vector<int32_t> device_positions(2 * 2 * room);
  std::vector<int32_t> device_lengths(4);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(device_positions.data(), dpos.ptr, device_positions.size() * 4,
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(device_lengths.data(), dlen.ptr, 16, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<int32_t> host_positions(device_positions.size());
  std::vector<int32_t> host_lengths(4);
  ASSERT_EQ(pqkv_select_batch(store, 1, 2, seqs, queries, PQKV_F32, host_positions.data(), room,
                              host_lengths.data(), nullptr),
            PQKV_OK)
      << pqkv_last_error();
  EXPECT_EQ(device_lengths, host_lengths);
  EXPECT_EQ(host_lengths[0], max_selected);
  for (int r = 0; r < 4; ++r) {
    // The index's picks come in no particular order: compare each row as a set.
    auto d = device_positions.begin() + r * room;
    auto h = host_positions.begin() + r * room;
    std::sort(d, d + host_lengths[r]);
    std::sort(h, h + host_lengths[r]);
    EXPECT_TRUE(std::equal(d, d + room, h)) << "row " << r;
    EXPECT_EQ(*(h + room - 1), -1) << "row " << r << " is padded";
  }

  cudaStreamDestroy(stream);
  pqkv_store_close(store);
}

}  // namespace
#endif  // PQKV_HAVE_CUDA
