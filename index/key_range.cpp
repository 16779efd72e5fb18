#include "index/key_range.h"

#include <cstdio>
#include <string>

namespace pqkv::index {
namespace {

std::string short_float(float v) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", static_cast<double>(v));
  return text;
}

}  // namespace

Status pq_key_range_error(int kv_head, float largest) {
  return Status::invalid_argument(
      "PQ cannot fit the keys of KV head " + std::to_string(kv_head) +
      ": their largest magnitude " + short_float(largest) +
      " leaves fp32's range for squared distances (2^-50 to 2^60 works): scale the keys, or "
      "select with int4, int8 or oracle");
}

Status scalar_key_range_error(int bits, int kv_head, int channel, float lo, float hi) {
  return Status::invalid_argument(
      "int" + std::to_string(bits) + " keys cannot fit channel " + std::to_string(channel) +
      " of KV head " + std::to_string(kv_head) + ": it spans " + short_float(lo) + " to " +
      short_float(hi) + ", a range past fp32's: scale the keys, or select with oracle");
}

}  // namespace pqkv::index
