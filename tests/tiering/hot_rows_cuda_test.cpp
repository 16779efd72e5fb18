// The hot rows on the device (tiering/cuda/hot_rows_cuda.h) against the
// host policy (tiering/hot_rows.h) on the same steps: after every step the
// device table and slot owners are the reference's, the hits are its hits,
// and every slot the table lists holds its token's gathered row (never a
// stale one after its slot was reused, never a resident or padding entry).
// Steps with host counts and with counts read on the device (as a replayed
// graph gives them), admitting at the first pick and at the second.
// Skipped without a GPU.
#include <gtest/gtest.h>

#include "test_util.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "tiering/cuda/hot_rows_cuda.h"
#include "tiering/hot_rows.h"

namespace pqkv::testing {
namespace {

using tiering::HotRowsCuda;
using tiering::HotRowsPolicy;

constexpr int kLayers = 2;
constexpr int kHeads = 3;
constexpr int64_t kRowBytes = 32;  // int32 {layer, head, token, check, 4 more of the same}
constexpr int64_t kMaxTokens = 700;
constexpr int64_t kSlotsPerHead = 23;
constexpr int64_t kEntries = 41;  // per head and step
constexpr int kSteps = 150;

int32_t check_word(int layer, int head, int64_t token) {
  return static_cast<int32_t>(0x5bd1e995u ^ (layer * 7919u + head * 104729u + token * 31u));
}

void write_row(int layer, int head, int32_t token, std::byte* out) {
  const int32_t row[8] = {layer, head, token, check_word(layer, head, token),
                          layer, head, token, ~check_word(layer, head, token)};
  std::memcpy(out, row, sizeof(row));
}

void run(uint32_t admit_count, bool device_counts, uint64_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed) + ", admit_count " + std::to_string(admit_count) +
               (device_counts ? ", counts on the device" : ", host counts"));
  tiering::BlockCacheOptions o;
  o.tokens_per_block = 1;
  o.num_slots = kSlotsPerHead * kLayers * kHeads + 5;  // the rest is unused
  o.admit_count = admit_count;
  tiering::HotRowsShape shape;
  shape.layers = kLayers;
  shape.kv_heads = kHeads;
  shape.row_bytes = kRowBytes;
  shape.max_tokens = kMaxTokens;
  auto stream = gpu::make_stream();
  ASSERT_TRUE(stream.ok());
  const cudaStream_t s = stream.value().get();
  auto made = HotRowsCuda::create(o, shape, nullptr, nullptr, s);
  PQKV_ASSERT_OK(made.status());
  HotRowsCuda& cache = *made.value();
  ASSERT_EQ(cache.slots_per_head(), kSlotsPerHead);

  std::vector<HotRowsPolicy> ref;
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      ref.emplace_back(kMaxTokens, static_cast<int32_t>((l * kHeads + h) * kSlotsPerHead),
                       kSlotsPerHead, admit_count);
    }
  }
  const tiering::ResidentShape resident{4, 16};
  gpu::DeviceBuffer positions, rows, counts;
  PQKV_ASSERT_OK(positions.reserve(kHeads * kEntries * 4));
  PQKV_ASSERT_OK(rows.reserve(kHeads * kEntries * kRowBytes));
  PQKV_ASSERT_OK(counts.reserve(4 * sizeof(int64_t)));
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int32_t>> last(kLayers * kHeads);
  int64_t length = 300;
  int64_t total_hits = 0;
  std::vector<tiering::HotRowsAdmission> admitted;
  for (int step = 0; step < kSteps; ++step) {
    length = std::min<int64_t>(kMaxTokens + 40, length + static_cast<int64_t>(rng() % 5));
    for (int layer = 0; layer < kLayers; ++layer) {
      std::vector<int32_t> pos(kHeads * kEntries, -1);
      std::vector<std::byte> host_rows(kHeads * kEntries * kRowBytes, std::byte{0});
      for (int h = 0; h < kHeads; ++h) {
        std::vector<int32_t>& picks = last[layer * kHeads + h];
        // About half of the last picks again, new ones, a sink and a window
        // token (resident), tokens past max_tokens, padding.
        // Each token once, as a step's position list holds it.
        std::vector<int32_t> now;
        const auto add = [&](int32_t t) {
          if (std::find(now.begin(), now.end(), t) == now.end()) now.push_back(t);
        };
        for (const int32_t t : picks)
          if (rng() % 2 == 0 && now.size() < 20) add(t);
        add(static_cast<int32_t>(rng() % 4));
        add(static_cast<int32_t>(length - 1 - static_cast<int64_t>(rng() % 16)));
        while (now.size() < kEntries - 3)
          add(static_cast<int32_t>(4 + rng() % static_cast<uint64_t>(length - 20)));
        std::shuffle(now.begin(), now.end(), rng);
        picks.clear();
        for (size_t e = 0; e < now.size(); ++e) {
          pos[h * kEntries + e] = now[e];
          write_row(layer, h, now[e], host_rows.data() + (h * kEntries + e) * kRowBytes);
          picks.push_back(now[e]);
        }
      }
      ASSERT_EQ(
          cudaMemcpyAsync(positions.data(), pos.data(), pos.size() * 4, cudaMemcpyHostToDevice, s),
          cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(rows.data(), host_rows.data(), host_rows.size(),
                                cudaMemcpyHostToDevice, s),
                cudaSuccess);
      tiering::HotRowsStep st;
      st.layer = layer;
      st.positions = positions.as<int32_t>();
      st.rows = rows.as<std::byte>();
      st.tokens = kEntries;
      st.resident = resident;
      st.length = length;
      // Entries per head, length, and the candidate entries: all of them.
      const int64_t device_values[4] = {kEntries, length, 0, kEntries};
      if (device_counts) {
        ASSERT_EQ(cudaMemcpyAsync(counts.data(), device_values, sizeof(device_values),
                                  cudaMemcpyHostToDevice, s),
                  cudaSuccess);
        st.tokens = 1;  // read on the device instead
        st.length = 0;
        st.device_tokens = counts.as<int64_t>();
        st.device_length = counts.as<int64_t>() + 1;
        st.device_first = counts.as<int64_t>() + 2;
        st.device_count = counts.as<int64_t>() + 3;
      }
      PQKV_ASSERT_OK(cache.after_gather(st, s));
      auto hits = cache.last_hits(layer, s);
      PQKV_ASSERT_OK(hits.status());

      int64_t want_hits = 0;
      for (int h = 0; h < kHeads; ++h) {
        const std::vector<int32_t> head(pos.begin() + h * kEntries,
                                        pos.begin() + (h + 1) * kEntries);
        std::vector<bool> cacheable(head.size());
        for (size_t e = 0; e < head.size(); ++e)
          cacheable[e] = head[e] >= 0 && head[e] < kMaxTokens && !resident.holds(head[e], length);
        want_hits += ref[layer * kHeads + h].step(head, cacheable, &admitted);
      }
      ASSERT_EQ(hits.value(), want_hits) << "step " << step << ", layer " << layer;
      total_hits += want_hits;

      std::vector<int32_t> table(kHeads * kMaxTokens), owners(kHeads * kSlotsPerHead);
      std::vector<std::byte> slots(static_cast<size_t>(o.num_slots * kRowBytes));
      ASSERT_EQ(cudaMemcpy(table.data(), cache.device_table(layer), table.size() * 4,
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(owners.data(), cache.device_owners(layer), owners.size() * 4,
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(slots.data(), cache.device_slots(),
                           static_cast<size_t>(kSlotsPerHead * kLayers * kHeads * kRowBytes),
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      for (int h = 0; h < kHeads; ++h) {
        const HotRowsPolicy& r = ref[layer * kHeads + h];
        ASSERT_TRUE(std::equal(r.table().begin(), r.table().end(), table.begin() + h * kMaxTokens))
            << "step " << step << ", layer " << layer << ", head " << h;
        ASSERT_TRUE(
            std::equal(r.owner().begin(), r.owner().end(), owners.begin() + h * kSlotsPerHead))
            << "step " << step << ", layer " << layer << ", head " << h;
        for (int64_t t = 0; t < kMaxTokens; ++t) {
          const int32_t slot = table[h * kMaxTokens + t];
          if (slot < 0) continue;
          ASSERT_FALSE(resident.holds(t, length)) << "a resident token is cached";
          std::byte want[kRowBytes];
          write_row(layer, h, static_cast<int32_t>(t), want);
          ASSERT_EQ(std::memcmp(slots.data() + slot * kRowBytes, want, kRowBytes), 0)
              << "slot " << slot << " of token " << t << ", step " << step << ", layer " << layer
              << ", head " << h;
        }
      }
    }
  }
  EXPECT_GT(total_hits, 0) << "the cache never served a row";
}

TEST(HotRowsCudaTest, DeviceMatchesTheHostPolicyAndSlotsHoldTheirRows) {
  PQKV_SKIP_IF_NO_GPU();
  run(1, /*device_counts=*/false, 901);
  run(2, /*device_counts=*/false, 902);
}

TEST(HotRowsCudaTest, CountsReadOnTheDeviceAsInAReplayedStep) {
  PQKV_SKIP_IF_NO_GPU();
  run(1, /*device_counts=*/true, 903);
  run(2, /*device_counts=*/true, 904);
}

TEST(HotRowsCudaTest, RejectsLongerBlocksAndOtherAdmitCounts) {
  PQKV_SKIP_IF_NO_GPU();
  auto stream = gpu::make_stream();
  ASSERT_TRUE(stream.ok());
  tiering::BlockCacheOptions o;
  o.num_slots = 100;
  tiering::HotRowsShape shape{1, 1, 32, 100};
  o.tokens_per_block = 2;
  EXPECT_EQ(HotRowsCuda::create(o, shape, nullptr, nullptr, stream.value().get()).status().code(),
            StatusCode::kInvalidArgument);
  o.tokens_per_block = 1;
  o.admit_count = 3;
  EXPECT_EQ(HotRowsCuda::create(o, shape, nullptr, nullptr, stream.value().get()).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pqkv::testing

#else

TEST(HotRowsCudaTest, DeviceMatchesTheHostPolicyAndSlotsHoldTheirRows) {
  GTEST_SKIP() << "pqkv built without CUDA: the GPU hot rows test is skipped; build with "
                  "CUDA to run it";
}

#endif  // PQKV_HAVE_CUDA
