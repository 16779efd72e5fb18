// The key codecs (index/key_codec.h) on the host: PQ, scalar-quantized keys
// (int8, int4) and the exact keys.
//
// Scalar quantization, per (KV head, channel c): offset[c] = the smallest
// training value, scale[c] = (largest - smallest) / (2^bits - 1);
// code[c] = clamp(round((x[c] - offset[c]) / scale[c]), 0, 2^bits - 1), so a
// key decodes to offset + scale * code. int4 packs channel 2i in the low
// nibble and 2i + 1 in the high nibble of byte i. A query's table is
// [head_dim] q[c] * scale[c] followed by one float, the sum of q[c] * offset[c];
// a token's score is that sum plus the table dotted with its codes. Dot
// products (scalar and exact codes) sum channel c into lane c % 8, then the
// eight lanes in a fixed order.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "index/cpu/pq_encode_cpu.h"
#include "index/key_codec.h"
#include "index/pq_codebook.h"

namespace pqkv::index::cpu {

class PqCodecCpu final : public KeyCodec {
 public:
  PqCodecCpu(const PqShape& shape, int kv_heads) : shape_(shape), kv_heads_(kv_heads) {}

  KeyCode code() const override { return KeyCode::kPq; }
  int head_dim() const override { return shape_.head_dim; }
  int num_kv_heads() const override { return kv_heads_; }
  int code_size() const override { return shape_.m; }
  bool trained() const override { return !codebook_.centroids.empty(); }
  Status train(const HostKeys& keys, const PqConfig& pq) override;
  void encode(const HostKeys& keys, int kv_head, uint8_t* codes) const override;
  void decode(int kv_head, const uint8_t* code, float* key) const override;
  void prepare(int kv_head, const float* query, std::vector<float>* table) const override;
  void scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
            float* scores) const override;
  void scan_positions(const float* table, const uint8_t* codes, const int32_t* positions,
                      int64_t count, float* scores) const override;
  Status write_state(std::string* out) const override;
  Status read_state(std::string_view state) override;
  Status check_codes(const uint8_t* codes, int64_t n) const override;

  const PqShape& shape() const { return shape_; }
  // The trained codebook (empty centroids before training).
  const LayerCodebook& codebook() const { return codebook_; }
  // Installs a codebook that fits (check_fits first).
  void set_codebook(LayerCodebook codebook);

 private:
  PqShape shape_;
  int kv_heads_;
  LayerCodebook codebook_;
  std::unique_ptr<PqEncoder> encoder_;  // made from codebook_
};

class ScalarCodecCpu final : public KeyCodec {
 public:
  // bits: 8 or 4; head_dim even for 4.
  ScalarCodecCpu(int bits, int head_dim, int kv_heads)
      : bits_(bits), head_dim_(head_dim), kv_heads_(kv_heads) {}

  KeyCode code() const override { return bits_ == 8 ? KeyCode::kInt8 : KeyCode::kInt4; }
  int head_dim() const override { return head_dim_; }
  int num_kv_heads() const override { return kv_heads_; }
  int code_size() const override { return head_dim_ * bits_ / 8; }
  bool trained() const override { return !scale_.empty(); }
  Status train(const HostKeys& keys, const PqConfig& pq) override;
  void encode(const HostKeys& keys, int kv_head, uint8_t* codes) const override;
  void decode(int kv_head, const uint8_t* code, float* key) const override;
  void prepare(int kv_head, const float* query, std::vector<float>* table) const override;
  void scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
            float* scores) const override;
  void scan_positions(const float* table, const uint8_t* codes, const int32_t* positions,
                      int64_t count, float* scores) const override;
  Status write_state(std::string* out) const override;
  Status read_state(std::string_view state) override;

  int bits() const { return bits_; }
  // [kv_head][head_dim] each, after training.
  const std::vector<float>& scale() const { return scale_; }
  const std::vector<float>& offset() const { return offset_; }
  // Installs scales fitted elsewhere (the CUDA index's), [kv_head][head_dim]
  // each; the caller checks their size.
  void set_scales(std::vector<float> scale, std::vector<float> offset) {
    scale_ = std::move(scale);
    offset_ = std::move(offset);
  }

 private:
  int bits_;
  int head_dim_;
  int kv_heads_;
  std::vector<float> scale_;
  std::vector<float> offset_;
};

class ExactCodecCpu final : public KeyCodec {
 public:
  ExactCodecCpu(int head_dim, int kv_heads) : head_dim_(head_dim), kv_heads_(kv_heads) {}

  KeyCode code() const override { return KeyCode::kExact; }
  int head_dim() const override { return head_dim_; }
  int num_kv_heads() const override { return kv_heads_; }
  int code_size() const override { return head_dim_ * static_cast<int>(sizeof(float)); }
  bool trained() const override { return true; }
  Status train(const HostKeys& /*keys*/, const PqConfig& /*pq*/) override { return ok_status(); }
  void encode(const HostKeys& keys, int kv_head, uint8_t* codes) const override;
  void decode(int kv_head, const uint8_t* code, float* key) const override;
  void prepare(int kv_head, const float* query, std::vector<float>* table) const override;
  void scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
            float* scores) const override;
  void scan_positions(const float* table, const uint8_t* codes, const int32_t* positions,
                      int64_t count, float* scores) const override;
  Status write_state(std::string* out) const override;
  Status read_state(std::string_view state) override;

 private:
  int head_dim_;
  int kv_heads_;
};

// The summed squared quantization error of `kv_head`'s keys [0, keys.n):
// sum over tokens of ||key - codec.decode(code)||^2, codes [token][code_size]
// as codec.encode wrote them. In double.
double squared_error(const KeyCodec& codec, const HostKeys& keys, int kv_head,
                     const uint8_t* codes);

}  // namespace pqkv::index::cpu
