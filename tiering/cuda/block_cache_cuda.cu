#include "tiering/cuda/block_cache_cuda.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <span>
#include <string>
#include <system_error>

#include "core/cuda_check.h"
#include "storage/kv_row_store.h"

namespace pqkv::tiering {
namespace {

constexpr int kCopyThreads = 256;
// Rows one step of one layer admits, at most: bounds the pinned list and the
// copy a step puts on the link (256 blocks of 64 tokens, 8 MiB of 512 B rows).
constexpr int64_t kMaxAdmittedRowsPerStep = 16384;
// Table updates carried by one launch, as kernel arguments (no buffer to
// keep alive): 24 KB, within the 32 KB that kernel parameters may take on
// sm_70 and later with CUDA 12.1+, so a step's updates usually need one launch.
constexpr int kUpdatesPerLaunch = 2048;

struct BlockCopy {
  const std::byte* source;  // the block's first row in the row store (pinned, mapped)
  std::byte* slot;          // its slot in device memory
};

struct TableUpdates {
  int count = 0;
  int64_t index[kUpdatesPerLaunch];
  int32_t value[kUpdatesPerLaunch];
};

__global__ void update_table_kernel(int32_t* table, TableUpdates updates) {
  for (int i = threadIdx.x; i < updates.count; i += blockDim.x)
    table[updates.index[i]] = updates.value[i];
}

// Copies the `count` blocks of `copies` (block_chunks 16-byte chunks each)
// into their slots: one thread per chunk, so blocks of a single row keep
// every thread busy too.
__global__ void __launch_bounds__(kCopyThreads)
    copy_blocks_kernel(const BlockCopy* copies, int64_t count, int64_t block_chunks) {
  const int64_t total = count * block_chunks;
  for (int64_t i = int64_t{blockIdx.x} * kCopyThreads + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kCopyThreads) {
    const int64_t b = i / block_chunks;
    const int64_t chunk = i - b * block_chunks;
    const BlockCopy c = copies[b];
    reinterpret_cast<uint4*>(c.slot)[chunk] =
        __ldcg(reinterpret_cast<const uint4*>(c.source) + chunk);
  }
}

int64_t max_admissions(const BlockCacheOptions& options) {
  return std::max<int64_t>(1, kMaxAdmittedRowsPerStep / options.tokens_per_block);
}

// An event the worker can wait for without spinning a core.
Result<gpu::EventHandle> make_waitable_event() {
  cudaEvent_t e = nullptr;
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync));
  return gpu::EventHandle(e);
}

}  // namespace

Result<std::unique_ptr<BlockCacheCuda>> BlockCacheCuda::create(
    const BlockCacheOptions& options, const BlockCacheCudaShape& shape, cudaStream_t copy_stream,
    storage::MemoryBudget* hbm_budget, storage::MemoryBudget* cache_budget, cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(options.validate());
  if (options.tokens_per_block > storage::KvRowStore::kTokensPerBlock ||
      shape.row_bytes % 16 != 0 || shape.max_tokens < 0 || shape.max_selected < 0) {
    return Status::invalid_argument(
        "block cache: tokens_per_block must be at most the row store's block of " +
        std::to_string(storage::KvRowStore::kTokensPerBlock) +
        " tokens and rows a multiple of 16 bytes, got " + std::to_string(options.tokens_per_block) +
        " and " + std::to_string(shape.row_bytes));
  }
  PQKV_ASSIGN_OR_RETURN(BlockCachePolicy policy, BlockCachePolicy::create(options));
  std::unique_ptr<BlockCacheCuda> c(new BlockCacheCuda(std::move(policy), shape));
  c->copy_stream_ = copy_stream;
  c->max_blocks_ = std::max<int64_t>(
      1, (shape.max_tokens + options.tokens_per_block - 1) / options.tokens_per_block);
  const int64_t slot_bytes = options.num_slots * options.tokens_per_block * shape.row_bytes;
  const int64_t table_bytes =
      int64_t{shape.layers} * shape.kv_heads * c->max_blocks_ * int64_t{sizeof(int32_t)};
  if (cache_budget != nullptr) {
    PQKV_RETURN_IF_ERROR(cache_budget->reserve(slot_bytes, "the block cache's slots"));
    c->cache_budget_ = cache_budget;
    c->slot_bytes_ = slot_bytes;
  }
  if (hbm_budget != nullptr) {
    PQKV_RETURN_IF_ERROR(
        hbm_budget->reserve(slot_bytes + table_bytes, "the block cache's slots and tables"));
    c->hbm_budget_ = hbm_budget;
    c->hbm_bytes_ = slot_bytes + table_bytes;
  }
  PQKV_RETURN_IF_ERROR(c->slots_.reserve(static_cast<size_t>(std::max<int64_t>(slot_bytes, 16))));
  PQKV_RETURN_IF_ERROR(c->tables_.reserve(static_cast<size_t>(table_bytes)));
  // 0xFF bytes are -1 as int32: no block has a slot.
  PQKV_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(c->tables_.data(), 0xFF, static_cast<size_t>(table_bytes), stream));
  c->mirror_.assign(static_cast<size_t>(table_bytes / int64_t{sizeof(int32_t)}), -1);
  c->slot_listed_.assign(static_cast<size_t>(options.num_slots), -1);
  c->slot_owner_.assign(static_cast<size_t>(options.num_slots), -1);
  PQKV_ASSIGN_OR_RETURN(c->evicted_, gpu::make_event());
  c->layers_.resize(static_cast<size_t>(shape.layers));
  for (auto& made : c->layers_) {
    made = std::make_unique<Layer>();
    Layer& l = *made;
    PQKV_RETURN_IF_ERROR(l.selection.reserve(static_cast<size_t>(
        std::max<int64_t>(1, shape.kv_heads * shape.max_selected) * sizeof(int32_t))));
    PQKV_ASSIGN_OR_RETURN(l.selected, make_waitable_event());
    PQKV_RETURN_IF_ERROR(l.copies.reserve(sizeof(BlockCopy) * max_admissions(options)));
    PQKV_ASSIGN_OR_RETURN(l.copied, make_waitable_event());
  }
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  int device = 0;
  PQKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  try {
    c->worker_ = std::thread([cache = c.get(), device] {
      // The events the worker waits for belong to this device.
      if (cudaSetDevice(device) != cudaSuccess) return;
      cache->work();
    });
  } catch (const std::system_error& e) {
    return Status::resource_exhausted(std::string("block cache: cannot start its policy thread: ") +
                                      e.what());
  }
  return Result<std::unique_ptr<BlockCacheCuda>>(std::move(c));
}

BlockCacheCuda::~BlockCacheCuda() {
  if (worker_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    worker_.join();
  }
  // Copies in flight write the slots: let them finish before the memory goes.
  if (copy_stream_ != nullptr) static_cast<void>(cudaStreamSynchronize(copy_stream_));
  if (hbm_budget_ != nullptr) hbm_budget_->release(hbm_bytes_);
  if (cache_budget_ != nullptr) cache_budget_->release(slot_bytes_);
}

void BlockCacheCuda::submit(int job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(job);
    ++running_;
  }
  wake_.notify_one();
}

void BlockCacheCuda::end_step() {
  submit(kEndStep);
}

void BlockCacheCuda::wait_idle() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [&] { return running_ == 0 || stop_; });
}

void BlockCacheCuda::work() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    wake_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
    if (stop_) return;
    const int job = jobs_.front();
    jobs_.pop_front();
    lock.unlock();
    if (job == kEndStep) {
      policy_.end_step();
    } else {
      run(job);
    }
    lock.lock();
    if (--running_ == 0) idle_.notify_all();
  }
}

void BlockCacheCuda::run(int layer) {
  const auto t0 = std::chrono::steady_clock::now();
  Layer& l = *layers_[static_cast<size_t>(layer)];
  l.updates.clear();
  l.admissions.clear();
  // The selection, then the copies of the last admissions (recorded before
  // it on the enqueueing thread), have landed: waiting here costs the step nothing.
  l.error = cudaEventSynchronize(l.selected.get());
  if (l.error == cudaSuccess && !l.in_flight.empty())
    l.error = cudaEventSynchronize(l.copied.get());
  if (l.error == cudaErrorStreamCaptureUnsupported || l.error == cudaErrorStreamCaptureImplicit) {
    // Another thread captures a graph in global mode, which forbids waits:
    // this selection is not counted, the admissions complete at the next.
    l.error = cudaSuccess;
  } else if (l.error == cudaSuccess) {
    // The completed admissions enter the table.
    for (const auto& [block, slot] : l.in_flight) {
      policy_.complete(block, slot);
      // Unless it was evicted meanwhile.
      if (policy_.ready_slot(block) == slot)
        l.updates.emplace_back(table_index(block), static_cast<int32_t>(slot));
    }
    l.in_flight.clear();
    // Blocks past the tables are never complete for the policy.
    const int64_t length = std::min(l.length, shape_.max_tokens);
    const auto* selection = l.selection.as<const int32_t>();
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const int64_t room =
          max_admissions(policy_.options()) - static_cast<int64_t>(l.admissions.size());
      policy_.step_into(layer, h,
                        std::span<const int32_t>(selection + h * l.k, static_cast<size_t>(l.k)),
                        length, room, /*per_position=*/false, &step_);
      for (const auto& [block, slot] : step_.evictions)
        l.updates.emplace_back(table_index(block), -1);
      l.admissions.insert(l.admissions.end(), step_.admissions.begin(), step_.admissions.end());
    }
  }
  l.worker_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  l.state.store(kDone, std::memory_order_release);
}

BlockCacheView BlockCacheCuda::view(int layer) const {
  BlockCacheView v;
  v.slots = slots_.as<std::byte>();
  v.table = tables_.as<int32_t>() + int64_t{layer} * shape_.kv_heads * max_blocks_;
  v.max_blocks = max_blocks_;
  v.row_bytes = shape_.row_bytes;
  v.block_shift = std::countr_zero(static_cast<uint64_t>(policy_.options().tokens_per_block));
  return v;
}

Status BlockCacheCuda::update_table(cudaStream_t stream) {
  auto& updates = device_updates_;
  // The last value of each entry only: the threads of one launch write in no
  // order. A stable sort keeps each entry's values in order.
  std::stable_sort(updates.begin(), updates.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t n = 0;
  for (size_t i = 0; i < updates.size(); ++i) {
    if (i + 1 < updates.size() && updates[i + 1].first == updates[i].first) continue;
    updates[n++] = updates[i];
  }
  updates.resize(n);
  for (size_t first = 0; first < updates.size(); first += kUpdatesPerLaunch) {
    TableUpdates u;
    u.count = static_cast<int>(std::min<size_t>(kUpdatesPerLaunch, updates.size() - first));
    for (int i = 0; i < u.count; ++i) {
      u.index[i] = updates[first + i].first;
      u.value[i] = updates[first + i].second;
    }
    update_table_kernel<<<1, kCopyThreads, 0, stream>>>(tables_.as<int32_t>(), u);
    PQKV_CUDA_CHECK_LAUNCH();
  }
  updates.clear();
  return ok_status();
}

void BlockCacheCuda::set_entry(int64_t index, int32_t slot) {
  mirror_[static_cast<size_t>(index)] = slot;
  device_updates_.emplace_back(index, slot);
}

void BlockCacheCuda::unlist_slot(int64_t slot) {
  int64_t& listed = slot_listed_[static_cast<size_t>(slot)];
  if (listed >= 0) set_entry(listed, -1);
  listed = -1;
}

Status BlockCacheCuda::before_step(int layer, const storage::RowTableView& rows,
                                   cudaStream_t stream) {
  Layer& l = *layers_[static_cast<size_t>(layer)];
  if (l.state.load(std::memory_order_acquire) != kDone) return ok_status();
  const auto t0 = std::chrono::steady_clock::now();
  l.time.policy_us += l.worker_us;
  const Status s = apply(l, rows, stream);
  l.state.store(kIdle, std::memory_order_release);
  l.time.enqueue_us +=
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

Status BlockCacheCuda::apply(Layer& l, const storage::RowTableView& rows, cudaStream_t stream) {
  // A copy the worker waited for failed (the device is in error).
  PQKV_CUDA_RETURN_IF_ERROR(l.error);
  // The worker's updates, checked against what this thread has enqueued so
  // far: the results of several layers can reach here out of the worker's
  // order (one that was not ready waits for its layer's next step), so a
  // completion enters the table only if the last copy into its slot was its
  // block's, and no slot stays listed once a copy into it is enqueued.
  for (const auto& [index, slot] : l.updates) {
    const int32_t listed = mirror_[static_cast<size_t>(index)];
    if (slot < 0) {
      if (listed >= 0) unlist_slot(listed);
      continue;
    }
    if (slot_owner_[static_cast<size_t>(slot)] != index || listed == slot) continue;
    if (listed >= 0) slot_listed_[static_cast<size_t>(listed)] = -1;
    unlist_slot(slot);
    set_entry(index, slot);
    slot_listed_[static_cast<size_t>(slot)] = index;
  }
  for (const auto& [block, slot] : l.admissions) {
    unlist_slot(slot);
    slot_owner_[static_cast<size_t>(slot)] = table_index(block);
  }
  PQKV_RETURN_IF_ERROR(update_table(stream));
  // Admissions the worker could not wait for stay in flight (it then admitted none).
  if (!l.in_flight.empty()) return ok_status();
  l.in_flight.swap(l.admissions);
  if (l.in_flight.empty()) return ok_status();
  // The slots are written only once the step's stream has dropped their old
  // blocks. The copy kernel of the layer's last admissions has finished (the
  // worker waited for it), so its list can be written again.
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(evicted_.get(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(copy_stream_, evicted_.get()));
  const int64_t b = policy_.options().tokens_per_block;
  auto* copies = l.copies.as<BlockCopy>();
  for (size_t i = 0; i < l.in_flight.size(); ++i) {
    const auto& [block, slot] = l.in_flight[i];
    // A cache block lies inside one row-store block: its rows are contiguous.
    copies[i].source = rows.row(block.head, block.index * b);
    copies[i].slot = slots_.as<std::byte>() + slot * b * shape_.row_bytes;
  }
  const int64_t chunks = static_cast<int64_t>(l.in_flight.size()) * b * shape_.row_bytes / 16;
  const auto grid = static_cast<unsigned>(
      std::min<int64_t>((chunks + kCopyThreads - 1) / kCopyThreads, int64_t{1} << 14));
  copy_blocks_kernel<<<grid, kCopyThreads, 0, copy_stream_>>>(
      copies, static_cast<int64_t>(l.in_flight.size()), b * shape_.row_bytes / 16);
  PQKV_CUDA_CHECK_LAUNCH();
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.copied.get(), copy_stream_));
  return ok_status();
}

Status BlockCacheCuda::after_step(int layer, const int32_t* selected, int64_t k, int64_t length,
                                  cudaStream_t stream) {
  Layer& l = *layers_[static_cast<size_t>(layer)];
  if (k <= 0 || k > shape_.max_selected) return ok_status();
  // The worker still holds the layer's last selection, or its result waits
  // for before_step: this one is not counted.
  if (l.state.load(std::memory_order_acquire) != kIdle) return ok_status();
  const auto t0 = std::chrono::steady_clock::now();
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      l.selection.data(), selected, static_cast<size_t>(shape_.kv_heads * k) * sizeof(int32_t),
      cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(l.selected.get(), stream));
  l.k = k;
  l.length = length;
  l.state.store(kQueued, std::memory_order_release);
  submit(layer);
  l.time.enqueue_us +=
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  return ok_status();
}

int64_t BlockCacheCuda::hits(int layer, std::span<const std::vector<int64_t>> positions,
                             const FetchPlan& plan) const {
  // The host copy of the table holds what the step's gather read: every
  // update enqueued before the step is in it, none after.
  const int32_t* table = mirror_.data() + int64_t{layer} * shape_.kv_heads * max_blocks_;
  const int shift = std::countr_zero(static_cast<uint64_t>(policy_.options().tokens_per_block));
  int64_t n = 0;
  for (int h = 0; h < shape_.kv_heads && static_cast<size_t>(h) < positions.size(); ++h) {
    const int32_t* head_table = table + h * max_blocks_;
    const std::vector<int64_t>& head = positions[static_cast<size_t>(h)];
    for (int r = 0; r < plan.num_ranges; ++r) {
      if (plan.ranges[r].source != RowSource::kDram) continue;
      const int64_t end = std::min<int64_t>(plan.ranges[r].end, static_cast<int64_t>(head.size()));
      for (int64_t e = plan.ranges[r].begin; e < end; ++e) {
        const int64_t block = head[static_cast<size_t>(e)] >> shift;
        n += block >= 0 && block < max_blocks_ && head_table[block] >= 0;
      }
    }
  }
  return n;
}

BlockCacheHostTime BlockCacheCuda::take_host_time(int layer) {
  return std::exchange(layers_[static_cast<size_t>(layer)]->time, BlockCacheHostTime{});
}

}  // namespace pqkv::tiering
