#include "tiering/block_cache.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cstring>
#include <new>
#include <string>
#include <utility>

#include "storage/kv_row_store.h"

namespace pqkv::tiering {

int64_t block_cache_slots(int64_t available_bytes, int64_t block_bytes, int layers, int kv_heads,
                          int64_t max_tokens, int64_t tokens_per_block) {
  if (available_bytes <= 0 || block_bytes <= 0 || tokens_per_block <= 0) return 0;
  const int64_t wanted = int64_t{layers} * kv_heads * (max_tokens / tokens_per_block);
  return std::max<int64_t>(0, std::min(wanted, available_bytes / block_bytes));
}

Result<std::unique_ptr<BlockCacheCpu>> BlockCacheCpu::create(const BlockCacheOptions& options,
                                                             int64_t row_bytes,
                                                             storage::MemoryBudget* budget) {
  PQKV_RETURN_IF_ERROR(options.validate());
  if (options.tokens_per_block > storage::KvRowStore::kTokensPerBlock) {
    return Status::invalid_argument(
        "block cache: tokens_per_block must be at most the row store's block of " +
        std::to_string(storage::KvRowStore::kTokensPerBlock) + " tokens, got " +
        std::to_string(options.tokens_per_block));
  }
  PQKV_ASSIGN_OR_RETURN(BlockCachePolicy policy, BlockCachePolicy::create(options));
  std::unique_ptr<BlockCacheCpu> cache(new (std::nothrow)
                                           BlockCacheCpu(std::move(policy), row_bytes));
  if (cache == nullptr) return Status::resource_exhausted("out of host memory for the block cache");
  const int64_t bytes = options.num_slots * options.tokens_per_block * row_bytes;
  if (budget != nullptr) PQKV_RETURN_IF_ERROR(budget->reserve(bytes, "the block cache's slots"));
  cache->budget_ = budget;
  cache->bytes_ = bytes;
  cache->slots_.reset(new (std::nothrow)
                          std::byte[static_cast<size_t>(std::max<int64_t>(bytes, 1))]);
  if (cache->slots_ == nullptr) {
    return Status::resource_exhausted("out of host memory for " + std::to_string(bytes) +
                                      " bytes of block cache slots; lower block_cache_bytes");
  }
  return Result<std::unique_ptr<BlockCacheCpu>>(std::move(cache));
}

BlockCacheCpu::~BlockCacheCpu() {
  if (budget_ != nullptr) budget_->release(bytes_);
}

BlockStep BlockCacheCpu::step(int32_t layer, int32_t head, std::span<const int32_t> positions,
                              int64_t length) {
  return policy_.step(layer, head, positions, length);
}

const std::byte* BlockCacheCpu::slot_row(int64_t slot, int64_t token) const {
  const int64_t b = policy_.options().tokens_per_block;
  return slots_.get() + (slot * b + (token & (b - 1))) * row_bytes_;
}

Status BlockCacheCpu::admit(const BlockStep& step, const storage::RowTableView& rows,
                            storage::SpilledRows* spilled) {
  const int64_t b = policy_.options().tokens_per_block;
  for (const auto& [block, slot] : step.admissions) {
    // A cache block lies inside one row-store block (b <= its tokens), so its rows are contiguous.
    const int64_t first = block.index * b;
    const int64_t entry = rows.block_index(block.head, first);
    const std::byte* src = nullptr;
    if (rows.blocks[entry] != nullptr) {
      src = rows.row(block.head, first);
    } else {
      assert(spilled != nullptr);
      try {
        spilled_block_.resize(static_cast<size_t>(rows.tokens_per_block * row_bytes_));
      } catch (const std::bad_alloc&) {
        return Status::resource_exhausted(
            "out of host memory reading a spilled block for the "
            "block cache");
      }
      PQKV_RETURN_IF_ERROR(spilled->read_block(block.layer, entry, spilled_block_.data())
                               .with_context("admitting a spilled block to the block cache"));
      src = spilled_block_.data() + rows.offset_in_block(first);
    }
    std::memcpy(slots_.get() + slot * b * row_bytes_, src, static_cast<size_t>(b * row_bytes_));
    policy_.complete(block, slot);
  }
  return ok_status();
}

}  // namespace pqkv::tiering
