// The decode step on the CPU (see attention/decode_step.h): the index's
// search on the host, rows read straight from the host row table, attention
// on TBB threads. The reference for the CUDA step.
#pragma once

#include <cstdint>
#include <vector>

#include "attention/decode_step.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"
#include "pqkv/tensor_view.h"
#include "tiering/ssd_tier.h"

namespace pqkv::attention {

// Host scratch of the CPU step, reused across steps.
struct DecodeStepCpuWorkspace {
  std::vector<float> queries;      // [q_heads, head_dim] fp32
  std::vector<float> out;          // [q_heads, head_dim] fp32
  std::vector<int32_t> selected;   // [kv_heads, plan.search_k]
  std::vector<int32_t> positions;  // [kv_heads, plan.tokens_per_head()]
  // With a block cache: the attended rows fetched from their tiers
  // [kv_heads, tokens_per_head, row_bytes], the table of their blocks and
  // each head's entry numbers, which attention reads instead of the row store.
  std::vector<std::byte> rows;
  std::vector<std::byte*> row_blocks;
  std::vector<int32_t> entries;
  tiering::SsdTierWorkspace ssd;  // rows read back from disk
  // With a block cache: each KV head's policy step, and the positions with
  // the cache's hits masked (-1), which the SSD tier reads.
  std::vector<tiering::BlockStep> served;
  std::vector<int32_t> unserved;

  // Sizes every buffer for `plan` (the largest step); ResourceExhausted
  // when they would pass the machine's memory or the host is out of memory.
  Status reserve(const ModelSpec& spec, const DecodePlan& plan);
};

// Plan: converts `queries` (host, [q_heads, head_dim]) to fp32, runs the
// index's search and lists the attended positions in ws.positions.
// `timings` may be null.
Status plan_decode_step_cpu(const DecodeStepInputs& in, const TensorView& queries,
                            DecodeStepCpuWorkspace& ws, index::SearchTimings* timings);

// The whole step: plan, fetch and attend; out (host, [q_heads, head_dim])
// in its own dtype. `trace` may be null. ResourceExhausted when scratch
// cannot grow. Every row is read from DRAM (the host view), except the rows
// whose blocks were spilled to disk, read through the SSD tier
// (tiering/ssd_tier.h: Corruption naming the file and page when one fails its
// checksum, IoError), and, with in.host_cache, the middle's rows whose block
// has a ready slot: the step runs the cache's policy over each KV head's
// middle entries, reads the spilled rows that no slot serves through the SSD
// tier, fetches every row from its tier into ws.rows, attends over those
// (the same bytes, so the same result as without the cache) and admits
// blocks after reading (a spilled block read back from disk whole:
// BlockCacheCpu::admit).
Status run_decode_step_cpu(const DecodeStepInputs& in, const TensorView& queries,
                           const TensorView& out, DecodeStepCpuWorkspace& ws, AttendTrace* trace);

}  // namespace pqkv::attention
