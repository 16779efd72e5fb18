#include "tiering/block_cache_policy.h"

#include <algorithm>
#include <bit>
#include <string>

namespace pqkv::tiering {

Status BlockCacheOptions::validate() const {
  if (tokens_per_block < 1 || !std::has_single_bit(static_cast<uint64_t>(tokens_per_block))) {
    return Status::invalid_argument("block cache: tokens_per_block must be a power of two, got " +
                                    std::to_string(tokens_per_block));
  }
  if (num_slots < 0 || aging_interval < 0) {
    return Status::invalid_argument("block cache: num_slots and aging_interval must be >= 0, got " +
                                    std::to_string(num_slots) + " and " +
                                    std::to_string(aging_interval));
  }
  return ok_status();
}

Result<BlockCachePolicy> BlockCachePolicy::create(const BlockCacheOptions& options) {
  PQKV_RETURN_IF_ERROR(options.validate());
  return BlockCachePolicy(options);
}

BlockCachePolicy::BlockCachePolicy(const BlockCacheOptions& options) : options_(options) {
  // Slots are handed out lowest first.
  for (int64_t s = options.num_slots - 1; s >= 0; --s)
    free_slots_.push_back(s);
}

void BlockCachePolicy::reorder() {
  by_heat_.clear();
  for (const auto& [block, r] : resident_)
    by_heat_.emplace(count(block), r.admitted_at, block);
}

BlockStep BlockCachePolicy::step(int32_t layer, int32_t head, std::span<const int32_t> positions,
                                 int64_t length, int64_t max_admissions) {
  BlockStep out;
  out.slot_of.reserve(positions.size());
  // Each accessed block once, with the slot that serves it in this step.
  std::unordered_map<int64_t, int64_t> served;
  std::vector<int64_t> accessed;
  for (const int32_t p : positions) {
    if (p < 0) {
      out.slot_of.push_back(-1);
      continue;
    }
    const int64_t index = p / options_.tokens_per_block;
    auto [it, first] = served.try_emplace(index, -1);
    if (first) {
      it->second = ready_slot(BlockId{layer, head, index});
      accessed.push_back(index);
    }
    out.slot_of.push_back(it->second);
    (it->second >= 0 ? out.hits : out.misses) += 1;
  }
  std::sort(accessed.begin(), accessed.end());
  for (const int64_t index : accessed) {
    const BlockId b{layer, head, index};
    uint32_t& c = counts_[b];
    const auto r = resident_.find(b);
    if (r != resident_.end()) by_heat_.erase(Heat{c, r->second.admitted_at, b});
    ++c;
    if (r != resident_.end()) by_heat_.emplace(c, r->second.admitted_at, b);
  }
  if (options_.num_slots == 0) return out;
  // Hottest first, so a slot goes to the block that earns it most.
  std::vector<BlockId> candidates;
  for (const int64_t index : accessed) {
    const BlockId b{layer, head, index};
    const bool complete = (index + 1) * options_.tokens_per_block <= length;
    if (complete && resident_.count(b) == 0) candidates.push_back(b);
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [&](const BlockId& a, const BlockId& b) { return count(a) > count(b); });
  for (const BlockId& b : candidates) {
    if (max_admissions >= 0 && static_cast<int64_t>(out.admissions.size()) >= max_admissions) break;
    int64_t slot = -1;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      const auto [victim_count, victim_at, victim] = *by_heat_.begin();
      if (victim_count >= count(b)) break;  // the rest are no hotter
      const auto r = resident_.find(victim);
      slot = r->second.slot;
      out.evictions.emplace_back(victim, slot);
      by_heat_.erase(by_heat_.begin());
      resident_.erase(r);  // never served again from this slot
    }
    const int64_t at = admissions_++;
    resident_[b] = Resident{slot, false, at};
    by_heat_.emplace(count(b), at, b);
    out.admissions.emplace_back(b, slot);
  }
  return out;
}

void BlockCachePolicy::complete(const BlockId& block, int64_t slot) {
  const auto it = resident_.find(block);
  if (it != resident_.end() && it->second.slot == slot) it->second.ready = true;
}

void BlockCachePolicy::end_step() {
  if (options_.aging_interval == 0 || ++steps_ % options_.aging_interval != 0) return;
  for (auto it = counts_.begin(); it != counts_.end();) {
    it->second /= 2;
    // A count that has decayed to zero is forgotten, unless its block is resident.
    if (it->second == 0 && resident_.count(it->first) == 0) {
      it = counts_.erase(it);
    } else {
      ++it;
    }
  }
  reorder();
}

int64_t BlockCachePolicy::ready_slot(const BlockId& block) const {
  const auto it = resident_.find(block);
  return it != resident_.end() && it->second.ready ? it->second.slot : -1;
}

uint32_t BlockCachePolicy::count(const BlockId& block) const {
  const auto it = counts_.find(block);
  return it == counts_.end() ? 0 : it->second;
}

}  // namespace pqkv::tiering
