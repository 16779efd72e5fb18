#include "engine/sequence_state.h"

#include "engine/cpu/sequence_state_cpu.h"
#if PQKV_HAVE_CUDA
#include "engine/cuda/sequence_state_cuda.h"
#endif

namespace pqkv::engine {

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
