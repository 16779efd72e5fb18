#include "tools/faiss_export.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexPQ.h>
#include <faiss/IndexScalarQuantizer.h>
#include <faiss/impl/ProductQuantizer.h>

#include <cstring>

#include "index/cpu/key_codecs_cpu.h"

namespace pqkv::tools {
namespace {

Result<std::unique_ptr<faiss::Index>> pq_index(const index::IndexSnapshot::Stage& stage, int64_t n,
                                               int head_dim, int kv_head, const PqConfig& pq) {
  const index::PqShape shape = index::PqShape::from_config(head_dim, pq);
  PQKV_RETURN_IF_ERROR(shape.validate());
  index::cpu::PqCodecCpu codec(shape, static_cast<int>(stage.codes.size()));
  PQKV_RETURN_IF_ERROR(codec.read_state(stage.codec_state));
  auto out =
      std::make_unique<faiss::IndexPQ>(head_dim, shape.m, shape.bits, faiss::METRIC_INNER_PRODUCT);
  // Faiss's centroids are [M][ksub][dsub], one head's part of pqkv's
  // [kv_head][m][ksub][dsub].
  const index::LayerCodebook& book = codec.codebook();
  const float* centroids = book.head(kv_head);
  std::memcpy(out->pq.centroids.data(), centroids,
              sizeof(float) * static_cast<size_t>(book.floats_per_head()));
  out->is_trained = true;
  // pqkv keeps one byte per sub-space; Faiss packs nbits per sub-space,
  // least significant bit first, into code_size bytes.
  const uint8_t* codes = stage.codes[static_cast<size_t>(kv_head)].data();
  out->codes.assign(static_cast<size_t>(n) * out->code_size, 0);
  for (int64_t t = 0; t < n; ++t) {
    faiss::PQEncoderGeneric enc(out->codes.data() + t * out->code_size, shape.bits);
    for (int j = 0; j < shape.m; ++j)
      enc.encode(codes[t * shape.m + j]);
  }
  out->ntotal = n;
  return std::unique_ptr<faiss::Index>(std::move(out));
}

Result<std::unique_ptr<faiss::Index>> scalar_index(const index::IndexSnapshot::Stage& stage,
                                                   int64_t n, int head_dim, int kv_head) {
  const int bits = stage.code == KeyCode::kInt8 ? 8 : 4;
  index::cpu::ScalarCodecCpu codec(bits, head_dim, static_cast<int>(stage.codes.size()));
  PQKV_RETURN_IF_ERROR(codec.read_state(stage.codec_state));
  auto out = std::make_unique<faiss::IndexScalarQuantizer>(
      head_dim, bits == 8 ? faiss::ScalarQuantizer::QT_8bit : faiss::ScalarQuantizer::QT_4bit,
      faiss::METRIC_INNER_PRODUCT);
  // Faiss decodes a component as vmin + vdiff * (c + 0.5) / (2^bits - 1);
  // pqkv as offset + scale * c. vdiff = scale * (2^bits - 1) and
  // vmin = offset - scale / 2 make them the same value.
  const float levels = static_cast<float>((1 << bits) - 1);
  std::vector<float>& trained = out->sq.trained;
  trained.resize(2 * static_cast<size_t>(head_dim));
  for (int c = 0; c < head_dim; ++c) {
    const size_t i = static_cast<size_t>(kv_head) * head_dim + c;
    trained[c] = codec.offset()[i] - 0.5f * codec.scale()[i];
    trained[head_dim + c] = codec.scale()[i] * levels;
  }
  out->is_trained = true;
  const auto& codes = stage.codes[static_cast<size_t>(kv_head)];
  if (static_cast<int64_t>(out->code_size) != stage.code_size) {
    return Status::internal("Faiss's scalar code of " + std::to_string(out->code_size) +
                            " bytes differs from pqkv's " + std::to_string(stage.code_size));
  }
  out->codes.assign(codes.begin(), codes.begin() + n * stage.code_size);
  out->ntotal = n;
  return std::unique_ptr<faiss::Index>(std::move(out));
}

}  // namespace

Result<std::unique_ptr<faiss::Index>> faiss_index_of_codes(const index::IndexSnapshot::Stage& stage,
                                                           int64_t num_tokens, int head_dim,
                                                           int kv_head, const PqConfig& pq) {
  if (kv_head < 0 || kv_head >= static_cast<int>(stage.codes.size())) {
    return Status::invalid_argument("KV head " + std::to_string(kv_head) + " is not in [0, " +
                                    std::to_string(stage.codes.size()) + ")");
  }
  if (static_cast<int64_t>(stage.codes[static_cast<size_t>(kv_head)].size()) <
      num_tokens * stage.code_size) {
    return Status::corruption("the saved codes of KV head " + std::to_string(kv_head) +
                              " are shorter than " + std::to_string(num_tokens) + " tokens");
  }
  switch (stage.code) {
    case KeyCode::kPq:
      return pq_index(stage, num_tokens, head_dim, kv_head, pq);
    case KeyCode::kInt8:
    case KeyCode::kInt4:
      return scalar_index(stage, num_tokens, head_dim, kv_head);
    case KeyCode::kExact: {
      // The exact code is the key in fp32: IndexFlatIP's own layout.
      auto out = std::make_unique<faiss::IndexFlatIP>(head_dim);
      const auto& codes = stage.codes[static_cast<size_t>(kv_head)];
      out->codes.assign(codes.begin(), codes.begin() + num_tokens * stage.code_size);
      out->ntotal = num_tokens;
      return std::unique_ptr<faiss::Index>(std::move(out));
    }
  }
  return Status::corruption("an unknown key code");
}

std::string describe_faiss_index(const faiss::Index& index) {
  if (const auto* pq = dynamic_cast<const faiss::IndexPQ*>(&index)) {
    return "IndexPQ (d=" + std::to_string(pq->d) + ", M=" + std::to_string(pq->pq.M) +
           ", nbits=" + std::to_string(pq->pq.nbits) + ")";
  }
  if (const auto* sq = dynamic_cast<const faiss::IndexScalarQuantizer*>(&index)) {
    return std::string("IndexScalarQuantizer (d=") + std::to_string(sq->d) + ", " +
           (sq->sq.qtype == faiss::ScalarQuantizer::QT_8bit ? "QT_8bit" : "QT_4bit") + ")";
  }
  return "IndexFlatIP (d=" + std::to_string(index.d) + ")";
}

}  // namespace pqkv::tools
