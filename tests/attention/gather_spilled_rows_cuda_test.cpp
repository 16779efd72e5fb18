// The tiered gather over a row store that spilled blocks to disk: the device
// row table drops the spilled blocks' entries (null) at its next update, and
// the rows the SSD tier staged are gathered from pinned staging, so every
// gathered row equals the same token's row of an all-DRAM copy of the store.
#if PQKV_HAVE_CUDA

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "attention/cuda/gather_tiered_rows.cuh"
#include "cuda_test_util.h"
#include "storage/memory_budget.h"
#include "tiering/ssd_tier.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

TEST(GatherSpilledRowsCuda, SpilledEntriesAreNullAndStagedRowsAreGathered) {
  PQKV_SKIP_IF_NO_GPU();
  const uint64_t seed = 23;
  const ModelSpec spec = attention_spec(/*kv_heads=*/3, /*group=*/1, 128, DType::kBF16);
  const int64_t length = 20 * storage::KvRowStore::kTokensPerBlock + 17;
  const int64_t n = 97;
  SCOPED_TRACE("seed 23, head_dim 128, bf16, 3 KV heads, length " + std::to_string(length) +
               ", 97 tokens per head");
  const fs::path dir =
      fs::temp_directory_path() / ("pqkv-gather-spilled-test-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);

  // The reference holds every row; the other a quarter of them in DRAM.
  PQKV_ASSERT_OK_AND_ASSIGN(auto all, make_pinned_store(spec, length, seed));
  const int64_t block = storage::KvRowStore::block_bytes(spec);
  storage::MemoryBudget budget(block * spec.num_layers * spec.num_kv_heads * 6);
  PQKV_ASSERT_OK_AND_ASSIGN(auto arena, storage::BlockArena::pinned(block, &budget));
  storage::SpillConfig spill;
  spill.directory = dir.string();
  spill.file_prefix = "g";
  spill.budget = BudgetPolicy::ratio_of_context(0.1);
  spill.budget.sink = {4, 0.0};
  spill.budget.window = {64, 0.0};
  storage::KvRowStore kv(spec, arena, spill);
  const int layer = 1;
  PQKV_ASSERT_OK_AND_ASSIGN(auto table, storage::DeviceRowTable::create(kv, layer, length));
  PQKV_ASSERT_OK_AND_ASSIGN(auto stream, gpu::make_stream());
  const int64_t per_layer = length * spec.num_kv_heads * spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    // The same keys and values as make_pinned_store's.
    const auto k = random_floats(per_layer, seed * 101 + l * 2);
    const auto v = random_floats(per_layer, seed * 101 + l * 2 + 1);
    PQKV_ASSERT_OK(kv.append(l, host_view(k.data(), {length, spec.num_kv_heads, spec.head_dim}),
                             host_view(v.data(), {length, spec.num_kv_heads, spec.head_dim})));
    // An update while the layer grows, so the later one must re-copy entries in place.
    if (l == layer) PQKV_ASSERT_OK(table.update(stream.get()));
  }
  ASSERT_GT(kv.blocks_spilled(layer), 0) << "nothing of layer 1 was spilled";
  PQKV_ASSERT_OK(table.update(stream.get()));

  // The device table equals the host table, null entries included.
  const storage::RowTableView host = kv.host_table(layer);
  const size_t entries = static_cast<size_t>(kv.num_blocks(layer) * spec.num_kv_heads);
  std::vector<std::byte*> device_entries(entries);
  ASSERT_EQ(cudaMemcpyAsync(device_entries.data(), table.view().blocks, entries * sizeof(void*),
                            cudaMemcpyDeviceToHost, stream.get()),
            cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
  for (size_t e = 0; e < entries; ++e)
    ASSERT_EQ(device_entries[e], host.blocks[e]) << "entry " << e;

  // The SSD tier stages the selected spilled rows; the gather reads them from pinned staging.
  const auto tokens = pick_tokens(length, n, spec.num_kv_heads, seed, true);
  tiering::SsdTierWorkspace ws;
  tiering::FetchPlan fetch;
  PQKV_ASSERT_OK(tiering::fetch_spilled_rows(host, layer, kv.spilled(), tokens.data(), n, ws,
                                             &fetch, nullptr));
  ASSERT_GT(fetch.ssd_rows, 0);
  const int64_t row = spec.row_bytes();
  PQKV_ASSERT_OK_AND_ASSIGN(auto staged_rows, gpu::PinnedBuffer::allocate(ws.entries.size() * row));
  std::vector<const std::byte*> pointers(tokens.size(), nullptr);
  for (size_t k = 0; k < ws.entries.size(); ++k) {
    std::byte* dst = staged_rows.as<std::byte>() + k * row;
    std::memcpy(dst, ws.fetched[k], row);
    pointers[ws.entries[k]] = dst;
  }
  PQKV_ASSERT_OK_AND_ASSIGN(auto staged, to_device(pointers));
  PQKV_ASSERT_OK_AND_ASSIGN(auto positions, to_device(tokens));
  PQKV_ASSERT_OK_AND_ASSIGN(auto out, gpu::DeviceBuffer::allocate(tokens.size() * row));
  PQKV_ASSERT_OK(poison(out.data(), out.bytes()));
  attention::cuda::GatherTieredRowsArgs args;
  args.dram = gather_args(table, positions.as<int32_t>(), n, out.as<std::byte>());
  args.plan.rows_per_head = n;
  args.staged = staged.as<const std::byte* const>();
  PQKV_ASSERT_OK(attention::cuda::launch_gather_tiered_rows(args, stream.get()));
  PQKV_ASSERT_OK_AND_ASSIGN(auto got, to_host(out.data(), out.bytes()));
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = tokens[h * n + i];
      ASSERT_EQ(std::memcmp(got.data() + (h * n + i) * row, all->row(layer, h, t), row), 0)
          << "head " << h << ", entry " << i << ", token " << t
          << (kv.row(layer, h, t) == nullptr ? " (spilled)" : "");
    }
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace pqkv::testing

#endif  // PQKV_HAVE_CUDA
