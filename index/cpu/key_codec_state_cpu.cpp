// Each host codec's saved parameters (KeyCodec::write_state / read_state).
// Encodings, little-endian, each led by a u32 version (docs/formats.md):
//   PQ:     version, head_dim, m, bits, kv_heads (i32), centroids (f32 blob)
//   scalar: version, bits, head_dim, kv_heads (i32), scale, offset (f32 blobs)
//   exact:  version, head_dim, kv_heads (i32)
#include <string>
#include <string_view>

#include "core/byte_io.h"
#include "index/cpu/key_codecs_cpu.h"

namespace pqkv::index::cpu {
namespace {

constexpr uint32_t kStateVersion = 1;

Status bad_state(const char* codec, const std::string& why) {
  return Status::corruption(std::string("saved ") + codec + " codec state: " + why);
}

// Reads the version and the i32 shape fields and checks them against `expect`.
Status read_header(ByteReader& in, const char* codec, std::initializer_list<int32_t> expect) {
  uint32_t version = 0;
  if (!in.get(&version)) return bad_state(codec, "truncated");
  if (version != kStateVersion) {
    return bad_state(codec, "version " + std::to_string(version) + " is not the supported " +
                                std::to_string(kStateVersion));
  }
  for (int32_t want : expect) {
    int32_t got = 0;
    if (!in.get(&got)) return bad_state(codec, "truncated");
    if (got != want) {
      return bad_state(codec, "shape field " + std::to_string(got) + " where this index has " +
                                  std::to_string(want));
    }
  }
  return ok_status();
}

}  // namespace

Status PqCodecCpu::write_state(std::string* out) const {
  if (!trained()) return Status::failed_precondition("a PQ codec has no state before training");
  ByteWriter w(out);
  w.put(kStateVersion);
  for (int32_t v : {shape_.head_dim, shape_.m, shape_.bits, kv_heads_})
    w.put(v);
  w.put_vector(codebook_.centroids);
  return ok_status();
}

Status PqCodecCpu::read_state(std::string_view state) {
  ByteReader in(state);
  PQKV_RETURN_IF_ERROR(read_header(in, "PQ", {shape_.head_dim, shape_.m, shape_.bits, kv_heads_}));
  LayerCodebook book;
  book.shape = shape_;
  book.num_kv_heads = kv_heads_;
  if (!in.get_vector(&book.centroids) || !in.done())
    return bad_state("PQ", "truncated or too long");
  if (!book.check_fits(shape_, kv_heads_).ok()) {
    return bad_state("PQ", "centroids do not fit the shape " + std::to_string(shape_.m) +
                               " sub-spaces x " + std::to_string(shape_.ksub()));
  }
  book.objective.assign(static_cast<size_t>(kv_heads_) * shape_.m, 0.0);
  set_codebook(std::move(book));
  return ok_status();
}

Status PqCodecCpu::check_codes(const uint8_t* codes, int64_t n) const {
  const int ksub = shape_.ksub();
  if (ksub >= 256) return ok_status();
  const int64_t bytes = n * shape_.m;
  for (int64_t i = 0; i < bytes; ++i) {
    if (codes[i] >= ksub) {
      return bad_state("PQ", "code byte " + std::to_string(codes[i]) + " of token " +
                                 std::to_string(i / shape_.m) + " is not a centroid of " +
                                 std::to_string(ksub));
    }
  }
  return ok_status();
}

Status ScalarCodecCpu::write_state(std::string* out) const {
  if (!trained()) return Status::failed_precondition("a scalar codec has no state before training");
  ByteWriter w(out);
  w.put(kStateVersion);
  for (int32_t v : {bits_, head_dim_, kv_heads_})
    w.put(v);
  w.put_vector(scale_);
  w.put_vector(offset_);
  return ok_status();
}

Status ScalarCodecCpu::read_state(std::string_view state) {
  ByteReader in(state);
  PQKV_RETURN_IF_ERROR(read_header(in, "scalar", {bits_, head_dim_, kv_heads_}));
  std::vector<float> scale;
  std::vector<float> offset;
  if (!in.get_vector(&scale) || !in.get_vector(&offset) || !in.done()) {
    return bad_state("scalar", "truncated or too long");
  }
  const size_t expect = static_cast<size_t>(kv_heads_) * head_dim_;
  if (scale.size() != expect || offset.size() != expect) {
    return bad_state("scalar", "scales of " + std::to_string(scale.size()) + " channels, not " +
                                   std::to_string(expect));
  }
  scale_ = std::move(scale);
  offset_ = std::move(offset);
  return ok_status();
}

Status ExactCodecCpu::write_state(std::string* out) const {
  ByteWriter w(out);
  w.put(kStateVersion);
  for (int32_t v : {head_dim_, kv_heads_})
    w.put(v);
  return ok_status();
}

Status ExactCodecCpu::read_state(std::string_view state) {
  ByteReader in(state);
  PQKV_RETURN_IF_ERROR(read_header(in, "exact", {head_dim_, kv_heads_}));
  if (!in.done()) return bad_state("exact", "too long");
  return ok_status();
}

}  // namespace pqkv::index::cpu
