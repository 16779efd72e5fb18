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

Status BlockCacheCpu::admit(std::span<const BlockStep> steps, const storage::RowTableView& rows,
                            storage::SpilledRows* spilled, storage::SpillReadStats* stats) {
  const int64_t b = policy_.options().tokens_per_block;
  // The spilled blocks' rows first, in one batch.
  spilled_reads_.clear();
  for (const BlockStep& step : steps) {
    for (const auto& [block, slot] : step.admissions) {
      // A cache block lies inside one row-store block (b <= its tokens), so
      // its rows are contiguous.
      const int64_t first = block.index * b;
      const int64_t entry = rows.block_index(block.head, first);
      if (rows.blocks[entry] != nullptr) continue;
      assert(spilled != nullptr);
      try {
        for (int64_t r = 0; r < b; ++r)
          spilled_reads_.push_back({block.layer, entry, rows.row_in_block(first + r)});
      } catch (const std::bad_alloc&) {
        return Status::resource_exhausted(
            "out of host memory listing spilled blocks' rows for the block cache");
      }
    }
  }
  if (!spilled_reads_.empty()) {
    try {
      spilled_rows_.resize(spilled_reads_.size());
    } catch (const std::bad_alloc&) {
      return Status::resource_exhausted("out of host memory for spilled blocks' rows");
    }
    storage::SpillReadStats read;
    PQKV_RETURN_IF_ERROR(spilled->read(spilled_reads_, spilled_rows_.data(), &read)
                             .with_context("admitting spilled blocks to the block cache"));
    if (stats != nullptr) {
      stats->pages += read.pages;
      stats->read_us += read.read_us;
    }
  }
  // Then every copy in admission order: a later head's step may have evicted
  // an earlier admission and given its slot to another block, whose copy
  // must land last (complete() ignores the evicted one).
  size_t next_spilled = 0;
  for (const BlockStep& step : steps) {
    for (const auto& [block, slot] : step.admissions) {
      std::byte* dst = slots_.get() + slot * b * row_bytes_;
      const int64_t first = block.index * b;
      if (rows.blocks[rows.block_index(block.head, first)] != nullptr) {
        std::memcpy(dst, rows.row(block.head, first), static_cast<size_t>(b * row_bytes_));
      } else {
        for (int64_t r = 0; r < b; ++r) {
          std::memcpy(dst + r * row_bytes_, spilled_rows_[next_spilled++],
                      static_cast<size_t>(row_bytes_));
        }
      }
      policy_.complete(block, slot);
    }
  }
  return ok_status();
}

}  // namespace pqkv::tiering
