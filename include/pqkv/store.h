// The Store: owns every sequence of one model geometry, their memory and the
// worker threads. In memory for now; tiers and persistence live behind it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "pqkv/export.h"
#include "pqkv/options.h"
#include "pqkv/sequence.h"
#include "pqkv/status.h"

namespace pqkv {

class PQKV_API Store {
 public:
  class PQKV_HIDDEN Impl;
  static Result<std::unique_ptr<Store>> open(const StoreOptions& options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const StoreOptions& options() const;

  // Creates an empty sequence; the name must be new. The pointer stays valid
  // until drop() or the Store's destruction.
  Result<Sequence*> create_sequence(const std::string& name, const SequenceOptions& options);
  Result<Sequence*> get_sequence(const std::string& name);
  Status drop(const std::string& name);
  std::vector<std::string> sequence_names() const;

  // Host bytes held for keys and values across all sequences.
  int64_t dram_bytes_used() const;

 private:
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pqkv
