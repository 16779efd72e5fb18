// Saving and restoring a CPU index (LayerIndex::snapshot / restore): each
// stage's codec writes and reads its own state, so every code saves the same
// way.
#include <utility>

#include "index/cpu/catch_status.h"
#include "index/cpu/layer_index_cpu.h"

namespace pqkv::index {

Result<IndexSnapshot> LayerIndexCpu::snapshot() const {
  if (!trained()) return Status::failed_precondition("an untrained index has nothing to save");
  return cpu::catch_as_status("copying the CPU index", [&]() -> Result<IndexSnapshot> {
    IndexSnapshot snap;
    snap.num_tokens = num_tokens();
    for (const Stage& s : stages_) {
      IndexSnapshot::Stage out;
      out.code = s.codec->code();
      out.code_size = s.codec->code_size();
      PQKV_RETURN_IF_ERROR(s.codec->write_state(&out.codec_state));
      out.codes = s.codes;
      snap.stages.push_back(std::move(out));
    }
    return snap;
  });
}

Status LayerIndexCpu::restore(const IndexSnapshot& snapshot, Stream /*stream*/) {
  if (snapshot.stages.size() != stages_.size()) {
    return Status::corruption("a saved index of " + std::to_string(snapshot.stages.size()) +
                              " stages cannot be restored into '" + selection_.to_string() +
                              "', which has " + std::to_string(stages_.size()));
  }
  return cpu::catch_as_status("restoring the CPU index", [&]() -> Status {
    // Fresh codecs first, so a bad snapshot leaves this index as it was.
    PqConfig pq;
    pq.m = shape_.m;
    pq.bits = shape_.bits > 0 ? shape_.bits : pq.bits;
    std::vector<Stage> restored;
    for (size_t i = 0; i < stages_.size(); ++i) {
      const IndexSnapshot::Stage& in = snapshot.stages[i];
      const KeyCode code = stages_[i].codec->code();
      if (in.code != code) {
        return Status::corruption(std::string("saved index stage ") + std::to_string(i) +
                                  " holds '" + key_code_name(in.code) + "' codes where this index" +
                                  " scores with '" + key_code_name(code) + "'");
      }
      PQKV_ASSIGN_OR_RETURN(auto codec, make_key_codec(code, shape_.head_dim, kv_heads_, pq));
      PQKV_RETURN_IF_ERROR(codec->read_state(in.codec_state));
      const size_t bytes = static_cast<size_t>(snapshot.num_tokens) * codec->code_size();
      if (in.code_size != codec->code_size() || static_cast<int>(in.codes.size()) != kv_heads_) {
        return Status::corruption("saved index stage " + std::to_string(i) +
                                  " has codes of another size or head count");
      }
      for (const auto& head : in.codes) {
        if (head.size() != bytes) {
          return Status::corruption("saved index stage " + std::to_string(i) + " holds " +
                                    std::to_string(head.size()) + " code bytes for a head where " +
                                    std::to_string(snapshot.num_tokens) + " tokens need " +
                                    std::to_string(bytes));
        }
        PQKV_RETURN_IF_ERROR(codec->check_codes(head.data(), snapshot.num_tokens));
      }
      restored.push_back(Stage{std::move(codec), in.codes, std::vector<double>(kv_heads_),
                               std::vector<double>(kv_heads_), std::vector<double>(kv_heads_)});
    }
    stages_ = std::move(restored);
    // The fit's keys are not saved: nothing to measure drift against.
    stop_drift_tracking();
    return ok_status();
  });
}

}  // namespace pqkv::index
