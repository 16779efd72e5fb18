// The GPU block cache's residency table (tiering/cuda/block_cache_cuda.h)
// against the host policy driven the same way: on the same selections the
// device table is the one the host policy's steps lead to, the host copy
// of the table (the trace's hits) equals the device's, and with no host
// synchronisation between steps every slot the table lists holds its
// block's rows as the step's stream reads them (never a stale or partly
// written block). Skipped without a GPU.
#include <gtest/gtest.h>

#include "test_util.h"

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/cuda_handles.h"
#include "storage/kv_row_store.h"
#include "tiering/cuda/block_cache_cuda.h"

namespace pqkv::testing {
namespace {

using tiering::BlockCacheCuda;
using tiering::BlockCacheCudaShape;
using tiering::BlockCacheOptions;
using tiering::BlockCachePolicy;
using tiering::BlockId;
using tiering::BlockStep;

constexpr int kLayers = 2;
constexpr int kHeads = 3;
constexpr int64_t kRowBytes = 16;  // a row: int32 {layer, head, token, check}
constexpr int64_t kMaxTokens = 1024;
constexpr int64_t kMaxSelected = 48;
constexpr int64_t kStoreBlock = storage::KvRowStore::kTokensPerBlock;
constexpr int kSteps = 120;
// Rows before_step admits per step and layer, at most (block_cache_cuda.cu).
constexpr int64_t kMaxAdmittedRows = 16384;

int32_t check_word(int layer, int head, int64_t token) {
  return static_cast<int32_t>(0x5bd1e995u ^ (layer * 7919u + head * 104729u + token * 31u));
}

// Rows of every (layer, head, token) in pinned mapped memory, laid out as
// the row store lays them: blocks of kStoreBlock rows, a table [block][head]
// per layer.
struct Rows {
  gpu::PinnedBuffer memory;
  std::vector<std::vector<std::byte*>> tables;  // [layer][block * kHeads + head]

  storage::RowTableView view(int layer) const {
    storage::RowTableView v;
    v.blocks = tables[static_cast<size_t>(layer)].data();
    v.kv_heads = kHeads;
    v.head_dim = 4;
    v.row_dtype = DType::kBF16;
    v.row_bytes = kRowBytes;
    v.tokens_per_block = kStoreBlock;
    v.block_shift = 7;
    return v;
  }
};

Rows make_rows() {
  Rows r;
  const int64_t blocks = kMaxTokens / kStoreBlock;
  PQKV_EXPECT_OK(
      r.memory.reserve(static_cast<size_t>(kLayers * blocks * kHeads * kStoreBlock * kRowBytes)));
  auto* base = r.memory.as<std::byte>();
  r.tables.resize(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int h = 0; h < kHeads; ++h) {
        std::byte* block = base + (((l * blocks + b) * kHeads + h) * kStoreBlock) * kRowBytes;
        r.tables[static_cast<size_t>(l)].push_back(block);
        for (int64_t t = 0; t < kStoreBlock; ++t) {
          const int64_t token = b * kStoreBlock + t;
          const int32_t row[4] = {l, h, static_cast<int32_t>(token), check_word(l, h, token)};
          std::memcpy(block + t * kRowBytes, row, sizeof(row));
        }
      }
    }
  }
  return r;
}

// What the step of one layer saw, copied on the step's stream where its gather runs.
struct Seen {
  int64_t length = 0;
  gpu::PinnedBuffer table;  // int32 [kHeads][max_blocks]
  gpu::PinnedBuffer slots;  // [num_slots][tokens_per_block][kRowBytes]
};

// The host policy driven as BlockCacheCuda drives its own when every step
// and its worker are waited for: a layer's selection is counted once copied
// back (run), after the layer's last admissions complete; the table updates
// and admissions that leaves reach the device table at the layer's next
// step (apply), the admissions themselves one step later again.
struct ReferenceCache {
  BlockCachePolicy policy;
  int64_t max_blocks = 0;
  std::vector<int32_t> table;  // the device tables as they should be, [layer][head][block]
  struct Layer {
    std::vector<std::pair<BlockId, int64_t>> in_flight;
    std::vector<std::pair<BlockId, int64_t>> admissions;
    std::vector<std::pair<int64_t, int32_t>> updates;
    bool done = false;
  };
  std::vector<Layer> layers = std::vector<Layer>(kLayers);

  int64_t index(const BlockId& b) const {
    return (int64_t{b.layer} * kHeads + b.head) * max_blocks + b.index;
  }
  void run(int layer, const int32_t* sel, int64_t k, int64_t length) {
    Layer& l = layers[static_cast<size_t>(layer)];
    for (const auto& [block, slot] : l.in_flight) {
      policy.complete(block, slot);
      if (policy.ready_slot(block) == slot)
        l.updates.emplace_back(index(block), static_cast<int32_t>(slot));
    }
    l.in_flight.clear();
    BlockStep s;
    for (int h = 0; h < kHeads; ++h) {
      const int64_t room =
          std::max<int64_t>(1, kMaxAdmittedRows / policy.options().tokens_per_block) -
          static_cast<int64_t>(l.admissions.size());
      policy.step_into(layer, h, std::span<const int32_t>(sel + h * k, static_cast<size_t>(k)),
                       std::min(length, kMaxTokens), room, false, &s);
      for (const auto& [block, slot] : s.evictions)
        l.updates.emplace_back(index(block), -1);
      l.admissions.insert(l.admissions.end(), s.admissions.begin(), s.admissions.end());
    }
    l.done = true;
  }
  void apply(int layer) {
    Layer& l = layers[static_cast<size_t>(layer)];
    if (!l.done) return;
    for (const auto& [i, v] : l.updates)
      table[static_cast<size_t>(i)] = v;
    l.updates.clear();
    l.in_flight.swap(l.admissions);
    l.admissions.clear();
    l.done = false;
  }
};

void run(int64_t block, bool wait_each_step, uint64_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed) + ", " + std::to_string(block) + "-token blocks, " +
               (wait_each_step ? "every step waited for" : "no waits"));
  BlockCacheOptions o;
  o.tokens_per_block = block;
  o.num_slots = 9;
  o.aging_interval = 3;
  BlockCacheCudaShape shape;
  shape.layers = kLayers;
  shape.kv_heads = kHeads;
  shape.row_bytes = kRowBytes;
  shape.max_tokens = kMaxTokens;
  shape.max_selected = kMaxSelected;
  auto stream = gpu::make_stream();
  auto copy_stream = gpu::make_stream();
  ASSERT_TRUE(stream.ok() && copy_stream.ok());
  auto made = BlockCacheCuda::create(o, shape, copy_stream.value().get(), nullptr, nullptr,
                                     stream.value().get());
  PQKV_ASSERT_OK(made.status());
  BlockCacheCuda& cache = *made.value();
  const cudaStream_t s = stream.value().get();
  const Rows rows = make_rows();
  const int64_t max_blocks = kMaxTokens / block;
  const int64_t slot_bytes = o.num_slots * block * kRowBytes;

  auto ref_policy = BlockCachePolicy::create(o);
  PQKV_ASSERT_OK(ref_policy.status());
  ReferenceCache ref{std::move(ref_policy).value(), max_blocks,
                     std::vector<int32_t>(static_cast<size_t>(kLayers * kHeads * max_blocks), -1)};

  std::mt19937_64 rng(seed);
  std::vector<Seen> seen(static_cast<size_t>(kSteps * kLayers));
  gpu::PinnedBuffer staging;  // every step's selections, [step][layer][kHeads * kMaxSelected]
  PQKV_ASSERT_OK(
      staging.reserve(static_cast<size_t>(kSteps * kLayers * kHeads * kMaxSelected * 4)));
  gpu::DeviceBuffer selected;
  PQKV_ASSERT_OK(selected.reserve(static_cast<size_t>(kLayers * kHeads * kMaxSelected * 4)));
  int64_t length = 300;
  int64_t listed = 0;
  for (int step = 0; step < kSteps; ++step) {
    length = std::min(kMaxTokens, length + static_cast<int64_t>(rng() % 4));
    for (int layer = 0; layer < kLayers; ++layer) {
      Seen& v = seen[static_cast<size_t>(step * kLayers + layer)];
      v.length = length;
      PQKV_ASSERT_OK(cache.before_step(layer, rows.view(layer), s));
      if (wait_each_step) ref.apply(layer);
      // The gather's view of the table and the slots, in stream order.
      PQKV_ASSERT_OK(v.table.reserve(static_cast<size_t>(kHeads * max_blocks * 4)));
      PQKV_ASSERT_OK(v.slots.reserve(static_cast<size_t>(slot_bytes)));
      ASSERT_EQ(
          cudaMemcpyAsync(v.table.data(), cache.view(layer).table,
                          static_cast<size_t>(kHeads * max_blocks * 4), cudaMemcpyDeviceToHost, s),
          cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(v.slots.data(), cache.view(layer).slots,
                                static_cast<size_t>(slot_bytes), cudaMemcpyDeviceToHost, s),
                cudaSuccess);
      // This step's selection: a few hot blocks, the newest tokens, anything.
      const int64_t k = 20 + static_cast<int64_t>(rng() % (kMaxSelected - 19));
      int32_t* sel = staging.as<int32_t>() + (step * kLayers + layer) * kHeads * kMaxSelected;
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t i = 0; i < k; ++i) {
          const uint64_t kind = rng() % 6;
          int64_t p = static_cast<int64_t>(rng() % static_cast<uint64_t>(length));
          if (kind < 3)
            p = (static_cast<int64_t>(rng() % 5) * 3 + h) * block +
                static_cast<int64_t>(rng() % block);
          if (kind == 3) p = length - 1 - static_cast<int64_t>(rng() % 3);
          if (kind == 4 && i % 7 == 0) p = -1;  // padding
          sel[h * k + i] = static_cast<int32_t>(std::min(p, length - 1));
        }
      }
      int32_t* dev = selected.as<int32_t>() + layer * kHeads * kMaxSelected;
      ASSERT_EQ(
          cudaMemcpyAsync(dev, sel, static_cast<size_t>(kHeads * k * 4), cudaMemcpyHostToDevice, s),
          cudaSuccess);
      PQKV_ASSERT_OK(cache.after_step(layer, dev, k, length, s));
      if (wait_each_step) {
        ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
        ASSERT_EQ(cudaStreamSynchronize(copy_stream.value().get()), cudaSuccess);
        // The device table of this step is the reference's.
        const auto* table = v.table.as<const int32_t>();
        const int32_t* want = ref.table.data() + layer * kHeads * max_blocks;
        for (int64_t i = 0; i < kHeads * max_blocks; ++i) {
          ASSERT_EQ(table[i], want[i]) << "step " << step << ", layer " << layer << ", head "
                                       << i / max_blocks << ", block " << i % max_blocks;
        }
        // The host copy of the table, which a traced step counts its hits from, agrees.
        tiering::FetchPlan plan;
        plan.num_ranges = 1;
        plan.ranges[0] = {tiering::RowSource::kDram, 0, k};
        plan.rows_per_head = k;
        int64_t device_hits = 0;
        for (int h = 0; h < kHeads; ++h) {
          for (int64_t i = 0; i < k; ++i) {
            const int32_t p = sel[h * k + i];
            if (p >= 0 && table[h * max_blocks + p / block] >= 0) ++device_hits;
          }
        }
        std::vector<std::vector<int64_t>> positions(kHeads);
        for (int h = 0; h < kHeads; ++h)
          positions[static_cast<size_t>(h)].assign(sel + h * k, sel + (h + 1) * k);
        ASSERT_EQ(cache.hits(layer, positions, plan), device_hits) << "step " << step;
        // The worker's turn: the same selection on the reference.
        cache.wait_idle();
        ref.run(layer, sel, k, length);
      }
    }
    cache.end_step();
    if (wait_each_step) {
      cache.wait_idle();
      ref.policy.end_step();
      // The reference's counts are the policy's, for every block seen.
      for (int layer = 0; layer < kLayers; ++layer)
        for (int h = 0; h < kHeads; ++h)
          for (int64_t b = 0; b < max_blocks; ++b)
            ASSERT_EQ(cache.policy().count(BlockId{layer, h, b}),
                      ref.policy.count(BlockId{layer, h, b}))
                << "step " << step << ", layer " << layer << ", head " << h << ", block " << b;
    }
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(copy_stream.value().get()), cudaSuccess);
  // Every slot a step's table listed held its block's rows, whole and written.
  for (int step = 0; step < kSteps; ++step) {
    for (int layer = 0; layer < kLayers; ++layer) {
      const Seen& v = seen[static_cast<size_t>(step * kLayers + layer)];
      const auto* table = v.table.as<const int32_t>();
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t b = 0; b < max_blocks; ++b) {
          const int32_t slot = table[h * max_blocks + b];
          if (slot < 0) continue;
          ++listed;
          const std::string where =
              "step " + std::to_string(step) + ", layer " + std::to_string(layer) + ", head " +
              std::to_string(h) + ", block " + std::to_string(b) + ", slot " + std::to_string(slot);
          ASSERT_LT(slot, o.num_slots) << where;
          ASSERT_LE((b + 1) * block, v.length) << where << ": a partly written block is listed";
          for (int64_t t = 0; t < block; ++t) {
            int32_t row[4];
            std::memcpy(row, v.slots.as<const std::byte>() + (slot * block + t) * kRowBytes,
                        sizeof(row));
            const int64_t token = b * block + t;
            ASSERT_TRUE(row[0] == layer && row[1] == h && row[2] == token &&
                        row[3] == check_word(layer, h, token))
                << where << ": the slot holds layer " << row[0] << ", head " << row[1] << ", token "
                << row[2] << " for token " << token;
          }
        }
      }
    }
  }
  EXPECT_GT(listed, 0) << "the cache never served a block";
}

TEST(BlockCacheCudaTest, TableMatchesTheHostPolicyOnTheSameSelections) {
  PQKV_SKIP_IF_NO_GPU();
  for (const int64_t block : {1, 16, 64})
    run(block, /*wait_each_step=*/true, 500 + static_cast<uint64_t>(block));
}

TEST(BlockCacheCudaTest, ListedSlotsHoldTheirBlocksWithoutWaits) {
  PQKV_SKIP_IF_NO_GPU();
  for (const int64_t block : {4, 32, 128})
    run(block, /*wait_each_step=*/false, 700 + static_cast<uint64_t>(block));
}

}  // namespace
}  // namespace pqkv::testing

#else  // PQKV_HAVE_CUDA

TEST(BlockCacheCudaTest, TableMatchesTheHostPolicyOnTheSameSelections) {
  GTEST_SKIP() << "pqkv built without CUDA: the GPU block cache test is skipped; build with "
                  "CUDA and run it on a machine with a GPU";
}

#endif  // PQKV_HAVE_CUDA
