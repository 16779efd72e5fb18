#include "tiering/hot_rows.h"

#include <cassert>

namespace pqkv::tiering {

HotRowsPolicy::HotRowsPolicy(int64_t max_tokens, int32_t slot_base, int64_t slots,
                             uint32_t admit_count)
    : slot_base_(slot_base),
      admit_count_(admit_count),
      table_(static_cast<size_t>(max_tokens), -1),
      owner_(static_cast<size_t>(slots), -1),
      used_(static_cast<size_t>(slots), 0u),
      seen_(admit_count >= 2 ? static_cast<size_t>(max_tokens) : 0u, 0u) {
  assert(admit_count == 1 || admit_count == 2);
}

int64_t HotRowsPolicy::step(std::span<const int32_t> positions, const std::vector<bool>& cacheable,
                            std::vector<HotRowsAdmission>* admissions) {
  admissions->clear();
  ++stamp_;
  const auto slots = static_cast<int64_t>(owner_.size());
  int64_t hits = 0;
  for (size_t e = 0; e < positions.size(); ++e) {
    if (positions[e] < 0 || !cacheable[e]) continue;
    const int32_t s = table_[static_cast<size_t>(positions[e])];
    if (s < 0) continue;
    used_[static_cast<size_t>(s - slot_base_)] = stamp_;
    ++hits;
  }
  if (slots == 0) return hits;
  free_.clear();
  for (int64_t k = 0; k < slots; ++k) {
    const int64_t i = (hand_ + k) % slots;
    if (used_[static_cast<size_t>(i)] != stamp_) free_.push_back(static_cast<int32_t>(i));
  }
  size_t taken = 0;
  for (size_t e = 0; e < positions.size(); ++e) {
    const int32_t token = positions[e];
    if (token < 0 || !cacheable[e] || table_[static_cast<size_t>(token)] >= 0) continue;
    bool admit = true;
    if (admit_count_ >= 2) {
      const uint32_t last = seen_[static_cast<size_t>(token)];
      admit = last != 0 && stamp_ - last <= kHotRowsAdmitWindow;
      seen_[static_cast<size_t>(token)] = stamp_;
    }
    if (!admit || taken == free_.size()) continue;
    const int32_t i = free_[taken++];
    const int32_t old = owner_[static_cast<size_t>(i)];
    if (old >= 0) table_[static_cast<size_t>(old)] = -1;
    owner_[static_cast<size_t>(i)] = token;
    table_[static_cast<size_t>(token)] = slot_base_ + i;
    used_[static_cast<size_t>(i)] = stamp_;
    admissions->push_back({static_cast<int64_t>(e), slot_base_ + i});
  }
  if (taken > 0) hand_ = (free_[taken - 1] + 1) % slots;
  // Hits refresh their pick stamp too.
  if (admit_count_ >= 2) {
    for (size_t e = 0; e < positions.size(); ++e) {
      if (positions[e] >= 0 && cacheable[e]) seen_[static_cast<size_t>(positions[e])] = stamp_;
    }
  }
  return hits;
}

}  // namespace pqkv::tiering
