// The block cache of one sequence on the GPU (tiering/block_cache.h): slots
// in HBM, a residency table per layer in device memory (block -> slot, or
// -1) that the decode step's gather reads, and the host policy
// (tiering/block_cache_policy.h) driven one step behind without a host
// synchronisation on the step's path:
//
//   after a step of layer l:  its selection is copied back to pinned host
//                             memory on the step's stream (after_step);
//   before the next step of l (before_step), on the host, only where the
//   copies have landed (cudaEventQuery, never a wait):
//     - admissions of l whose copy has completed enter the table (a kernel
//       on the step's stream), so a slot serves only complete copies;
//     - the policy runs over the copied selection; evicted blocks leave the
//       table on the step's stream, and the copy stream waits for that
//       point before writing their slots, so no gather reads a slot for a
//       block that is leaving it; admissions are copied from the pinned row
//       store into their slots by one kernel on the Store's copy stream.
//   A layer with admissions still in flight admits nothing new.
//
// The table and slots are charged to the HBM budget and the slots to the
// Store's cache budget for the object's lifetime. Not thread-safe: the
// steps of one sequence are enqueued by one thread, in order, on one stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "core/cuda_handles.h"
#include "pqkv/status.h"
#include "storage/memory_budget.h"
#include "storage/row_table.h"
#include "tiering/block_cache.h"
#include "tiering/fetch_plan.h"

namespace pqkv::tiering {

struct BlockCacheCudaShape {
  int layers = 0;
  int kv_heads = 0;
  int64_t row_bytes = 0;     // a multiple of 16
  int64_t max_tokens = 0;    // tokens per layer the tables cover (blocks past it are not cached)
  int64_t max_selected = 0;  // picks per KV head a step's selection may hold
};

class BlockCacheCuda {
 public:
  // options.num_slots slots on the current device, tables for `shape`,
  // charged to `hbm_budget` and (slots) `cache_budget` (either may be null).
  // Admissions run on `copy_stream`; the tables are cleared on
  // `stream` and the call waits for it. InvalidArgument for bad options;
  // ResourceExhausted when a budget or the device is out of room.
  static Result<std::unique_ptr<BlockCacheCuda>> create(
      const BlockCacheOptions& options, const BlockCacheCudaShape& shape, cudaStream_t copy_stream,
      storage::MemoryBudget* hbm_budget, storage::MemoryBudget* cache_budget, cudaStream_t stream);
  ~BlockCacheCuda();
  BlockCacheCuda(const BlockCacheCuda&) = delete;
  BlockCacheCuda& operator=(const BlockCacheCuda&) = delete;

  // Before a step of `layer` is enqueued on `stream` (see the header
  // comment). `rows` is the layer's host row table (pinned, mapped blocks
  // that a kernel reads). Never waits for the device.
  Status before_step(int layer, const storage::RowTableView& rows, cudaStream_t stream);
  // After a step's search: enqueues on `stream` the copy of its selection
  // (device int32 [kv_heads, k]) to the host for the policy, the layer
  // holding `length` tokens. A selection wider than shape.max_selected is
  // not counted.
  Status after_step(int layer, const int32_t* selected, int64_t k, int64_t length,
                    cudaStream_t stream);
  // Ends a decode step (every layer done): ages the counts.
  void end_step() { policy_.end_step(); }

  // The table of `layer` and the slots, as the gather reads them.
  BlockCacheView view(int layer) const;
  // Entries of the DRAM ranges of `plan` in the host position lists
  // [kv_heads, plan.rows_per_head] that the table of `layer` served to the
  // last step enqueued: the cache hits of a traced step. Reads the host copy
  // of the table (no device access).
  int64_t hits(int layer, const int32_t* positions, const FetchPlan& plan) const;
  // Host wall time, in microseconds, that before_step and after_step of
  // `layer` spent since the last call for it (the policy, the table updates
  // and the copies' launches); resets it.
  double take_host_us(int layer);
  const BlockCachePolicy& policy() const { return policy_; }

 private:
  struct Layer {
    gpu::PinnedBuffer selection;  // int32 [kv_heads, max_selected], copied back
    gpu::EventHandle selected;    // recorded after that copy
    bool selection_pending = false;
    int64_t k = 0;
    int64_t length = 0;
    gpu::PinnedBuffer copies;  // the admissions' (source, slot) pairs the copy kernel reads
    gpu::EventHandle copied;   // recorded after the admissions' copy
    std::vector<std::pair<BlockId, int64_t>> in_flight;
    double host_us = 0;  // see take_host_us
  };
  BlockCacheCuda(BlockCachePolicy policy, const BlockCacheCudaShape& shape)
      : policy_(std::move(policy)), shape_(shape) {}
  int64_t table_index(const BlockId& b) const {
    return (int64_t{b.layer} * shape_.kv_heads + b.head) * max_blocks_ + b.index;
  }
  // before_step's work, without its timing.
  Status run_policy(Layer& l, int layer, const storage::RowTableView& rows, cudaStream_t stream);
  // Enqueues table[index] = value for each pair on `stream`, in order (the
  // last pair of an index wins), and applies them to the host copy. Reorders
  // and shortens `updates`.
  Status update_table(std::vector<std::pair<int64_t, int32_t>>& updates, cudaStream_t stream);

  BlockCachePolicy policy_;
  BlockCacheCudaShape shape_;
  int64_t max_blocks_ = 0;
  gpu::DeviceBuffer slots_;
  gpu::DeviceBuffer tables_;  // int32 [layers][kv_heads][max_blocks_]
  // The tables as the device holds them once every update enqueued so far has run.
  std::vector<int32_t> mirror_;
  // Scratch reused by every before_step.
  BlockStep step_;
  std::vector<std::pair<int64_t, int32_t>> updates_;
  std::vector<std::pair<BlockId, int64_t>> admissions_;
  std::vector<Layer> layers_;
  gpu::EventHandle evicted_;  // the step's stream past the evictions
  cudaStream_t copy_stream_ = nullptr;
  int64_t hbm_bytes_ = 0;
  int64_t slot_bytes_ = 0;
  storage::MemoryBudget* hbm_budget_ = nullptr;
  storage::MemoryBudget* cache_budget_ = nullptr;
};

}  // namespace pqkv::tiering
