#include "index/cpu/key_codecs_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "index/cpu/catch_status.h"
#include "index/cpu/kmeans_cpu.h"
#include "index/cpu/pq_search_cpu.h"
#include "index/key_range.h"

namespace pqkv::index {

Result<std::unique_ptr<KeyCodec>> make_key_codec(KeyCode code, int head_dim, int kv_heads,
                                                 const PqConfig& pq) {
  if (head_dim < 1 || kv_heads < 1) {
    return Status::invalid_argument("a key codec needs head_dim >= 1 and kv_heads >= 1, got " +
                                    std::to_string(head_dim) + " and " + std::to_string(kv_heads));
  }
  return cpu::catch_as_status("making a key codec", [&]() -> Result<std::unique_ptr<KeyCodec>> {
    switch (code) {
      case KeyCode::kPq: {
        PQKV_RETURN_IF_ERROR(pq.validate(head_dim));
        return std::unique_ptr<KeyCodec>(
            new cpu::PqCodecCpu(PqShape::from_config(head_dim, pq), kv_heads));
      }
      case KeyCode::kInt8:
        return std::unique_ptr<KeyCodec>(new cpu::ScalarCodecCpu(8, head_dim, kv_heads));
      case KeyCode::kInt4:
        if (head_dim % 2 != 0) {
          return Status::invalid_argument("int4 keys pack two channels a byte: head_dim " +
                                          std::to_string(head_dim) + " must be even");
        }
        return std::unique_ptr<KeyCodec>(new cpu::ScalarCodecCpu(4, head_dim, kv_heads));
      case KeyCode::kExact:
        return std::unique_ptr<KeyCodec>(new cpu::ExactCodecCpu(head_dim, kv_heads));
    }
    return Status::invalid_argument("unknown key code");
  });
}

namespace cpu {
namespace {

// Dot products sum channel c into lane c % kLanes, then the lanes in a fixed
// order: the same result on every CPU, and a loop the compiler vectorizes.
constexpr int kLanes = 8;

float sum_lanes(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float scalar_score(const float* table, const uint8_t* code, int head_dim, int bits) {
  float acc[kLanes] = {};
  int c = 0;
  if (bits == 8) {
    for (; c + kLanes <= head_dim; c += kLanes) {
      for (int l = 0; l < kLanes; ++l)
        acc[l] += table[c + l] * static_cast<float>(code[c + l]);
    }
  } else {
    for (; c + kLanes <= head_dim; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const uint8_t byte = code[(c + l) / 2];
        acc[l] += table[c + l] * static_cast<float>(l % 2 == 0 ? byte & 15 : byte >> 4);
      }
    }
  }
  float dot = sum_lanes(acc);
  for (; c < head_dim; ++c) {
    const uint8_t byte = bits == 8 ? code[c] : code[c / 2];
    const int v = bits == 8 ? byte : (c % 2 == 0 ? byte & 15 : byte >> 4);
    dot += table[c] * static_cast<float>(v);
  }
  return table[head_dim] + dot;
}

float exact_score(const float* query, const uint8_t* code, int head_dim) {
  // Keys are stored as bytes; copy them out rather than alias them as floats.
  float acc[kLanes] = {};
  float key[kLanes];
  int c = 0;
  for (; c + kLanes <= head_dim; c += kLanes) {
    std::memcpy(key, code + sizeof(float) * c, sizeof(key));
    for (int l = 0; l < kLanes; ++l)
      acc[l] += query[c + l] * key[l];
  }
  float dot = sum_lanes(acc);
  for (; c < head_dim; ++c) {
    float v = 0;
    std::memcpy(&v, code + sizeof(float) * c, sizeof(v));
    dot += query[c] * v;
  }
  return dot;
}

// The range scans, cloned for AVX2 (the lanes vectorize), picked at load time.
__attribute__((target_clones("avx2", "default"))) void scalar_scan(const float* table,
                                                                   const uint8_t* codes,
                                                                   int head_dim, int bits,
                                                                   int64_t begin, int64_t end,
                                                                   float* scores) {
  const int size = head_dim * bits / 8;
  for (int64_t t = begin; t < end; ++t)
    scores[t - begin] = scalar_score(table, codes + t * size, head_dim, bits);
}

__attribute__((target_clones("avx2", "default"))) void exact_scan(const float* query,
                                                                  const uint8_t* codes,
                                                                  int head_dim, int64_t begin,
                                                                  int64_t end, float* scores) {
  const int64_t size = int64_t{head_dim} * static_cast<int64_t>(sizeof(float));
  for (int64_t t = begin; t < end; ++t)
    scores[t - begin] = exact_score(query, codes + t * size, head_dim);
}

}  // namespace

// ---- PQ ----

namespace {

// InvalidArgument naming the first KV head whose keys PQ cannot fit in fp32
// (index/key_range.h).
Status check_pq_key_range(const HostKeys& keys, int kv_heads, int head_dim) {
  std::vector<float> row(static_cast<size_t>(head_dim));
  for (int h = 0; h < kv_heads; ++h) {
    float largest = 0.0f;
    for (int64_t t = 0; t < keys.n; ++t) {
      keys.gather(h, 0, head_dim, t, t + 1, row.data());
      for (float x : row)
        largest = std::max(largest, std::fabs(x));
    }
    if (largest > kPqLargestKey || (largest > 0.0f && largest < kPqSmallestKey)) {
      return pq_key_range_error(h, largest);
    }
  }
  return ok_status();
}

}  // namespace

Status PqCodecCpu::train(const HostKeys& keys, const PqConfig& pq) {
  PQKV_RETURN_IF_ERROR(check_pq_key_range(keys, kv_heads_, shape_.head_dim));
  PQKV_ASSIGN_OR_RETURN(LayerCodebook book, train_codebook(keys, shape_, pq));
  set_codebook(std::move(book));
  return ok_status();
}

void PqCodecCpu::set_codebook(LayerCodebook codebook) {
  codebook_ = std::move(codebook);
  encoder_ = std::make_unique<PqEncoder>(codebook_);
}

void PqCodecCpu::encode(const HostKeys& keys, int kv_head, uint8_t* codes) const {
  std::vector<float> key(static_cast<size_t>(shape_.head_dim));
  for (int64_t t = 0; t < keys.n; ++t) {
    keys.gather(kv_head, 0, shape_.head_dim, t, t + 1, key.data());
    encoder_->encode(kv_head, key.data(), codes + t * shape_.m);
  }
}

void PqCodecCpu::decode(int kv_head, const uint8_t* code, float* key) const {
  const int dsub = shape_.dsub();
  for (int j = 0; j < shape_.m; ++j) {
    const float* centroid = codebook_.sub(kv_head, j) + int64_t{code[j]} * dsub;
    std::copy_n(centroid, dsub, key + j * dsub);
  }
}

void PqCodecCpu::prepare(int kv_head, const float* query, std::vector<float>* table) const {
  table->resize(static_cast<size_t>(shape_.m) * shape_.ksub());
  const int dsub = shape_.dsub();
  for (int j = 0; j < shape_.m; ++j) {
    const float* centroids = codebook_.sub(kv_head, j);
    for (int c = 0; c < shape_.ksub(); ++c) {
      float dot = 0.0f;
      for (int d = 0; d < dsub; ++d)
        dot += query[j * dsub + d] * centroids[int64_t{c} * dsub + d];
      (*table)[static_cast<size_t>(j) * shape_.ksub() + c] = dot;
    }
  }
}

void PqCodecCpu::scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
                      float* scores) const {
  score_tokens(shape_, table, codes, begin, end, scores);
}

void PqCodecCpu::scan_positions(const float* table, const uint8_t* codes, const int32_t* positions,
                                int64_t count, float* scores) const {
  for (int64_t i = 0; i < count; ++i) {
    score_tokens(shape_, table, codes, positions[i], int64_t{positions[i]} + 1, scores + i);
  }
}

// ---- scalar ----

Status ScalarCodecCpu::train(const HostKeys& keys, const PqConfig& /*pq*/) {
  if (keys.n == 0) {
    return Status::invalid_argument("scalar quantization needs at least one key to fit its scales");
  }
  return catch_as_status("fitting scalar-quantization scales", [&]() -> Status {
    const int levels = (1 << bits_) - 1;
    std::vector<float> scale(static_cast<size_t>(kv_heads_) * head_dim_);
    std::vector<float> offset(scale.size());
    std::vector<float> row(static_cast<size_t>(head_dim_));
    for (int h = 0; h < kv_heads_; ++h) {
      std::vector<float> lo(static_cast<size_t>(head_dim_), std::numeric_limits<float>::max());
      std::vector<float> hi(static_cast<size_t>(head_dim_), std::numeric_limits<float>::lowest());
      for (int64_t t = 0; t < keys.n; ++t) {
        keys.gather(h, 0, head_dim_, t, t + 1, row.data());
        for (int c = 0; c < head_dim_; ++c) {
          lo[c] = std::min(lo[c], row[c]);
          hi[c] = std::max(hi[c], row[c]);
        }
      }
      for (int c = 0; c < head_dim_; ++c) {
        const float range = hi[c] - lo[c];
        if (!std::isfinite(range)) return scalar_key_range_error(bits_, h, c, lo[c], hi[c]);
        // A constant channel decodes exactly with any scale: keep 1.
        scale[static_cast<size_t>(h) * head_dim_ + c] = range > 0 ? range / levels : 1.0f;
        offset[static_cast<size_t>(h) * head_dim_ + c] = lo[c];
      }
    }
    scale_ = std::move(scale);
    offset_ = std::move(offset);
    return ok_status();
  });
}

void ScalarCodecCpu::encode(const HostKeys& keys, int kv_head, uint8_t* codes) const {
  const int levels = (1 << bits_) - 1;
  const float* scale = scale_.data() + static_cast<size_t>(kv_head) * head_dim_;
  const float* offset = offset_.data() + static_cast<size_t>(kv_head) * head_dim_;
  std::vector<float> row(static_cast<size_t>(head_dim_));
  const int size = code_size();
  for (int64_t t = 0; t < keys.n; ++t) {
    keys.gather(kv_head, 0, head_dim_, t, t + 1, row.data());
    uint8_t* code = codes + t * size;
    std::memset(code, 0, static_cast<size_t>(size));
    for (int c = 0; c < head_dim_; ++c) {
      const float q = std::nearbyint((row[c] - offset[c]) / scale[c]);
      const auto v = static_cast<uint8_t>(std::clamp(q, 0.0f, static_cast<float>(levels)));
      if (bits_ == 8) {
        code[c] = v;
      } else {
        code[c / 2] |= static_cast<uint8_t>(c % 2 == 0 ? v : v << 4);
      }
    }
  }
}

void ScalarCodecCpu::decode(int kv_head, const uint8_t* code, float* key) const {
  const float* scale = scale_.data() + static_cast<size_t>(kv_head) * head_dim_;
  const float* offset = offset_.data() + static_cast<size_t>(kv_head) * head_dim_;
  for (int c = 0; c < head_dim_; ++c) {
    const int v = bits_ == 8 ? code[c] : (c % 2 == 0 ? code[c / 2] & 15 : code[c / 2] >> 4);
    key[c] = offset[c] + scale[c] * static_cast<float>(v);
  }
}

void ScalarCodecCpu::prepare(int kv_head, const float* query, std::vector<float>* table) const {
  const float* scale = scale_.data() + static_cast<size_t>(kv_head) * head_dim_;
  const float* offset = offset_.data() + static_cast<size_t>(kv_head) * head_dim_;
  table->resize(static_cast<size_t>(head_dim_) + 1);
  float bias = 0.0f;
  for (int c = 0; c < head_dim_; ++c) {
    (*table)[c] = query[c] * scale[c];
    bias += query[c] * offset[c];
  }
  (*table)[head_dim_] = bias;
}

void ScalarCodecCpu::scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
                          float* scores) const {
  scalar_scan(table, codes, head_dim_, bits_, begin, end, scores);
}

void ScalarCodecCpu::scan_positions(const float* table, const uint8_t* codes,
                                    const int32_t* positions, int64_t count, float* scores) const {
  const int size = code_size();
  for (int64_t i = 0; i < count; ++i)
    scores[i] = scalar_score(table, codes + int64_t{positions[i]} * size, head_dim_, bits_);
}

// ---- exact ----

void ExactCodecCpu::encode(const HostKeys& keys, int kv_head, uint8_t* codes) const {
  std::vector<float> row(static_cast<size_t>(head_dim_));
  for (int64_t t = 0; t < keys.n; ++t) {
    keys.gather(kv_head, 0, head_dim_, t, t + 1, row.data());
    std::memcpy(codes + t * code_size(), row.data(), sizeof(float) * head_dim_);
  }
}

void ExactCodecCpu::decode(int /*kv_head*/, const uint8_t* code, float* key) const {
  std::memcpy(key, code, sizeof(float) * head_dim_);
}

void ExactCodecCpu::prepare(int /*kv_head*/, const float* query, std::vector<float>* table) const {
  table->assign(query, query + head_dim_);
}

void ExactCodecCpu::scan(const float* table, const uint8_t* codes, int64_t begin, int64_t end,
                         float* scores) const {
  exact_scan(table, codes, head_dim_, begin, end, scores);
}

void ExactCodecCpu::scan_positions(const float* table, const uint8_t* codes,
                                   const int32_t* positions, int64_t count, float* scores) const {
  for (int64_t i = 0; i < count; ++i)
    scores[i] = exact_score(table, codes + int64_t{positions[i]} * code_size(), head_dim_);
}

double squared_error(const KeyCodec& codec, const HostKeys& keys, int kv_head,
                     const uint8_t* codes) {
  const int d = codec.head_dim();
  std::vector<float> key(static_cast<size_t>(d));
  std::vector<float> decoded(static_cast<size_t>(d));
  double sum = 0;
  for (int64_t t = 0; t < keys.n; ++t) {
    keys.gather(kv_head, 0, d, t, t + 1, key.data());
    codec.decode(kv_head, codes + t * codec.code_size(), decoded.data());
    for (int c = 0; c < d; ++c) {
      const double e = static_cast<double>(key[c]) - decoded[c];
      sum += e * e;
    }
  }
  return sum;
}

}  // namespace cpu
}  // namespace pqkv::index
