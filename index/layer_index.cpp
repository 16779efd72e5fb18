#include "index/layer_index.h"

#include "index/cpu/layer_index_cpu.h"
#if PQKV_HAVE_CUDA
#include "index/cuda/layer_index_cuda.h"
#endif

namespace pqkv::index {

Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, const PqShape& shape,
                                                     int kv_heads) {
  if (device.is_cuda()) {
#if PQKV_HAVE_CUDA
    PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCuda> index,
                          LayerIndexCuda::create(device, shape, kv_heads));
    return std::unique_ptr<LayerIndex>(std::move(index));
#else
    return Status::unavailable("pqkv was built without CUDA; rebuild with nvcc present or use cpu");
#endif
  }
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCpu> index,
                        LayerIndexCpu::create(shape, kv_heads));
  return std::unique_ptr<LayerIndex>(std::move(index));
}

}  // namespace pqkv::index
