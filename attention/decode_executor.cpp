#include "attention/decode_executor.h"

#include "attention/cpu/decode_executor_cpu.h"

namespace pqkv::attention {

Result<std::unique_ptr<DecodeExecutor>> make_decode_executor(const ExecutorConfig& config) {
  if (config.device.is_cpu()) {
    return std::unique_ptr<DecodeExecutor>(std::make_unique<DecodeExecutorCpu>(config));
  }
  return Status::unimplemented("the CUDA decode path is not part of this build's engine yet; "
                               "open the store with device cpu");
}

}  // namespace pqkv::attention
