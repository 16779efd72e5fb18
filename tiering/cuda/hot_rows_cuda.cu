#include "tiering/cuda/hot_rows_cuda.h"

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <string>
#include <vector>

#include "core/cuda_check.h"

namespace pqkv::tiering {
namespace {

constexpr int kPolicyThreads = 1024;
// Entries (and slots) per thread in one scan: fewer barriers per step.
constexpr int kItems = 8;
constexpr int64_t kTile = int64_t{kPolicyThreads} * kItems;
constexpr int kCopyThreads = 256;
using Scan = cub::BlockScan<int, kPolicyThreads>;

// The policy's state of one (layer, KV head).
struct HeadState {
  uint32_t stamp = 0;  // steps so far
  int32_t hand = 0;    // the free slot to take first
  int64_t hits = 0;    // of the last step
};

struct PolicyArgs {
  // The layer's arrays, [kv_heads][...].
  int32_t* table = nullptr;
  int32_t* owners = nullptr;
  uint32_t* used = nullptr;
  uint32_t* seen = nullptr;  // null: admit at the first pick
  HeadState* state = nullptr;
  // Scratch, [kv_heads][slots] each, and [kv_heads] counts.
  int32_t* free_list = nullptr;
  int32_t* admitted_entry = nullptr;
  int32_t* admitted_slot = nullptr;
  int32_t* admitted = nullptr;
  HotRowsStep step;  // the step's positions, counts and resident rows
  int64_t max_tokens = 0;
  int64_t slots = 0;      // per KV head
  int64_t slot_base = 0;  // the layer's first global slot
};

// One block per KV head; see tiering/hot_rows.h for the policy, which
// HotRowsPolicy runs on the host in the same order.
__global__ void __launch_bounds__(kPolicyThreads) hot_rows_policy_kernel(PolicyArgs a) {
  __shared__ typename Scan::TempStorage scan;
  __shared__ uint32_t stamp_shared;
  __shared__ int32_t hand_shared;
  const int head = blockIdx.x;
  const int64_t tokens = a.step.device_tokens != nullptr ? *a.step.device_tokens : a.step.tokens;
  const int64_t length = a.step.device_length != nullptr ? *a.step.device_length : a.step.length;
  const int64_t first =
      min(tokens, a.step.device_first != nullptr ? *a.step.device_first : a.step.first);
  const int64_t count = a.step.device_count != nullptr ? *a.step.device_count : a.step.count;
  const int64_t end = count < 0 ? tokens : min(tokens, first + count);
  const int64_t slots = a.slots;
  const int32_t* pos = a.step.positions + head * tokens;
  int32_t* table = a.table + head * a.max_tokens;
  int32_t* owners = a.owners + head * slots;
  uint32_t* used = a.used + head * slots;
  uint32_t* seen = a.seen != nullptr ? a.seen + head * a.max_tokens : nullptr;
  int32_t* free_list = a.free_list + head * slots;
  int32_t* admitted_entry = a.admitted_entry + head * slots;
  int32_t* admitted_slot = a.admitted_slot + head * slots;
  const auto base = static_cast<int32_t>(a.slot_base + head * slots);
  if (threadIdx.x == 0) {
    stamp_shared = a.state[head].stamp + 1;
    hand_shared = a.state[head].hand;
  }
  __syncthreads();
  const uint32_t stamp = stamp_shared;
  const int64_t hand = hand_shared;
  const auto cacheable = [&](int32_t token) {
    return token >= 0 && token < a.max_tokens && !a.step.resident.holds(token, length);
  };

  // 1. Hits: their slots are used at this step.
  int hits = 0;
  for (int64_t e = first + threadIdx.x; e < end; e += kPolicyThreads) {
    const int32_t token = pos[e];
    if (!cacheable(token)) continue;
    const int32_t s = table[token];
    if (s < 0) continue;
    used[s - base] = stamp;
    ++hits;
  }
  int ignored = 0;
  int total_hits = 0;
  Scan(scan).ExclusiveSum(hits, ignored, total_hits);
  __syncthreads();

  // 2. The free slots, from the hand on (each thread kItems consecutive ones).
  int free_count = 0;
  for (int64_t k0 = 0; k0 < slots; k0 += kTile) {
    int flag[kItems];
    int at[kItems];
    int32_t slot[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t k = k0 + int64_t{threadIdx.x} * kItems + j;
      flag[j] = 0;
      slot[j] = 0;
      if (k < slots) {
        slot[j] = static_cast<int32_t>((hand + k) % slots);
        flag[j] = used[slot[j]] != stamp ? 1 : 0;
      }
    }
    int total = 0;
    Scan(scan).ExclusiveSum(flag, at, total);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (flag[j]) free_list[free_count + at[j]] = slot[j];
    free_count += total;
  }
  __syncthreads();

  // 3. The misses, in entry order, take them. A slot's old token is none of
  // this step's picks (its slot would be used), so no thread reads its entry.
  // (A position list holds each token once. Were one listed twice, both
  // entries could take a slot: the table would name one, the other slot
  // would hold the same row unlisted, and nothing would read a wrong row.)
  int taken = 0;
  for (int64_t e0 = first; e0 < end; e0 += kTile) {
    int flag[kItems];
    int at[kItems];
    int32_t token[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t e = e0 + int64_t{threadIdx.x} * kItems + j;
      flag[j] = 0;
      token[j] = -1;
      if (e < end) {
        token[j] = pos[e];
        if (cacheable(token[j]) && table[token[j]] < 0) {
          flag[j] = 1;
          if (seen != nullptr) {
            const uint32_t last = seen[token[j]];
            flag[j] = last != 0 && stamp - last <= kHotRowsAdmitWindow ? 1 : 0;
            seen[token[j]] = stamp;
          }
        }
      }
    }
    int total = 0;
    Scan(scan).ExclusiveSum(flag, at, total);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (!flag[j] || taken + at[j] >= free_count) continue;
      const int32_t i = free_list[taken + at[j]];
      const int32_t old = owners[i];
      if (old >= 0) table[old] = -1;
      owners[i] = token[j];
      table[token[j]] = base + i;
      used[i] = stamp;
      admitted_entry[taken + at[j]] = static_cast<int32_t>(e0 + int64_t{threadIdx.x} * kItems + j);
      admitted_slot[taken + at[j]] = base + i;
    }
    taken = min(free_count, taken + total);
  }
  // Hits refresh their pick stamp too (pass 3 has read every stamp it needs:
  // its last scan is a barrier; a miss's stamp is rewritten with the same value).
  if (seen != nullptr) {
    for (int64_t e = first + threadIdx.x; e < end; e += kPolicyThreads) {
      const int32_t token = pos[e];
      if (cacheable(token)) seen[token] = stamp;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    HeadState& st = a.state[head];
    st.stamp = stamp;
    if (taken > 0) st.hand = static_cast<int32_t>((free_list[taken - 1] + 1) % slots);
    st.hits = total_hits;
    a.admitted[head] = taken;
  }
}

// Copies the admitted rows of KV head blockIdx.y from the gathered rows into their slots.
__global__ void __launch_bounds__(kCopyThreads)
    hot_rows_copy_kernel(const int32_t* admitted, const int32_t* admitted_entry,
                         const int32_t* admitted_slot, int64_t slots, const uint4* rows,
                         int64_t tokens, const int64_t* device_tokens, int64_t row_chunks,
                         uint4* slot_rows) {
  const int head = blockIdx.y;
  if (device_tokens != nullptr) tokens = *device_tokens;
  const int64_t n = admitted[head];
  const int32_t* entries = admitted_entry + head * slots;
  const int32_t* targets = admitted_slot + head * slots;
  const uint4* head_rows = rows + head * tokens * row_chunks;
  for (int64_t i = int64_t{blockIdx.x} * kCopyThreads + threadIdx.x; i < n * row_chunks;
       i += int64_t{gridDim.x} * kCopyThreads) {
    const int64_t r = i / row_chunks;
    const int64_t c = i - r * row_chunks;
    slot_rows[int64_t{targets[r]} * row_chunks + c] = head_rows[entries[r] * row_chunks + c];
  }
}

}  // namespace

Result<std::unique_ptr<HotRowsCuda>> HotRowsCuda::create(const BlockCacheOptions& options,
                                                         const HotRowsShape& shape,
                                                         storage::MemoryBudget* hbm_budget,
                                                         storage::MemoryBudget* cache_budget,
                                                         cudaStream_t stream) {
  PQKV_RETURN_IF_ERROR(options.validate());
  if (options.tokens_per_block != 1 || (options.admit_count != 1 && options.admit_count != 2) ||
      shape.row_bytes <= 0 || shape.row_bytes % 16 != 0 || shape.layers <= 0 ||
      shape.kv_heads <= 0 || shape.max_tokens < 0 || shape.max_tokens > INT32_MAX) {
    return Status::invalid_argument(
        "hot rows: need blocks of one token, admit_count 1 or 2, rows a multiple of 16 bytes and "
        "at most 2^31 tokens; got " +
        std::to_string(options.tokens_per_block) + " tokens per block, admit_count " +
        std::to_string(options.admit_count) + ", " + std::to_string(shape.row_bytes) +
        "-byte rows, " + std::to_string(shape.max_tokens) + " tokens");
  }
  std::unique_ptr<HotRowsCuda> c(new HotRowsCuda(shape, options.admit_count));
  const int64_t lanes = int64_t{shape.layers} * shape.kv_heads;
  c->slots_per_head_ = std::min<int64_t>(options.num_slots / lanes, INT32_MAX / lanes);
  const int64_t slots = c->slots_per_head_ * lanes;
  const int64_t slot_bytes = slots * shape.row_bytes;
  const int64_t table_entries = lanes * std::max<int64_t>(shape.max_tokens, 1);
  const int64_t per_slot = std::max<int64_t>(slots, 1);
  const int64_t seen_bytes = options.admit_count >= 2 ? table_entries * 4 : 0;
  const int64_t scratch_bytes =
      (3 * int64_t{shape.kv_heads} * std::max<int64_t>(c->slots_per_head_, 1) + shape.kv_heads) * 4;
  const int64_t bytes = slot_bytes + table_entries * 4 + 2 * per_slot * 4 + seen_bytes +
                        lanes * int64_t{sizeof(HeadState)} + scratch_bytes;
  if (cache_budget != nullptr) {
    PQKV_RETURN_IF_ERROR(cache_budget->reserve(slot_bytes, "the hot rows' slots"));
    c->cache_budget_ = cache_budget;
    c->slot_bytes_ = slot_bytes;
  }
  if (hbm_budget != nullptr) {
    PQKV_RETURN_IF_ERROR(hbm_budget->reserve(bytes, "the hot rows' slots, tables and state"));
    c->hbm_budget_ = hbm_budget;
    c->hbm_bytes_ = bytes;
  }
  PQKV_RETURN_IF_ERROR(c->slots_.reserve(static_cast<size_t>(std::max<int64_t>(slot_bytes, 16))));
  PQKV_RETURN_IF_ERROR(c->tables_.reserve(static_cast<size_t>(table_entries * 4)));
  PQKV_RETURN_IF_ERROR(c->owners_.reserve(static_cast<size_t>(per_slot * 4)));
  PQKV_RETURN_IF_ERROR(c->used_.reserve(static_cast<size_t>(per_slot * 4)));
  if (seen_bytes > 0) PQKV_RETURN_IF_ERROR(c->seen_.reserve(static_cast<size_t>(seen_bytes)));
  PQKV_RETURN_IF_ERROR(c->state_.reserve(static_cast<size_t>(lanes * int64_t{sizeof(HeadState)})));
  PQKV_RETURN_IF_ERROR(c->scratch_.reserve(static_cast<size_t>(scratch_bytes)));
  // 0xFF bytes are -1 as int32: no token has a slot, no slot a token.
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(c->tables_.data(), 0xFF, c->tables_.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(c->owners_.data(), 0xFF, c->owners_.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(c->used_.data(), 0, c->used_.bytes(), stream));
  if (seen_bytes > 0)
    PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(c->seen_.data(), 0, c->seen_.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(c->state_.data(), 0, c->state_.bytes(), stream));
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return Result<std::unique_ptr<HotRowsCuda>>(std::move(c));
}

HotRowsCuda::~HotRowsCuda() {
  if (hbm_budget_ != nullptr) hbm_budget_->release(hbm_bytes_);
  if (cache_budget_ != nullptr) cache_budget_->release(slot_bytes_);
}

const int32_t* HotRowsCuda::device_table(int layer) const {
  return tables_.as<int32_t>() + int64_t{layer} * shape_.kv_heads * shape_.max_tokens;
}

const int32_t* HotRowsCuda::device_owners(int layer) const {
  return owners_.as<int32_t>() + int64_t{layer} * shape_.kv_heads * slots_per_head_;
}

BlockCacheView HotRowsCuda::view(int layer) const {
  BlockCacheView v;
  if (slots_per_head_ == 0) return v;
  v.slots = slots_.as<std::byte>();
  v.table = device_table(layer);
  v.max_blocks = shape_.max_tokens;
  v.row_bytes = shape_.row_bytes;
  v.block_shift = 0;
  return v;
}

Status HotRowsCuda::after_gather(const HotRowsStep& step, cudaStream_t stream) {
  if (slots_per_head_ == 0 || (step.tokens == 0 && step.device_tokens == nullptr))
    return ok_status();
  if (step.layer < 0 || step.layer >= shape_.layers || step.positions == nullptr ||
      step.rows == nullptr) {
    return Status::invalid_argument(
        "hot rows: a step needs a layer below " + std::to_string(shape_.layers) +
        " and its device positions and rows; got layer " + std::to_string(step.layer));
  }
  const int64_t lane = int64_t{step.layer} * shape_.kv_heads;
  const int64_t per_head = slots_per_head_;
  PolicyArgs a;
  a.table = tables_.as<int32_t>() + lane * shape_.max_tokens;
  a.owners = owners_.as<int32_t>() + lane * per_head;
  a.used = used_.as<uint32_t>() + lane * per_head;
  a.seen = admit_count_ >= 2 ? seen_.as<uint32_t>() + lane * shape_.max_tokens : nullptr;
  a.state = state_.as<HeadState>() + lane;
  int32_t* scratch = scratch_.as<int32_t>();
  a.free_list = scratch;
  a.admitted_entry = scratch + shape_.kv_heads * per_head;
  a.admitted_slot = scratch + 2 * shape_.kv_heads * per_head;
  a.admitted = scratch + 3 * shape_.kv_heads * per_head;
  a.step = step;
  a.max_tokens = shape_.max_tokens;
  a.slots = per_head;
  a.slot_base = lane * per_head;
  hot_rows_policy_kernel<<<static_cast<unsigned>(shape_.kv_heads), kPolicyThreads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAUNCH();
  const int64_t row_chunks = shape_.row_bytes / 16;
  const auto grid_x = static_cast<unsigned>(std::clamp<int64_t>(
      (per_head * row_chunks + 4 * kCopyThreads - 1) / (4 * kCopyThreads), 1, 1024));
  hot_rows_copy_kernel<<<dim3(grid_x, static_cast<unsigned>(shape_.kv_heads)), kCopyThreads, 0,
                         stream>>>(a.admitted, a.admitted_entry, a.admitted_slot, per_head,
                                   reinterpret_cast<const uint4*>(step.rows), step.tokens,
                                   step.device_tokens, row_chunks, slots_.as<uint4>());
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

Result<int64_t> HotRowsCuda::last_hits(int layer, cudaStream_t stream) const {
  if (slots_per_head_ == 0) return int64_t{0};
  PQKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<HeadState> states(static_cast<size_t>(shape_.kv_heads));
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(states.data(),
                                       state_.as<HeadState>() + int64_t{layer} * shape_.kv_heads,
                                       states.size() * sizeof(HeadState), cudaMemcpyDeviceToHost));
  int64_t hits = 0;
  for (const HeadState& s : states)
    hits += s.hits;
  return hits;
}

}  // namespace pqkv::tiering
