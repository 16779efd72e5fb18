#include "engine/sequence_state.h"

#include "engine/cpu/sequence_state_cpu.h"
#include "tiering/block_cache.h"
#if PQKV_HAVE_CUDA
#include "engine/cuda/sequence_state_cuda.h"
#endif

namespace pqkv::engine {

tiering::BlockCacheOptions block_cache_for(const SequenceStateConfig& config, int64_t max_tokens) {
  tiering::BlockCacheOptions o = config.block_cache;
  o.num_slots = 0;
  if (config.cache_budget == nullptr) return o;
  const int64_t block_bytes = o.tokens_per_block * config.spec.row_bytes();
  o.num_slots = tiering::block_cache_slots(
      config.cache_budget->limit() - config.cache_budget->used(), block_bytes,
      config.spec.num_layers, config.spec.num_kv_heads, max_tokens, o.tokens_per_block);
  return o;
}

Result<std::unique_ptr<SequenceState>> make_sequence_state(const SequenceStateConfig& config) {
  if (config.device.is_cpu()) {
    return std::unique_ptr<SequenceState>(std::make_unique<SequenceStateCpu>(config));
  }
#if PQKV_HAVE_CUDA
  PQKV_ASSIGN_OR_RETURN(auto state, SequenceStateCuda::create(config));
  return std::unique_ptr<SequenceState>(std::move(state));
#else
  return Status::unavailable("pqkv was built without CUDA; open the store with device cpu");
#endif
}

}  // namespace pqkv::engine
