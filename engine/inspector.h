// Read access to a sequence's internals for pqkv's own tools (pqkv bench,
// inspect, export) and the engine's code: what Sequence's public API does
// not show. Not installed; not a stable API.
//
// Thread-safety: as Sequence's own const methods; the pointers returned stay
// valid until the sequence's next non-const call.
#pragma once

#include <cstdint>

#include "engine/sequence_impl.h"
#include "index/layer_index.h"
#include "pqkv/sequence.h"

namespace pqkv::engine {

class Inspector {
 public:
  // The index of `layer`; null before finish_prefill trained it or for a
  // layer out of range.
  static const index::LayerIndex* layer_index(const Sequence& seq, int layer) {
    if (layer < 0 || layer >= seq.spec().num_layers) return nullptr;
    return seq.impl_->layer_index(layer);
  }
  // Host bytes of the row blocks the sequence holds.
  static int64_t host_bytes(const Sequence& seq) { return seq.impl_->host_bytes(); }

  // Waits for the refits running on their threads (cpu stores); each
  // is swapped in by its layer's next append or step.
  static void wait_refits(Sequence& seq) { seq.impl_->wait_refits(); }

  // The implementation, for the engine's own batched calls.
  static Sequence::Impl& impl(Sequence& seq) { return *seq.impl_; }
  static const Sequence::Impl& impl(const Sequence& seq) { return *seq.impl_; }
};

}  // namespace pqkv::engine
