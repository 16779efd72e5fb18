// The row gather of a decode step: copies the rows a step attends to from
// the row store's blocks (mapped pinned host memory read over PCIe, or device
// memory), addressed through a storage::RowTableView, into one compact device buffer [kv_heads,
// tokens, row] that the attention kernel reads. One launch per layer; no host work per row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/cuda/launch_config.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

// Enqueues the gather described by `args` (see GatherRowsArgs) on `stream`.
// No allocation and no host synchronisation: it can be captured in a graph.
Status launch_gather_rows(const GatherRowsArgs& args, cudaStream_t stream);

}  // namespace pqkv::attention::cuda
