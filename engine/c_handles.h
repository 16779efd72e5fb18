// The C API's handles: a pqkv_store* or pqkv_sequence* is an id, never an
// address, looked up in one process-wide table on every call. An id is never
// reused, so a handle that was dropped, closed, made up or of the other kind
// is told apart from a live one and refused with a Status, never followed.
//
// Lifetime: the table owns each store (and a reference to each sequence that
// has a handle). A call holds references to what it resolved for its whole
// duration, so closing a store or dropping a sequence on another thread meanwhile
// only makes later calls fail; the memory goes when the last call returns.
// Lock order: a store's `mu`, then the table's lock.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "pqkv/pqkv.h"
#include "pqkv/store.h"

namespace pqkv::capi {

// An open store as the C API holds it.
struct StoreState {
  explicit StoreState(std::unique_ptr<Store> s) : store(std::move(s)) {}
  std::unique_ptr<Store> store;
  // Serialises the calls that make or release sequence handles on this store,
  // so the handle map follows the Store's names.
  std::mutex mu;
  bool closed = false;                                         // guarded by mu
  std::unordered_map<const Sequence*, uint64_t> sequence_ids;  // guarded by mu
};

// A resolved sequence handle; `seq` is released before `store` (member order),
// as a Sequence must not outlive its Store.
struct SequenceRef {
  std::shared_ptr<StoreState> store;
  std::shared_ptr<Sequence> seq;
};

// `what` names the argument in messages ("store", "seqs[3]").
Result<std::shared_ptr<StoreState>> resolve_store(const pqkv_store* handle,
                                                  const std::string& what);
Result<SequenceRef> resolve_sequence(const pqkv_sequence* handle, const std::string& what);

// Takes ownership of an open store and gives its handle.
pqkv_store* add_store(std::unique_ptr<Store> store);

// Closes the store: its handle and every handle to its sequences stop
// resolving. InvalidArgument (as resolve_store) when `handle` is not an open
// store; nothing changes then.
Status close_store(const pqkv_store* handle);

// The handle of `seq` (a sequence of `store`): the one it has, or a new one.
// Caller holds store->mu and has checked !store->closed.
pqkv_sequence* sequence_handle(const std::shared_ptr<StoreState>& store,
                               std::shared_ptr<Sequence> seq);

// Releases the handle of `seq`, if it has one. Caller holds store.mu. The
// table's reference is handed back for the caller to drop outside the locks.
std::shared_ptr<Sequence> release_sequence(StoreState& store, const Sequence* seq);

}  // namespace pqkv::capi
