#include "pqkv/store.h"

#include <map>
#include <mutex>

#include <tbb/task_arena.h>

#include "engine/sequence_impl.h"
#include "storage/memory_budget.h"

namespace pqkv {

class Store::Impl {
 public:
  explicit Impl(const StoreOptions& options)
      : options_(options),
        budget_(options.dram_budget_bytes),
        arena_(options.num_threads > 0 ? options.num_threads : tbb::task_arena::automatic) {}

  StoreOptions options_;
  storage::MemoryBudget budget_;
  tbb::task_arena arena_;     // every sequence's CPU work runs here
  mutable std::mutex mutex_;  // guards sequences_
  std::map<std::string, std::unique_ptr<Sequence>> sequences_;
};

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::open(const StoreOptions& options) {
  PQKV_RETURN_IF_ERROR(options.validate());
  return std::unique_ptr<Store>(new Store(std::make_unique<Impl>(options)));
}

const StoreOptions& Store::options() const {
  return impl_->options_;
}

Result<Sequence*> Store::create_sequence(const std::string& name, const SequenceOptions& options) {
  if (name.empty()) return Status::invalid_argument("a sequence needs a non-empty name");
  PQKV_RETURN_IF_ERROR(options.validate(impl_->options_.spec));
  std::lock_guard lock(impl_->mutex_);
  if (impl_->sequences_.count(name) != 0) {
    return Status::already_exists("a sequence named '" + name +
                                  "' exists already; drop it first or pick another name");
  }
  attention::ExecutorConfig config{impl_->options_.spec, options, impl_->options_.device,
                                   &impl_->budget_};
  PQKV_ASSIGN_OR_RETURN(auto executor, attention::make_decode_executor(config));
  auto seq = std::make_unique<Sequence>(std::make_unique<Sequence::Impl>(
      name, impl_->options_.spec, options, std::move(executor), &impl_->arena_));
  Sequence* raw = seq.get();
  impl_->sequences_.emplace(name, std::move(seq));
  return raw;
}

Result<Sequence*> Store::get_sequence(const std::string& name) {
  std::lock_guard lock(impl_->mutex_);
  auto it = impl_->sequences_.find(name);
  if (it == impl_->sequences_.end()) {
    return Status::not_found("no sequence named '" + name + "' in this store");
  }
  return it->second.get();
}

Status Store::drop(const std::string& name) {
  std::lock_guard lock(impl_->mutex_);
  if (impl_->sequences_.erase(name) == 0) {
    return Status::not_found("cannot drop '" + name + "': no such sequence");
  }
  return ok_status();
}

std::vector<std::string> Store::sequence_names() const {
  std::lock_guard lock(impl_->mutex_);
  std::vector<std::string> names;
  for (const auto& [name, seq] : impl_->sequences_)
    names.push_back(name);
  return names;
}

int64_t Store::dram_bytes_used() const {
  return impl_->budget_.used();
}

}  // namespace pqkv
