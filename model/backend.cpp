#include "model/backend.h"

namespace pqkv::model {

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
