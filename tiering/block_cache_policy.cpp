#include "tiering/block_cache_policy.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <string>
#include <utility>

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
  if (admit_count < 1) {
    return Status::invalid_argument("block cache: admit_count must be >= 1, got " +
                                    std::to_string(admit_count));
  }
  if (num_slots > INT32_MAX) {
    return Status::invalid_argument("block cache: num_slots must be below 2^31, got " +
                                    std::to_string(num_slots));
  }
  return ok_status();
}

Result<BlockCachePolicy> BlockCachePolicy::create(const BlockCacheOptions& options) {
  PQKV_RETURN_IF_ERROR(options.validate());
  return BlockCachePolicy(options);
}

BlockCachePolicy::BlockCachePolicy(const BlockCacheOptions& options)
    : options_(options),
      block_shift_(std::countr_zero(static_cast<uint64_t>(options.tokens_per_block))),
      slots_(static_cast<size_t>(options.num_slots)) {
  heap_.reserve(static_cast<size_t>(options.num_slots));
  // Slots are handed out lowest first.
  for (int64_t s = options.num_slots - 1; s >= 0; --s)
    free_slots_.push_back(s);
}

std::vector<BlockCachePolicy::Entry>& BlockCachePolicy::entries(int32_t layer, int32_t head,
                                                                int64_t blocks) {
  if (entries_.size() <= static_cast<size_t>(layer)) {
    entries_.resize(static_cast<size_t>(layer) + 1);
    seen_.resize(static_cast<size_t>(layer) + 1);
  }
  auto& heads = entries_[static_cast<size_t>(layer)];
  auto& seen = seen_[static_cast<size_t>(layer)];
  if (heads.size() <= static_cast<size_t>(head)) {
    heads.resize(static_cast<size_t>(head) + 1);
    seen.resize(static_cast<size_t>(head) + 1);
  }
  auto& e = heads[static_cast<size_t>(head)];
  if (static_cast<int64_t>(e.size()) < blocks) {
    e.resize(static_cast<size_t>(blocks));
    seen[static_cast<size_t>(head)].resize(static_cast<size_t>(blocks), 0u);
  }
  return e;
}

const BlockCachePolicy::Entry* BlockCachePolicy::find(const BlockId& b) const {
  if (b.layer < 0 || b.head < 0 || b.index < 0 || entries_.size() <= static_cast<size_t>(b.layer))
    return nullptr;
  const auto& heads = entries_[static_cast<size_t>(b.layer)];
  if (heads.size() <= static_cast<size_t>(b.head)) return nullptr;
  const auto& e = heads[static_cast<size_t>(b.head)];
  return static_cast<size_t>(b.index) < e.size() ? &e[static_cast<size_t>(b.index)] : nullptr;
}

BlockCachePolicy::Entry* BlockCachePolicy::find(const BlockId& b) {
  return const_cast<Entry*>(std::as_const(*this).find(b));
}

uint32_t BlockCachePolicy::aged(const Entry& e) const {
  // Halving k times rounds down as one shift by k does.
  const uint32_t halvings = epoch_ - e.epoch;
  return halvings >= 32 ? 0 : e.count >> halvings;
}

bool BlockCachePolicy::colder(int64_t a, int64_t b) const {
  const Slot& x = slots_[static_cast<size_t>(a)];
  const Slot& y = slots_[static_cast<size_t>(b)];
  return x.count != y.count ? x.count < y.count : x.admitted_at < y.admitted_at;
}

void BlockCachePolicy::heap_set(int64_t at, int64_t slot) {
  heap_[static_cast<size_t>(at)] = slot;
  slots_[static_cast<size_t>(slot)].heap_at = at;
}

void BlockCachePolicy::sift_up(int64_t at) {
  const int64_t slot = heap_[static_cast<size_t>(at)];
  while (at > 0) {
    const int64_t parent = (at - 1) / 2;
    if (!colder(slot, heap_[static_cast<size_t>(parent)])) break;
    heap_set(at, heap_[static_cast<size_t>(parent)]);
    at = parent;
  }
  heap_set(at, slot);
}

void BlockCachePolicy::sift_down(int64_t at) {
  const int64_t n = static_cast<int64_t>(heap_.size());
  const int64_t slot = heap_[static_cast<size_t>(at)];
  while (true) {
    int64_t child = 2 * at + 1;
    if (child >= n) break;
    if (child + 1 < n &&
        colder(heap_[static_cast<size_t>(child + 1)], heap_[static_cast<size_t>(child)]))
      ++child;
    if (!colder(heap_[static_cast<size_t>(child)], slot)) break;
    heap_set(at, heap_[static_cast<size_t>(child)]);
    at = child;
  }
  heap_set(at, slot);
}

BlockStep BlockCachePolicy::step(int32_t layer, int32_t head, std::span<const int32_t> positions,
                                 int64_t length, int64_t max_admissions) {
  BlockStep out;
  step_into(layer, head, positions, length, max_admissions, /*per_position=*/true, &out);
  return out;
}

void BlockCachePolicy::step_into(int32_t layer, int32_t head, std::span<const int32_t> positions,
                                 int64_t length, int64_t max_admissions, bool per_position,
                                 BlockStep* out) {
  assert(layer >= 0 && head >= 0);
  out->slot_of.clear();
  out->hits = 0;
  out->misses = 0;
  out->admissions.clear();
  out->evictions.clear();
  if (++calls_ == 0) {
    // The stamp wrapped: forget every old one, so none can match the new calls.
    for (auto& heads : seen_)
      for (auto& blocks : heads)
        std::fill(blocks.begin(), blocks.end(), 0u);
    calls_ = 1;
  }
  const int64_t complete_blocks = std::max<int64_t>(0, length) >> block_shift_;
  std::vector<Entry>* entries_of = &entries(layer, head, complete_blocks + 1);
  Entry* base = entries_of->data();
  std::vector<uint32_t>* seen_of = &seen_[static_cast<size_t>(layer)][static_cast<size_t>(head)];
  uint32_t* seen = seen_of->data();
  int64_t size = static_cast<int64_t>(seen_of->size());
  // A position past `length` breaks the contract, but the arrays stay in bounds.
  const auto grow = [&](int64_t index) {
    entries_of = &entries(layer, head, index + 1);
    base = entries_of->data();
    seen = seen_of->data();
    size = static_cast<int64_t>(seen_of->size());
  };
  accessed_.clear();
  // The block's first position in this step: one access.
  const auto access = [&](int64_t index) {
    seen[index] = calls_;
    Entry& e = base[index];
    e.count = aged(e) + 1;
    e.epoch = epoch_;
    accessed_.push_back(index);
    if (e.slot >= 0) {
      Slot& s = slots_[static_cast<size_t>(e.slot)];
      s.count = e.count;
      sift_down(s.heap_at);  // hotter: it moves away from the root
    }
  };
  if (per_position) {
    out->slot_of.resize(positions.size());
    int64_t hits = 0;
    int64_t valid = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      const int32_t p = positions[i];
      if (p < 0) {
        out->slot_of[i] = -1;
        continue;
      }
      ++valid;
      const int64_t index = int64_t{p} >> block_shift_;
      if (index >= size) grow(index);
      if (seen[index] != calls_) access(index);
      out->slot_of[i] = base[index].serve;
      hits += base[index].serve >= 0;
    }
    out->hits = hits;
    out->misses = valid - hits;
  } else {
    // The hot loop of a large selection: one 4-byte stamp per position, from
    // an array small enough to stay in the core's first-level cache.
    for (const int32_t p : positions) {
      if (p < 0) continue;
      const int64_t index = int64_t{p} >> block_shift_;
      if (index >= size) grow(index);
      if (seen[index] != calls_) access(index);
    }
  }
  if (options_.num_slots == 0 || max_admissions == 0) return;
  // The candidates: accessed, complete, not resident blocks that could take a
  // slot (a free one, or hotter than the coldest resident block, whose count
  // only grows while this step admits).
  const uint32_t floor =
      free_slots_.empty() && !heap_.empty() ? slots_[static_cast<size_t>(heap_[0])].count : 0;
  const bool any = !free_slots_.empty();
  auto kept = accessed_.begin();
  for (const int64_t index : accessed_) {
    const Entry& e = base[index];
    if (index < complete_blocks && e.slot < 0 && e.count >= options_.admit_count &&
        (any || e.count > floor))
      *kept++ = index;
  }
  accessed_.erase(kept, accessed_.end());
  // Hottest first, so a slot goes to the block that earns it most; the lower block among equals.
  const auto hotter = [&](int64_t a, int64_t b) {
    return base[a].count != base[b].count ? base[a].count > base[b].count : a < b;
  };
  const size_t wanted = max_admissions < 0
                            ? accessed_.size()
                            : std::min(accessed_.size(), static_cast<size_t>(max_admissions));
  std::partial_sort(accessed_.begin(), accessed_.begin() + static_cast<std::ptrdiff_t>(wanted),
                    accessed_.end(), hotter);
  for (size_t c = 0; c < wanted; ++c) {
    const int64_t index = accessed_[c];
    Entry& e = base[index];
    int64_t slot = -1;
    const bool reused = free_slots_.empty();
    if (!reused) {
      slot = free_slots_.back();
      free_slots_.pop_back();
      heap_.push_back(slot);
      slots_[static_cast<size_t>(slot)].heap_at = static_cast<int64_t>(heap_.size()) - 1;
    } else {
      slot = heap_[0];
      Slot& victim = slots_[static_cast<size_t>(slot)];
      if (victim.count >= e.count) break;  // the rest are no hotter
      out->evictions.emplace_back(victim.block, slot);
      // Never served again from this slot. Its entry can be in another
      // (layer, head) array, so look it up rather than through `base`.
      Entry& left = *find(victim.block);
      left.slot = -1;
      left.serve = -1;
    }
    Slot& s = slots_[static_cast<size_t>(slot)];
    s.block = BlockId{layer, head, index};
    s.count = e.count;
    s.admitted_at = admissions_++;
    e.slot = static_cast<int32_t>(slot);
    e.serve = -1;  // not before complete()
    // A reused slot sits at the root, a new one at the end (it may be the coldest).
    if (reused) {
      sift_down(s.heap_at);
    } else {
      sift_up(s.heap_at);
    }
    out->admissions.emplace_back(s.block, slot);
  }
}

void BlockCachePolicy::complete(const BlockId& block, int64_t slot) {
  if (Entry* e = find(block); e != nullptr && e->slot == slot)
    e->serve = static_cast<int32_t>(slot);
}

void BlockCachePolicy::end_step() {
  if (options_.aging_interval == 0 || ++steps_ % options_.aging_interval != 0) return;
  // Every count halves: the entries' lazily (aged()), the resident slots' now.
  ++epoch_;
  for (const int64_t slot : heap_)
    slots_[static_cast<size_t>(slot)].count >>= 1;
  // Equal counts can now order differently (by admission): heapify again.
  for (int64_t at = static_cast<int64_t>(heap_.size()) / 2 - 1; at >= 0; --at)
    sift_down(at);
}

int64_t BlockCachePolicy::ready_slot(const BlockId& block) const {
  const Entry* e = find(block);
  return e == nullptr ? -1 : e->serve;
}

uint32_t BlockCachePolicy::count(const BlockId& block) const {
  const Entry* e = find(block);
  return e == nullptr ? 0 : aged(*e);
}

}  // namespace pqkv::tiering
