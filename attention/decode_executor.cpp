#include "attention/decode_executor.h"

#include "attention/cpu/decode_executor_cpu.h"
#if PQKV_HAVE_CUDA
#include "attention/cuda/decode_executor_cuda.h"
#endif

namespace pqkv::attention {

Result<std::unique_ptr<DecodeExecutor>> make_decode_executor(const ExecutorConfig& config) {
  if (config.device.is_cpu()) {
    return std::unique_ptr<DecodeExecutor>(std::make_unique<DecodeExecutorCpu>(config));
  }
#if PQKV_HAVE_CUDA
  PQKV_ASSIGN_OR_RETURN(auto executor, cuda::DecodeExecutorCuda::create(config));
  return std::unique_ptr<DecodeExecutor>(std::move(executor));
#else
  return Status::unavailable("pqkv was built without CUDA; open the store with device cpu");
#endif
}

}  // namespace pqkv::attention
