#include "model/backend.h"

#include <string>

namespace pqkv::model {

Status check_pass(const LlamaConfig& config, std::span<const int32_t> tokens,
                  int64_t start_position, int64_t cached) {
  if (tokens.empty()) return Status::invalid_argument("a forward pass needs at least one token");
  for (int32_t id : tokens) {
    if (id < 0 || id >= config.vocab_size) {
      return Status::invalid_argument("token id " + std::to_string(id) +
                                      " is outside the vocabulary (0.." +
                                      std::to_string(config.vocab_size - 1) + ")");
    }
  }
  if (cached > 0 && start_position != cached) {
    return Status::failed_precondition("the pass starts at position " +
                                       std::to_string(start_position) + " but the KV cache holds " +
                                       std::to_string(cached) +
                                       " tokens; call reset() for a new sequence");
  }
  return ok_status();
}

Result<std::unique_ptr<ModelBackend>> make_backend(const LlamaModel& model, Device device) {
  if (device.is_cpu()) return make_cpu_backend(model);
  return make_cuda_backend(model, device);
}

#if !PQKV_HAVE_CUDA
Result<std::unique_ptr<ModelBackend>> make_cuda_backend(const LlamaModel& /*model*/,
                                                        Device /*device*/) {
  return Status::unavailable("pqkv was built without CUDA; use the cpu backend");
}
#endif

}  // namespace pqkv::model
