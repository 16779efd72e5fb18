// Exact attention of one decode step over compact rows in device memory
// (flash-decoding): the rows of each KV head are cut into splits, one warp per
// (split, KV head, tile of up to kQueryHeadsPerTile query heads) runs an
// online softmax in fp32 and writes a partial result, and a second kernel
// combines the splits. All query heads of a GQA group share one pass over
// their KV head's rows.
//
// Used two ways:
// - sparse decode attention: over the rows launch_gather_rows packed for the
//   step's chosen tokens, [kv_heads, tokens, row];
// - exact full attention: over every token of a layer whose rows are resident
//   in device memory (launch_full_attention).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attention/cuda/launch_config.h"
#include "attention/output_report.h"
#include "pqkv/model_spec.h"
#include "pqkv/status.h"

namespace pqkv::attention::cuda {

struct DecodeAttentionArgs {
  DecodeAttentionShape shape;
  const void* rows = nullptr;     // device: [kv_heads, shape.stride(), row_bytes], 16-byte aligned
  const void* queries = nullptr;  // device: [q_heads, head_dim] in query_dtype, 16-byte aligned
  void* out = nullptr;            // device: [q_heads, head_dim] in out_dtype, 16-byte aligned
  // Device memory of at least decode_attention_workspace_bytes(shape) bytes,
  // used only by this launch until its kernels finish on the stream.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // When set (device memory), the rows attended per KV head are read from it
  // when the kernels run (0 gives zeros) and shape.tokens is the most it will
  // hold: the launch and the workspace are sized for that, and the rows are
  // dense, [kv_heads, *device_tokens, row] (shape.head_stride must be 0).
  // The splits are those of the device count, so the output is the same as a
  // launch with shape.tokens equal to it.
  const int64_t* device_tokens = nullptr;
  // When set (device-writable: pinned host memory mapped into the device),
  // the combine kernel records there the first output element that is NaN or
  // Inf, with report_layer as its layer; found is never cleared here.
  OutputReport* report = nullptr;
  int report_layer = 0;
};

// Enqueues the split kernel and the combine kernel on `stream`. No allocation
// and no host synchronisation: capturable in a CUDA graph.
Status launch_decode_attention(const DecodeAttentionArgs& args, cudaStream_t stream);

// Exact attention over the first `context` tokens of every KV head of a layer
// held in device memory as [kv_heads, capacity, row] (capacity >= context):
// the baseline sparse attention is measured against, and a GPU reference.
struct FullAttentionArgs {
  ModelSpec spec;                    // heads, head_dim and row dtype of the layer
  const void* layer_rows = nullptr;  // device: [kv_heads, capacity, row_bytes]
  int64_t capacity = 0;              // rows reserved per KV head
  int64_t context = 0;               // rows attended per KV head
  DType query_dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  const void* queries = nullptr;  // device: [q_heads, head_dim]
  void* out = nullptr;            // device: [q_heads, head_dim]
  void* workspace = nullptr;      // device: decode_attention_workspace_bytes(shape()) bytes
  size_t workspace_bytes = 0;
  OutputReport* report = nullptr;  // as DecodeAttentionArgs::report
  int report_layer = 0;

  // The attention shape this corresponds to (size the workspace from it).
  DecodeAttentionShape shape() const;
};

Status launch_full_attention(const FullAttentionArgs& args, cudaStream_t stream);

}  // namespace pqkv::attention::cuda
