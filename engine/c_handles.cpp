#include "engine/c_handles.h"

#include <atomic>
#include <cstdio>
#include <shared_mutex>
#include <utility>
#include <vector>

namespace pqkv::capi {
namespace {

// A handle's bits: a tag that no heap or stack address carries in user space,
// the kind, and a serial number that is never reused.
static_assert(sizeof(void*) == 8, "handle ids take 64 bits");
constexpr uint64_t kTag = 0x7071;  // "pq"
constexpr int kTagShift = 48;
constexpr int kKindShift = 44;
constexpr uint64_t kSerialMask = (uint64_t{1} << kKindShift) - 1;
enum class Kind : uint64_t { kStore = 1, kSequence = 2 };

uint64_t make_id(Kind kind, uint64_t serial) {
  return (kTag << kTagShift) | (static_cast<uint64_t>(kind) << kKindShift) | serial;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

const char* type_name(Kind kind) {
  return kind == Kind::kStore ? "pqkv_store*" : "pqkv_sequence*";
}

struct Entry {
  std::shared_ptr<StoreState> store;
  std::shared_ptr<Sequence> seq;  // null for a store's entry
};

class Table {
 public:
  uint64_t insert(Kind kind, Entry entry) {
    const uint64_t id = make_id(kind, next_serial_.fetch_add(1));
    std::unique_lock lock(mu_);
    entries_.emplace(id, std::move(entry));
    return id;
  }

  // The entry of `handle` when it is a live handle of `kind`; otherwise a
  // Status that says which of NULL, made up, wrong kind or released it is.
  Result<Entry> find(const void* handle, Kind kind, const std::string& what) const {
    if (handle == nullptr) return Status::invalid_argument(what + " is NULL");
    const auto v = reinterpret_cast<uintptr_t>(handle);
    const uint64_t serial = v & kSerialMask;
    const uint64_t k = (v >> kKindShift) & 0xf;
    if ((v >> kTagShift) != kTag || (k != 1 && k != 2) || serial == 0 ||
        serial >= next_serial_.load()) {
      return Status::invalid_argument(
          what + " (" + hex(v) + ") is not a handle pqkv gave: pass the " + type_name(kind) +
          " that " +
          (kind == Kind::kStore ? "pqkv_store_open" : "pqkv_sequence_create, _get or _open") +
          " set (an uninitialised or overwritten variable?)");
    }
    if (k != static_cast<uint64_t>(kind)) {
      return Status::invalid_argument(what + " (" + hex(v) + ") is a " +
                                      type_name(static_cast<Kind>(k)) + " handle, not a " +
                                      type_name(kind));
    }
    {
      std::shared_lock lock(mu_);
      auto it = entries_.find(v);
      if (it != entries_.end()) return it->second;
    }
    if (kind == Kind::kStore) {
      return Status::invalid_argument(what + " (" + hex(v) +
                                      ") is a closed store: pqkv_store_close was called on it; "
                                      "open the store again for a new handle");
    }
    return Status::invalid_argument(
        what + " (" + hex(v) +
        ") is a released sequence handle: the sequence was dropped or closed "
        "(pqkv_sequence_drop, pqkv_sequence_close) or its store was closed; get a new "
        "handle with pqkv_sequence_get or pqkv_sequence_open");
  }

  // Removes the entry; the caller drops it outside the lock (a store or a
  // sequence may take long to destroy).
  Entry erase(uint64_t id) {
    std::unique_lock lock(mu_);
    auto it = entries_.find(id);
    if (it == entries_.end()) return {};
    Entry e = std::move(it->second);
    entries_.erase(it);
    return e;
  }

 private:
  std::atomic<uint64_t> next_serial_{1};
  mutable std::shared_mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;
};

// Never destroyed: stores left open at exit are not torn down during static
// destruction, while other statics they use may already be gone.
Table& table() {
  static Table* t = new Table;
  return *t;
}

}  // namespace

Result<std::shared_ptr<StoreState>> resolve_store(const pqkv_store* handle,
                                                  const std::string& what) {
  PQKV_ASSIGN_OR_RETURN(Entry e, table().find(handle, Kind::kStore, what));
  return std::move(e.store);
}

Result<SequenceRef> resolve_sequence(const pqkv_sequence* handle, const std::string& what) {
  PQKV_ASSIGN_OR_RETURN(Entry e, table().find(handle, Kind::kSequence, what));
  return SequenceRef{std::move(e.store), std::move(e.seq)};
}

pqkv_store* add_store(std::unique_ptr<Store> store) {
  const uint64_t id =
      table().insert(Kind::kStore, {std::make_shared<StoreState>(std::move(store)), nullptr});
  return reinterpret_cast<pqkv_store*>(static_cast<uintptr_t>(id));
}

Status close_store(const pqkv_store* handle) {
  PQKV_ASSIGN_OR_RETURN(std::shared_ptr<StoreState> state, resolve_store(handle, "store"));
  // Two closes racing: only the one that removes the entry goes on.
  if (table().erase(reinterpret_cast<uintptr_t>(handle)).store == nullptr) {
    return resolve_store(handle, "store").status();
  }
  std::vector<Entry> released;
  {
    std::lock_guard lock(state->mu);
    state->closed = true;
    for (const auto& [seq, id] : state->sequence_ids)
      released.push_back(table().erase(id));
    state->sequence_ids.clear();
  }
  // `released` then `state` go here, or in the last call still running on them.
  return ok_status();
}

pqkv_sequence* sequence_handle(const std::shared_ptr<StoreState>& store,
                               std::shared_ptr<Sequence> seq) {
  auto it = store->sequence_ids.find(seq.get());
  uint64_t id = 0;
  if (it != store->sequence_ids.end()) {
    id = it->second;
  } else {
    const Sequence* key = seq.get();
    id = table().insert(Kind::kSequence, {store, std::move(seq)});
    store->sequence_ids.emplace(key, id);
  }
  return reinterpret_cast<pqkv_sequence*>(static_cast<uintptr_t>(id));
}

std::shared_ptr<Sequence> release_sequence(StoreState& store, const Sequence* seq) {
  auto it = store.sequence_ids.find(seq);
  if (it == store.sequence_ids.end()) return nullptr;
  Entry e = table().erase(it->second);
  store.sequence_ids.erase(it);
  return std::move(e.seq);
}

}  // namespace pqkv::capi
