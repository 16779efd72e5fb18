// Fuzzes short sequences of C ABI calls on a small cpu store: options with
// odd ratios and counts, appends of any token count (negative too), any dtype
// code and NaN/Inf/huge values, prefill and attention in any order. Every call
// must return a status; a refused append must leave the length unchanged, an
// accepted one must add exactly its tokens, and attention over accepted
// (finite) keys must give finite outputs. A made-up handle and the dropped
// sequence's handle must be refused.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fuzz_util.h"
#include "pqkv/pqkv.h"

namespace {

constexpr int kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 32;

class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t next() { return pos_ < size_ ? data_[pos_++] : 0; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

pqkv_store* store_for(pqkv_dtype dtype) {
  static pqkv_store* stores[3] = {};
  if (stores[dtype] == nullptr) {
    pqkv_model_spec spec{kLayers, kQHeads, kKvHeads, kDim, dtype};
    pqkv_store_options o;
    pqkv_store_options_init(&o, &spec);
    o.num_threads = 1;
    if (pqkv_store_open(&o, &stores[dtype]) != PQKV_OK) pqkv::fuzz::fail(pqkv_last_error());
  }
  return stores[dtype];
}

double pick_ratio(uint8_t b) {
  static const double kRatios[] = {0.0,
                                   0.01,
                                   0.05,
                                   0.5,
                                   1.0,
                                   -0.1,
                                   1.5,
                                   std::numeric_limits<double>::quiet_NaN(),
                                   std::numeric_limits<double>::infinity(),
                                   1e-300};
  return kRatios[b % (sizeof(kRatios) / sizeof(kRatios[0]))];
}

float pick_value(uint8_t b, uint32_t* state) {
  *state = *state * 1664525u + 1013904223u;
  switch (b % 16) {
    case 0:
      return std::numeric_limits<float>::quiet_NaN();
    case 1:
      return std::numeric_limits<float>::infinity();
    case 2:
      return 65504.0f;
    case 3:
      return 1e5f;
    case 4:
      return -65520.0f;
    default:
      return static_cast<float>(static_cast<int32_t>(*state >> 8) % 2000) / 500.0f;
  }
}

// Fills n elements of `dtype` (which may be an invalid code: then fp32-sized).
std::vector<uint8_t> make_tensor(int64_t n, int dtype, Bytes& in) {
  const int size = dtype == PQKV_F32 || dtype > 2 ? 4 : 2;
  std::vector<uint8_t> buf(static_cast<size_t>(n) * size);
  const uint8_t special = in.next();
  uint32_t state = in.next();
  for (int64_t i = 0; i < n; ++i) {
    // Most elements ordinary; `special` picks how often an odd value appears.
    const float v = pick_value((i * 7 + special) % 61 == 0 ? special : 5, &state);
    if (size == 4) {
      std::memcpy(&buf[i * 4], &v, 4);
    } else {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      const uint16_t h = static_cast<uint16_t>(u >> 16);  // bf16 bits; odd as fp16 too
      std::memcpy(&buf[i * 2], &h, 2);
    }
  }
  return buf;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  pqkv_store* store = store_for(static_cast<pqkv_dtype>(in.next() % 3));

  pqkv_sequence_options o;
  pqkv_sequence_options_init(&o);
  static const int kMs[] = {0, 1, 2, 4, 8, 16, 32, -1, 3};
  o.pq_m = kMs[in.next() % 9];
  o.pq_bits = in.next() % 10;
  o.kmeans_iters = in.next() % 4;
  o.sink.tokens = static_cast<int8_t>(in.next());
  o.sink.ratio = pick_ratio(in.next());
  o.window.ratio = pick_ratio(in.next());
  o.top_k.tokens = static_cast<int8_t>(in.next());
  o.top_k.ratio = pick_ratio(in.next());
  o.fixed_at_prefill = in.next() & 1;
  // Any int, stored as a C caller would (a C++ cast to an out-of-range enum is undefined).
  const int aggregation = in.next() % 3;
  std::memcpy(&o.aggregation, &aggregation, sizeof aggregation);
  pqkv_sequence* seq = nullptr;
  if (pqkv_sequence_create(store, "f", &o, &seq) != PQKV_OK) {
    if (seq != nullptr) pqkv::fuzz::fail("a refused create returned a sequence");
    return 0;
  }

  for (int step = 0; step < 24 && !in.empty(); ++step) {
    const uint8_t op = in.next() % 6;
    int layer = in.next() % 3;           // 2 is out of range
    if (in.next() % 8 == 0) layer -= 2;  // and so are negative layers
    const int dtype = in.next() % 4;
    if (op == 0 || op == 5) {
      int64_t n = static_cast<int8_t>(in.next());
      if (n > 40) n = 40;
      const int64_t before = pqkv_sequence_length(seq, layer);
      const int64_t elems = n > 0 ? n * kKvHeads * kDim : 0;
      std::vector<uint8_t> k = make_tensor(elems, dtype, in);
      std::vector<uint8_t> v = make_tensor(elems, dtype, in);
      const pqkv_status s = op == 5 ? pqkv_sequence_append(seq, layer, nullptr, nullptr, n,
                                                           static_cast<pqkv_dtype>(dtype), nullptr)
                                    : pqkv_sequence_append(seq, layer, k.data(), v.data(), n,
                                                           static_cast<pqkv_dtype>(dtype), nullptr);
      const int64_t after = pqkv_sequence_length(seq, layer);
      if (s != PQKV_OK && after != before) pqkv::fuzz::fail("a refused append changed the length");
      if (s == PQKV_OK && after != before + n) pqkv::fuzz::fail("an append added the wrong count");
      if (s == PQKV_OK && n < 0) pqkv::fuzz::fail("a negative append was accepted");
    } else if (op == 1) {
      static_cast<void>(pqkv_sequence_finish_prefill(seq));
    } else {
      std::vector<float> q(kQHeads * kDim), out(kQHeads * kDim);
      uint32_t state = in.next();
      for (float& x : q)
        x = pick_value(5, &state);
      const pqkv_status s =
          op == 2 ? pqkv_sequence_attend(seq, layer, q.data(), out.data(), PQKV_F32, nullptr)
          : op == 3
              ? pqkv_sequence_attend_exact(seq, layer, q.data(), out.data(), PQKV_F32, nullptr)
              : pqkv_sequence_attend(seq, layer, q.data(), out.data(),
                                     static_cast<pqkv_dtype>(dtype), nullptr);
      if (s == PQKV_OK && op != 4) {
        for (float x : out) {
          if (!std::isfinite(x)) pqkv::fuzz::fail("attention output is not finite");
        }
      }
    }
    if (pqkv_last_error() == nullptr) pqkv::fuzz::fail("pqkv_last_error returned NULL");
  }
  // A handle made of input bytes is refused unless it is the live one; after
  // the drop the live one is refused too, and nothing is read through either.
  uint64_t bits = 0;
  for (int i = 0; i < 8; ++i)
    bits = bits << 8 | in.next();
  auto* made_up = reinterpret_cast<pqkv_sequence*>(static_cast<uintptr_t>(bits));
  if (made_up != seq && pqkv_sequence_length(made_up, 0) != -1) {
    pqkv::fuzz::fail("a made-up sequence handle was accepted");
  }
  if (pqkv_sequence_drop(store, "f") != PQKV_OK) pqkv::fuzz::fail(pqkv_last_error());
  if (pqkv_sequence_length(seq, 0) != -1 || pqkv_last_error_code() != PQKV_INVALID_ARGUMENT ||
      pqkv_sequence_finish_prefill(seq) != PQKV_INVALID_ARGUMENT) {
    pqkv::fuzz::fail("a dropped sequence handle was accepted");
  }
  return 0;
}
