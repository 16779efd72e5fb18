#include "tiering/ssd_tier.h"

#include <new>

namespace pqkv::tiering {

Status fetch_spilled_rows(const storage::RowTableView& rows, int layer,
                          storage::SpilledRows* spilled, const int32_t* positions,
                          int64_t tokens_per_head, SsdTierWorkspace& ws, FetchPlan* plan,
                          double* read_us) {
  ws.staged.clear();
  plan->ssd_rows = plan->ssd_pages = plan->ssd_hits = 0;
  if (read_us != nullptr) *read_us = 0;
  if (spilled == nullptr || spilled->blocks() == 0) return ok_status();
  const int64_t total = int64_t{rows.kv_heads} * tokens_per_head;
  try {
    ws.reads.clear();
    ws.entries.clear();
    for (int h = 0; h < rows.kv_heads; ++h) {
      for (int64_t i = 0; i < tokens_per_head; ++i) {
        const int64_t token = positions[h * tokens_per_head + i];
        if (token < 0) continue;  // an entry served elsewhere (a cache hit)
        const int64_t entry = rows.block_index(h, token);
        if (rows.blocks[entry] != nullptr) continue;
        ws.reads.push_back({layer, entry, rows.row_in_block(token)});
        ws.entries.push_back(h * tokens_per_head + i);
      }
    }
    if (ws.reads.empty()) return ok_status();
    ws.fetched.resize(ws.reads.size());
    ws.staged.assign(static_cast<size_t>(total), nullptr);
  } catch (const std::bad_alloc&) {
    ws.staged.clear();
    return Status::resource_exhausted("out of host memory listing the step's spilled rows");
  }
  storage::SpillReadStats stats;
  const Status s = spilled->read(ws.reads, ws.fetched.data(), &stats);
  if (!s.ok()) {
    ws.staged.clear();
    return s.with_context("reading layer " + std::to_string(layer) + "'s spilled rows");
  }
  for (size_t k = 0; k < ws.entries.size(); ++k)
    ws.staged[static_cast<size_t>(ws.entries[k])] = ws.fetched[k];
  plan->ssd_rows = stats.rows;
  plan->ssd_pages = stats.pages;
  plan->ssd_hits = stats.hits;
  if (read_us != nullptr) *read_us = stats.read_us;
  return ok_status();
}

}  // namespace pqkv::tiering
