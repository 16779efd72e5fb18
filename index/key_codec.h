// A key codec of one layer, apart from the index that stores its codes (as
// Faiss separates ProductQuantizer from IndexFlatCodes): parameters per KV
// head (a PQ codebook, per-channel scales), one code of code_size() bytes per
// (token, KV head), and a scan that scores codes against a query.
//
// Scores approximate the inner product <query, key>; the index turns them into
// per-head softmax probabilities, aggregates each GQA group and takes the
// top-K (index/cpu/code_index_cpu.h).
//
// Codecs run on the host (they are the reference the CUDA kernels are
// compared with). All pointers are host memory. A trained codec is read-only
// and safe to use from many threads at once; train is not.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "index/cpu/host_keys.h"
#include "pqkv/options.h"
#include "pqkv/status.h"

namespace pqkv::index {

class KeyCodec {
 public:
  virtual ~KeyCodec() = default;

  virtual KeyCode code() const = 0;
  virtual int head_dim() const = 0;
  virtual int num_kv_heads() const = 0;
  // Bytes of one token's code for one KV head.
  virtual int code_size() const = 0;
  virtual bool trained() const = 0;

  // Fits the parameters of every KV head to keys [n, kv_heads, head_dim]
  // (n >= 1). `pq` gives k-means's iterations, sampling and seed; codecs other
  // than PQ ignore it. Returns InvalidArgument for no keys, ResourceExhausted
  // when memory runs out.
  virtual Status train(const cpu::HostKeys& keys, const PqConfig& pq) = 0;

  // Encodes tokens [0, keys.n) of `kv_head` into codes[t * code_size()].
  // Needs a trained codec.
  virtual void encode(const cpu::HostKeys& keys, int kv_head, uint8_t* codes) const = 0;

  // The key a code stands for: key[head_dim] = the decoded code of
  // `kv_head` (PQ: its centroids; scalar codes: offset + scale * level;
  // exact: the key). Quantization error is measured against it. Needs a
  // trained codec.
  virtual void decode(int kv_head, const uint8_t* code, float* key) const = 0;

  // The per-query table a scan reads (PQ: the LUT; scalar codes: the query
  // scaled per channel and its offset term; exact: the query), for one query
  // of head_dim floats against `kv_head`'s parameters.
  virtual void prepare(int kv_head, const float* query, std::vector<float>* table) const = 0;

  // scores[i] = score of token begin + i, for tokens [begin, end) of a table of
  // codes [token][code_size()] starting at token 0.
  virtual void scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
                    float* scores) const = 0;
  // scores[i] = score of token positions[i].
  virtual void scan_positions(const float* table, const uint8_t* codes, const int32_t* positions,
                              int64_t count, float* scores) const = 0;

  // The trained parameters of every KV head (PQ: codebooks; scalar codes:
  // scales and offsets), appended to `out` in the codec's own versioned
  // encoding (docs/formats.md), so a saved index is restored without
  // training. FailedPrecondition before training.
  virtual Status write_state(std::string* out) const = 0;
  // Installs parameters written by write_state of a codec of the same code
  // and shape. Corruption when `state` is not one (wrong version, shape or
  // size); the codec is then as before.
  virtual Status read_state(std::string_view state) = 0;
  // Corruption when one of the `n` codes at `codes` cannot come from this
  // codec, so that codes read back from disk never index past a table (a PQ
  // code byte of ksub or more). Every byte is a valid scalar or exact code.
  virtual Status check_codes(const uint8_t* /*codes*/, int64_t /*n*/) const { return ok_status(); }
};

// An untrained codec of `code` for keys of `kv_heads` heads of `head_dim`;
// `pq` gives PQ's shape (m, bits). InvalidArgument when they do not fit.
Result<std::unique_ptr<KeyCodec>> make_key_codec(KeyCode code, int head_dim, int kv_heads,
                                                 const PqConfig& pq);

}  // namespace pqkv::index
