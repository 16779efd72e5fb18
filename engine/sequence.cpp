#include "pqkv/sequence.h"

#include "engine/sequence_impl.h"

namespace pqkv {

Sequence::Sequence(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Sequence::~Sequence() = default;

const std::string& Sequence::name() const {
  return impl_->name();
}
const ModelSpec& Sequence::spec() const {
  return impl_->spec();
}
const SequenceOptions& Sequence::options() const {
  return impl_->options();
}
int64_t Sequence::length(int layer) const {
  return layer >= 0 && layer < impl_->spec().num_layers ? impl_->length(layer) : 0;
}
Device Sequence::device() const {
  return impl_->device();
}
bool Sequence::prefilled() const {
  return impl_->prefilled();
}

Status Sequence::append(int layer, const TensorView& keys, const TensorView& values,
                        Stream stream) {
  return impl_->run([&] { return impl_->append(layer, keys, values, stream); });
}

Status Sequence::finish_prefill() {
  return finish_prefill(BuildProgressCallback{});
}

Status Sequence::finish_prefill(const BuildProgressCallback& on_progress) {
  return impl_->run([&] { return impl_->finish_prefill(on_progress); });
}

Status Sequence::finish_prefill_layer(int layer, Stream stream) {
  return impl_->run([&] { return impl_->finish_prefill_layer(layer, stream); });
}

Status Sequence::attend(int layer, const TensorView& queries, const TensorView& out, Stream stream,
                        AttendTrace* trace) {
  return impl_->run([&] { return impl_->attend(layer, queries, out, stream, trace); });
}

Status Sequence::check_health() {
  return impl_->run([&] { return impl_->check_all_health(); });
}

Status Sequence::attend_exact(int layer, const TensorView& queries, const TensorView& out,
                              Stream stream) {
  return impl_->run([&] { return impl_->attend_exact(layer, queries, out, stream); });
}

Status Sequence::sync_length(Stream stream) {
  return impl_->run([&] { return impl_->sync_length(stream); });
}

Status Sequence::reserve(int64_t max_tokens) {
  return impl_->run([&] { return impl_->reserve(max_tokens); });
}

Result<DriftStats> Sequence::drift_stats(int layer) const {
  return impl_->drift_stats(layer);
}

Result<int64_t> Sequence::max_selected(int layer) const {
  return impl_->max_selected(layer);
}

}  // namespace pqkv
