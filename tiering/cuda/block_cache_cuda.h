// The block cache of one sequence on the GPU (tiering/block_cache.h): slots
// in HBM, a residency table per layer in device memory (block -> slot, or
// -1) that the decode step's gather reads, and the host policy
// (tiering/block_cache_policy.h) run on a worker thread of its own, one step
// behind, so neither its work nor a host synchronisation is on the step's
// path:
//
//   after a step of layer l (after_step): its selection is copied back to
//     pinned host memory on the step's stream and handed to the worker;
//   the worker waits (on its own thread) for that copy and for the copies
//     of l's last admissions, marks those admissions complete, runs the
//     policy over the selection, and leaves for l: the table updates
//     (completed admissions in, evicted blocks out) and the new admissions;
//   before the next step of l (before_step), on the enqueueing thread, only
//     where the worker has finished (an atomic flag, never a wait): the
//     updates are applied by a kernel on the step's stream, so a slot
//     serves only complete copies and an evicted block leaves the table
//     before its slot is written; the copy stream waits for that point, then
//     one kernel copies the admissions from the pinned row store into their
//     slots.
//   A selection that arrives while the worker still holds l's last one is
//   not counted (the worker fell a step behind).
//
// While another thread captures a CUDA graph in global mode
// (cudaStreamCaptureModeGlobal) the worker's waits are refused and its
// selections not counted; capture in thread-local mode, as pqkv does.
//
// The table and slots are charged to the HBM budget and the slots to the
// Store's cache budget for the object's lifetime. Not thread-safe: the
// steps of one sequence are enqueued by one thread, in order, on one stream;
// the worker is internal.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
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

// Host time the cache spent for one layer, in microseconds.
struct BlockCacheHostTime {
  double policy_us = 0;   // the policy on the worker thread (off the step's path)
  double enqueue_us = 0;  // before_step and after_step on the enqueueing thread
};

class BlockCacheCuda {
 public:
  // options.num_slots slots on the current device, tables for `shape`,
  // charged to `hbm_budget` and (slots) `cache_budget` (either may be null);
  // starts the policy's worker thread. Admissions run on `copy_stream`; the
  // tables are cleared on `stream` and the call waits for it.
  // InvalidArgument for bad options; ResourceExhausted when a budget, the
  // device or the host (a thread) is out of room.
  static Result<std::unique_ptr<BlockCacheCuda>> create(
      const BlockCacheOptions& options, const BlockCacheCudaShape& shape, cudaStream_t copy_stream,
      storage::MemoryBudget* hbm_budget, storage::MemoryBudget* cache_budget, cudaStream_t stream);
  // Stops the worker and waits for the copies in flight.
  ~BlockCacheCuda();
  BlockCacheCuda(const BlockCacheCuda&) = delete;
  BlockCacheCuda& operator=(const BlockCacheCuda&) = delete;

  // Before a step of `layer` is enqueued on `stream` (see the header
  // comment). `rows` is the layer's host row table (pinned, mapped blocks
  // that a kernel reads). Never waits for the device nor the worker. Returns
  // the error the worker met for this layer (a failed CUDA event), if any.
  Status before_step(int layer, const storage::RowTableView& rows, cudaStream_t stream);
  // After a step's search: enqueues on `stream` the copy of its selection
  // (device int32 [kv_heads, k]) to the host and hands it to the worker, the
  // layer holding `length` tokens. A selection wider than shape.max_selected
  // is not counted.
  Status after_step(int layer, const int32_t* selected, int64_t k, int64_t length,
                    cudaStream_t stream);
  // Ends a decode step (every layer done): the worker ages the counts after
  // the selections handed to it so far.
  void end_step();
  // Blocks until the worker has run everything handed to it. For tests and
  // measurements; never on the decode path.
  void wait_idle();

  // The table of `layer` and the slots, as the gather reads them.
  BlockCacheView view(int layer) const;
  // Entries of the DRAM ranges of `plan` in the host position lists
  // (positions[kv_head][entry], as AttendTrace::attended) that the table of
  // `layer` served to the last step enqueued: the cache hits of a traced
  // step. Reads the host copy of the table (no device access).
  int64_t hits(int layer, std::span<const std::vector<int64_t>> positions,
               const FetchPlan& plan) const;
  // Host time spent for `layer` since the last call for it; resets it.
  BlockCacheHostTime take_host_time(int layer);
  // The policy; read it only after wait_idle(), while no step is enqueued.
  const BlockCachePolicy& policy() const { return policy_; }

 private:
  enum State : int {
    kIdle = 0,    // the enqueueing thread owns the layer's fields
    kQueued = 1,  // the worker owns them
    kDone = 2,    // the worker's result waits for before_step
  };
  struct Layer {
    gpu::PinnedBuffer selection;  // int32 [kv_heads, max_selected], copied back
    gpu::EventHandle selected;    // recorded after that copy
    int64_t k = 0;
    int64_t length = 0;
    gpu::PinnedBuffer copies;  // the admissions' (source, slot) pairs the copy kernel reads
    gpu::EventHandle copied;   // recorded after the admissions' copy
    std::vector<std::pair<BlockId, int64_t>> in_flight;  // admissions whose copy may run
    // The worker's result.
    std::vector<std::pair<int64_t, int32_t>> updates;  // (table index, slot or -1), in order
    std::vector<std::pair<BlockId, int64_t>> admissions;
    cudaError_t error = cudaSuccess;  // of the worker's waits
    double worker_us = 0;
    std::atomic<int> state{kIdle};
    BlockCacheHostTime time;  // the enqueueing thread's account
  };
  BlockCacheCuda(BlockCachePolicy policy, const BlockCacheCudaShape& shape)
      : policy_(std::move(policy)), shape_(shape) {}
  int64_t table_index(const BlockId& b) const {
    return (int64_t{b.layer} * shape_.kv_heads + b.head) * max_blocks_ + b.index;
  }
  Status apply(Layer& l, const storage::RowTableView& rows, cudaStream_t stream);
  // Enqueues on `stream` the entries set since the last call (the last value
  // of an entry wins).
  Status update_table(cudaStream_t stream);
  // Sets a table entry (host copy now, device at update_table).
  void set_entry(int64_t index, int32_t slot);
  // Drops the entry that lists `slot`, if any.
  void unlist_slot(int64_t slot);
  void work();           // the worker's loop
  void run(int layer);   // one selection of `layer`, on the worker
  void submit(int job);  // a layer's selection, or kEndStep
  static constexpr int kEndStep = -1;

  BlockCachePolicy policy_;  // the worker's (see policy())
  BlockCacheCudaShape shape_;
  int64_t max_blocks_ = 0;
  gpu::DeviceBuffer slots_;
  gpu::DeviceBuffer tables_;  // int32 [layers][kv_heads][max_blocks_]
  // The tables as the device holds them once every update enqueued so far
  // has run; per slot, the entry listing it (or -1) and the entry of the
  // block whose copy into it was enqueued last (or -1). The enqueueing
  // thread's, as is device_updates_ (the entries set, not yet enqueued).
  std::vector<int32_t> mirror_;
  std::vector<int64_t> slot_listed_;
  std::vector<int64_t> slot_owner_;
  std::vector<std::pair<int64_t, int32_t>> device_updates_;
  std::vector<std::unique_ptr<Layer>> layers_;
  gpu::EventHandle evicted_;  // the step's stream past the evictions
  cudaStream_t copy_stream_ = nullptr;
  int64_t hbm_bytes_ = 0;
  int64_t slot_bytes_ = 0;
  storage::MemoryBudget* hbm_budget_ = nullptr;
  storage::MemoryBudget* cache_budget_ = nullptr;
  BlockStep step_;  // the worker's scratch

  std::mutex mutex_;
  std::condition_variable wake_;  // the worker: a job or stop
  std::condition_variable idle_;  // wait_idle: no job left
  std::deque<int> jobs_;
  int running_ = 0;  // jobs queued or running
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace pqkv::tiering
