// Hot rows on the device (tiering/hot_rows.h): slots of single rows per
// (layer, KV head) in HBM, a residency table per layer (token -> slot, or
// -1) that the decode step's gather reads as a BlockCacheView of one-token
// blocks, and the policy as two kernels enqueued after the step's gather:
// one block per KV head updates the table and lists the admissions, then a
// copy moves the admitted rows from the step's gathered rows into their
// slots, within HBM. Nothing runs on the host and nothing waits, so a step
// captured in a CUDA graph adapts the cache at every replay as a direct
// step does. The engine enqueues them on a stream of their own, forked
// after the gather (engine/cuda/sequence_state_cuda.h): they then overlap
// the step's attention and the next layer's step, which must neither
// overwrite the rows and positions they read nor gather from the layer's
// table before they end.
//
// The table, slots and policy state are charged to the HBM budget and the
// slots to the Store's cache budget for the object's lifetime. Not
// thread-safe: the steps of one sequence are enqueued by one thread, in
// order, on one stream (the policy's scratch is shared by the layers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "core/cuda_handles.h"
#include "pqkv/status.h"
#include "storage/memory_budget.h"
#include "tiering/block_cache.h"
#include "tiering/hot_rows.h"
#include "tiering/resident_rows.h"

namespace pqkv::tiering {

struct HotRowsShape {
  int layers = 0;
  int kv_heads = 0;
  int64_t row_bytes = 0;   // a multiple of 16
  int64_t max_tokens = 0;  // tokens per layer the tables cover (later tokens are not cached)
};

// One step's rows, as the gather left them, for the policy.
struct HotRowsStep {
  int layer = 0;
  // Device int32 [kv_heads][tokens]: the step's positions (-1 = none), and
  // device rows [kv_heads][tokens][row_bytes] gathered from them.
  const int32_t* positions = nullptr;
  const std::byte* rows = nullptr;
  int64_t tokens = 0;
  // A replayed step: the entries per KV head in device memory, read when the
  // kernels run (the stride of both lists, as for the gather), or null.
  const int64_t* device_tokens = nullptr;
  // Rows held resident (never cached): resident.holds(token, length), the
  // length from device_length when it is set, else `length`.
  ResidentShape resident;
  int64_t length = 0;
  const int64_t* device_length = nullptr;
  // The entries the policy considers: [first, first + count) of each head's
  // list (count -1: to its end), or, where the pointers are set, the values
  // in device memory (a replayed step's sink and picks). Narrowing them to
  // the index's picks skips the resident sink and window.
  int64_t first = 0;
  int64_t count = -1;
  const int64_t* device_first = nullptr;
  const int64_t* device_count = nullptr;
};

class HotRowsCuda {
 public:
  // options.num_slots slots split evenly over (layer, KV head) (the rest
  // unused); options.admit_count 1 or 2; tables cleared on `stream` (the
  // call waits for it). InvalidArgument for bad options or shape;
  // ResourceExhausted when a budget or the device is out of room.
  static Result<std::unique_ptr<HotRowsCuda>> create(const BlockCacheOptions& options,
                                                     const HotRowsShape& shape,
                                                     storage::MemoryBudget* hbm_budget,
                                                     storage::MemoryBudget* cache_budget,
                                                     cudaStream_t stream);
  ~HotRowsCuda();
  HotRowsCuda(const HotRowsCuda&) = delete;
  HotRowsCuda& operator=(const HotRowsCuda&) = delete;

  // The table of `layer` and the slots, as the gather reads them.
  BlockCacheView view(int layer) const;
  // Enqueues the policy's step over `step` on `stream`, after the gather
  // that filled step.rows and before anything overwrites them. No
  // allocation, no host synchronisation: it can be captured in a graph.
  Status after_gather(const HotRowsStep& step, cudaStream_t stream);
  // The hits of the last step of `layer`, summed over its KV heads: waits
  // for `stream` (traced steps only).
  Result<int64_t> last_hits(int layer, cudaStream_t stream) const;
  int64_t slots_per_head() const { return slots_per_head_; }
  // Device state of `layer`, for tests: table int32 [kv_heads][max_tokens],
  // owners int32 [kv_heads][slots_per_head] (the token of each slot, or -1),
  // slots [num_slots][row_bytes].
  const int32_t* device_table(int layer) const;
  const int32_t* device_owners(int layer) const;
  const std::byte* device_slots() const { return slots_.as<std::byte>(); }

 private:
  HotRowsCuda(const HotRowsShape& shape, uint32_t admit_count)
      : shape_(shape), admit_count_(admit_count) {}

  HotRowsShape shape_;
  uint32_t admit_count_ = 1;
  int64_t slots_per_head_ = 0;
  gpu::DeviceBuffer slots_;
  gpu::DeviceBuffer tables_;   // int32 [layers][kv_heads][max_tokens]
  gpu::DeviceBuffer owners_;   // int32 [layers][kv_heads][slots_per_head]
  gpu::DeviceBuffer used_;     // uint32, same shape: the stamp that last read or filled the slot
  gpu::DeviceBuffer seen_;     // uint32 [layers][kv_heads][max_tokens] (admit_count 2 only)
  gpu::DeviceBuffer state_;    // per (layer, KV head): stamp, hand, hits
  gpu::DeviceBuffer scratch_;  // per KV head: free slots and admissions of one step
  int64_t hbm_bytes_ = 0;
  int64_t slot_bytes_ = 0;
  storage::MemoryBudget* hbm_budget_ = nullptr;
  storage::MemoryBudget* cache_budget_ = nullptr;
};

}  // namespace pqkv::tiering
