// A saved (layer, KV head)'s codes as a Faiss index whose reconstruction is
// pqkv's decode of the same codes, so that Faiss's inner-product search
// scores each token as pqkv's scan does: `pqkv export-faiss`.
//
//   PQ codes     -> faiss::IndexPQ (M = m sub-spaces, nbits = bits), the
//                   head's codebook as its centroids; codes re-packed into
//                   Faiss's bit stream when bits < 8.
//   int8 / int4  -> faiss::IndexScalarQuantizer, QT_8bit / QT_4bit (a range
//                   per channel), trained so that vmin + vdiff * (c + 0.5) /
//                   (2^bits - 1) = offset + scale * c; codes copied as they
//                   are (both put channel 2i in the low nibble of byte i).
//   exact keys   -> faiss::IndexFlatIP over the fp32 keys.
#pragma once

#include <faiss/Index.h>

#include <memory>
#include <string>

#include "index/layer_index.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::tools {

// The Faiss index (inner product) of `kv_head`'s codes in `stage`, a stage
// of a snapshot of `num_tokens` tokens saved with PQ settings `pq` at
// `head_dim`. Corruption when the stage's codec state does not decode.
Result<std::unique_ptr<faiss::Index>> faiss_index_of_codes(const index::IndexSnapshot::Stage& stage,
                                                           int64_t num_tokens, int head_dim,
                                                           int kv_head, const PqConfig& pq);

// "IndexPQ (M=16, nbits=8)" and the like, for messages.
std::string describe_faiss_index(const faiss::Index& index);

}  // namespace pqkv::tools
