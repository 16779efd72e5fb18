#include "index/layer_index.h"

#include "index/cpu/layer_index_cpu.h"

namespace pqkv::index {

Result<std::unique_ptr<LayerIndex>> make_layer_index(const Device& device, const PqShape& shape,
                                                     int kv_heads) {
  if (device.is_cuda()) {
    return Status::unimplemented("the CUDA index is not built in this version");
  }
  PQKV_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndexCpu> index,
                        LayerIndexCpu::create(shape, kv_heads));
  return std::unique_ptr<LayerIndex>(std::move(index));
}

}  // namespace pqkv::index
