// Rows that stay in device memory for the whole generation: the sink (the
// first tokens) and the recent window of each (layer, KV head). They are the
// same rows step after step, so a CUDA store keeps them in HBM, written by
// append, and never gathers them over PCIe.
//
// Layout of one layer: [kv_heads][sink_slots + window_slots] rows of
// row_bytes (the row store's row: K[head_dim] then V[head_dim]). Token t <
// sink_slots sits in slot t; a later token sits in the ring of window slots,
// slot sink_slots + t % window_slots, so the window slides in place: at a
// context of `length` tokens the ring holds [length - window_slots, length).
#pragma once

#include <cstddef>
#include <cstdint>

#include "storage/row_table.h"

namespace pqkv::tiering {

// How many rows of each KV head are resident; both 0 when nothing is.
struct ResidentShape {
  int64_t sink_slots = 0;    // tokens [0, sink_slots)
  int64_t window_slots = 0;  // the last window_slots tokens past the sink

  bool empty() const { return sink_slots == 0 && window_slots == 0; }
  // True when `token` (< length) is resident at a context of `length` tokens.
  PQKV_HOST_DEVICE bool holds(int64_t token, int64_t length) const {
    return token < sink_slots || (window_slots > 0 && token >= length - window_slots);
  }
};

// A view of one layer's resident rows; the rows live in device memory
// (tiering/cuda/resident_rows_cuda.h owns them). A default view holds nothing.
struct ResidentRowsView {
  std::byte* rows = nullptr;  // device: [kv_heads][sink_slots + window_slots][row_bytes]
  ResidentShape shape;
  int kv_heads = 0;
  int64_t row_bytes = 0;

  PQKV_HOST_DEVICE int64_t slots_per_head() const { return shape.sink_slots + shape.window_slots; }
  // The slot of a resident `token`.
  PQKV_HOST_DEVICE int64_t slot(int64_t token) const {
    return token < shape.sink_slots ? token : shape.sink_slots + token % shape.window_slots;
  }
  // The resident row of (head, token); `token` must be held (shape.holds).
  PQKV_HOST_DEVICE std::byte* row(int head, int64_t token) const {
    return rows + (head * slots_per_head() + slot(token)) * row_bytes;
  }
  // Device bytes of a layer of this shape.
  static int64_t bytes(int kv_heads, int64_t row_bytes, const ResidentShape& shape) {
    return int64_t{kv_heads} * (shape.sink_slots + shape.window_slots) * row_bytes;
  }
};

}  // namespace pqkv::tiering
