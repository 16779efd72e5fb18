#include "index/cpu/layer_index_cpu.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>

#include "index/cpu/catch_status.h"
#include "index/cpu/key_codecs_cpu.h"
#include "index/cpu/pq_search_cpu.h"

namespace pqkv::index {
namespace {

double micros_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

Result<std::unique_ptr<LayerIndexCpu>> LayerIndexCpu::create(const PqShape& shape, int kv_heads) {
  PQKV_RETURN_IF_ERROR(shape.validate());
  PqConfig pq;
  pq.m = shape.m;
  pq.bits = shape.bits;
  return create(shape.head_dim, kv_heads, pq, SelectionConfig::pq());
}

Result<std::unique_ptr<LayerIndexCpu>> LayerIndexCpu::create(int head_dim, int kv_heads,
                                                             const PqConfig& pq,
                                                             const SelectionConfig& selection) {
  PQKV_RETURN_IF_ERROR(selection.validate());
  if (kv_heads < 1) {
    return Status::invalid_argument("a layer index needs at least one KV head, got " +
                                    std::to_string(kv_heads));
  }
  const bool uses_pq =
      selection.code == KeyCode::kPq || (selection.two_stage() && selection.rerank == KeyCode::kPq);
  if (uses_pq) PQKV_RETURN_IF_ERROR(pq.validate(head_dim));
  const PqShape shape = uses_pq ? PqShape::from_config(head_dim, pq) : PqShape{head_dim, 0, 0};
  std::vector<KeyCode> codes{selection.code};
  if (selection.two_stage()) codes.push_back(selection.rerank);
  std::vector<std::unique_ptr<KeyCodec>> codecs;
  for (KeyCode code : codes) {
    PQKV_ASSIGN_OR_RETURN(auto codec, make_key_codec(code, head_dim, kv_heads, pq));
    codecs.push_back(std::move(codec));
  }
  return cpu::catch_as_status(
      "creating the CPU index", [&]() -> Result<std::unique_ptr<LayerIndexCpu>> {
        std::unique_ptr<LayerIndexCpu> index(new LayerIndexCpu(shape, kv_heads, selection));
        for (auto& codec : codecs) {
          index->stages_.push_back(
              Stage{std::move(codec), std::vector<std::vector<uint8_t>>(kv_heads),
                    std::vector<double>(kv_heads), std::vector<double>(kv_heads),
                    std::vector<double>(kv_heads)});
        }
        return index;
      });
}

LayerIndexCpu::LayerIndexCpu(const PqShape& shape, int kv_heads, const SelectionConfig& selection)
    : shape_(shape),
      kv_heads_(kv_heads),
      selection_(selection),
      topk_scratch_(static_cast<size_t>(kv_heads)) {}

int64_t LayerIndexCpu::code_bytes_per_token() const {
  int64_t bytes = 0;
  for (const Stage& s : stages_)
    bytes += s.codec->code_size();
  return bytes;
}

bool LayerIndexCpu::trained() const {
  return std::all_of(stages_.begin(), stages_.end(),
                     [](const Stage& s) { return s.codec->trained(); });
}

const LayerIndexCpu::Stage* LayerIndexCpu::pq_stage() const {
  for (const Stage& s : stages_) {
    if (s.codec->code() == KeyCode::kPq) return &s;
  }
  return nullptr;
}

void LayerIndexCpu::drop_codes() {
  for (Stage& s : stages_) {
    for (auto& head : s.codes)
      head.clear();
  }
}

Status LayerIndexCpu::train(const TensorView& keys, const PqConfig& config, Stream /*stream*/) {
  if (pq_stage() != nullptr) PQKV_RETURN_IF_ERROR(shape_.check_config(config));
  PQKV_ASSIGN_OR_RETURN(
      const cpu::HostKeys host,
      cpu::HostKeys::from_view(keys, kv_heads_, shape_.head_dim, "training keys"));
  if (host.n == 0) {
    return Status::invalid_argument(
        "training needs at least one key, got keys [0, " + std::to_string(kv_heads_) + ", " +
        std::to_string(shape_.head_dim) + "]; pass the keys to learn from");
  }
  return cpu::catch_as_status("training the CPU index", [&]() -> Status {
    for (Stage& s : stages_)
      PQKV_RETURN_IF_ERROR(s.codec->train(host, config));
    drop_codes();
    start_drift_tracking(host);
    return ok_status();
  });
}

Status LayerIndexCpu::set_codebook(const LayerCodebook& codebook, Stream /*stream*/) {
  if (stages_.size() != 1 || stages_[0].codec->code() != KeyCode::kPq) {
    return Status::failed_precondition(
        "set_codebook installs a PQ codebook; this index scores "
        "with '" +
        selection_.to_string() + "': train it instead");
  }
  PQKV_RETURN_IF_ERROR(codebook.check_fits(shape_, kv_heads_));
  return cpu::catch_as_status("installing a codebook", [&] {
    static_cast<cpu::PqCodecCpu&>(*stages_[0].codec).set_codebook(codebook);
    drop_codes();
    stop_drift_tracking();
    return ok_status();
  });
}

Result<LayerCodebook> LayerIndexCpu::codebook() const {
  const Stage* pq = pq_stage();
  if (pq == nullptr) {
    return Status::failed_precondition("the index scores with '" + selection_.to_string() +
                                       "' and has no PQ codebook");
  }
  if (!pq->codec->trained()) {
    return Status::failed_precondition("the index has no codebook yet: call train or set_codebook");
  }
  return cpu::catch_as_status("copying the codebook", [&]() -> Result<LayerCodebook> {
    return static_cast<const cpu::PqCodecCpu&>(*pq->codec).codebook();
  });
}

Status LayerIndexCpu::add(const TensorView& keys, Stream /*stream*/) {
  if (!trained()) {
    return Status::failed_precondition(
        "add needs a trained index to encode keys: call train or set_codebook first");
  }
  PQKV_ASSIGN_OR_RETURN(const cpu::HostKeys host,
                        cpu::HostKeys::from_view(keys, kv_heads_, shape_.head_dim, "keys"));
  if (host.n == 0) return ok_status();
  if (num_tokens() + host.n - 1 > INT32_MAX) {
    return Status::out_of_range("the index would hold " + std::to_string(num_tokens() + host.n) +
                                " tokens, past the int32 positions search returns; split the "
                                "context");
  }
  install_refit();
  return cpu::catch_as_status("adding keys to the CPU index", [&]() -> Status {
    // Reserve first so that nothing can fail once the first head grows.
    for (Stage& s : stages_) {
      for (auto& head : s.codes)
        head.reserve(head.size() + static_cast<size_t>(host.n * s.codec->code_size()));
    }
    if (refit_ != nullptr) refit_keys_.reserve(refit_keys_.size() + host.n * host.row_elements());
    const bool measure = tracking_ && !fit_context_pending_;
    const int num_stages = static_cast<int>(stages_.size());
    cpu::TaskErrors errors;
    tbb::parallel_for(0, num_stages * kv_heads_, [&](int task) {
      errors.run("encoding keys", [&] {
        Stage& s = stages_[task / kv_heads_];
        const int h = task % kv_heads_;
        auto& head = s.codes[h];
        const size_t old_size = head.size();
        head.resize(old_size + static_cast<size_t>(host.n * s.codec->code_size()));
        s.codec->encode(host, h, head.data() + old_size);
        if (measure && s.codec->code() != KeyCode::kExact) {
          s.since_error[h] += cpu::squared_error(*s.codec, host, h, head.data() + old_size);
        }
        return ok_status();
      });
    });
    PQKV_RETURN_IF_ERROR(errors.status());
    if (measure) {
      tokens_since_fit_ += host.n;
    }
    fit_context_pending_ = false;
    // A refit being built re-encodes these keys with its codec when it is swapped in.
    if (refit_ != nullptr) host.append_to(&refit_keys_);
    return ok_status();
  });
}

Status LayerIndexCpu::copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const {
  if (stages_[0].codec->code() != KeyCode::kPq) {
    return Status::failed_precondition("copy_codes returns PQ codes; this index scores with '" +
                                       selection_.to_string() + "'");
  }
  PQKV_RETURN_IF_ERROR(check_copy_codes(*this, kv_head, begin, end, out));
  if (end == begin) return ok_status();
  std::memcpy(out, stages_[0].codes[kv_head].data() + begin * shape_.m,
              static_cast<size_t>((end - begin) * shape_.m));
  return ok_status();
}

Status LayerIndexCpu::validate_request(const SearchRequest& request,
                                       const int32_t* out_indices) const {
  PQKV_RETURN_IF_ERROR(check_search_request(*this, request, out_indices));
  if (request.device_range != nullptr) {
    return Status::invalid_argument(
        "the CPU index reads its search range from the request; device-side counts are for GPU "
        "indexes");
  }
  const TensorView& q = request.queries;
  if (!q.device.is_cpu()) {
    return Status::invalid_argument("queries must be in host memory for the CPU index, got " +
                                    q.describe());
  }
  if (q.dtype != DType::kF32) {
    return Status::invalid_argument("the CPU index scores fp32 queries, got " + q.describe() +
                                    "; convert them to fp32");
  }
  const auto* values = static_cast<const float*>(q.data);
  for (int64_t i = 0; i < q.numel(); ++i) {
    if (!std::isfinite(values[i])) {
      return Status::invalid_argument("queries hold NaN or Inf at head " +
                                      std::to_string(i / shape_.head_dim) + ", dim " +
                                      std::to_string(i % shape_.head_dim));
    }
  }
  return ok_status();
}

namespace {

// InvalidArgument naming the first of `count` scores of query head `head`
// that left fp32's range; position(i) is score i's token.
template <class Position>
Status check_scores_finite(int head, const float* scores, int64_t count, Position position) {
  const float* bad =
      std::find_if(scores, scores + count, [](float v) { return !std::isfinite(v); });
  if (bad == scores + count) return ok_status();
  return Status::invalid_argument(
      "the selection score of query head " + std::to_string(head) + " against token " +
      std::to_string(position(bad - scores)) +
      " passes fp32's range (q . k beyond 3.4e38): queries and keys this large overflow "
      "attention; scale them down");
}

}  // namespace

Status LayerIndexCpu::score_first_stage(const float* queries, int q_heads, int64_t begin,
                                        int64_t end) {
  const int group = q_heads / kv_heads_;
  const int64_t count = end - begin;
  const Stage& stage = stages_[0];
  head_max_.resize(static_cast<size_t>(q_heads));
  head_inv_z_.resize(static_cast<size_t>(q_heads));
  cpu::TaskErrors errors;
  tbb::parallel_for(0, q_heads, [&](int h) {
    errors.run("scoring tokens", [&] {
      std::vector<float> table;
      stage.codec->prepare(h / group, queries + int64_t{h} * shape_.head_dim, &table);
      float* p = probs_.data() + h * count;
      stage.codec->scan(table.data(), stage.codes[h / group].data(), begin, end, p);
      PQKV_RETURN_IF_ERROR(check_scores_finite(h, p, count, [&](int64_t i) { return begin + i; }));
      const int64_t best = std::max_element(p, p + count) - p;
      head_max_[h] = p[best];
      cpu::softmax_scores(p, count, shape_.head_dim);
      // The best token's probability is exp(0) / Z.
      head_inv_z_[h] = p[best];
      return ok_status();
    });
  });
  return errors.status();
}

Status LayerIndexCpu::rerank(const SearchRequest& request, int64_t kept, int32_t* out_indices) {
  const int q_heads = static_cast<int>(request.queries.dim(0));
  const int group = q_heads / kv_heads_;
  const int64_t count = request.end - request.begin;
  const int64_t pool =
      std::min<int64_t>(count, std::max<int64_t>(kept, kept * selection_.candidates));
  candidates_.resize(static_cast<size_t>(kv_heads_ * pool));
  cpu::TaskErrors errors;
  tbb::parallel_for(0, kv_heads_, [&](int kv) {
    errors.run("choosing candidates", [&] {
      int32_t* row = candidates_.data() + kv * pool;
      cpu::select_top_k(scores_.data() + kv * count, count, pool, request.begin, topk_scratch_[kv],
                        row);
      // In position order, so that equal rerank scores keep the lower
      // position (as the CUDA index's rerank does).
      std::sort(row, row + pool);
      return ok_status();
    });
  });
  PQKV_RETURN_IF_ERROR(errors.status());
  // Reuse probs_ as [q_heads][pool] and scores_ as [kv_heads][pool].
  const Stage& stage = stages_[1];
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape_.head_dim));
  const auto* queries = static_cast<const float*>(request.queries.data);
  tbb::parallel_for(0, q_heads, [&](int h) {
    errors.run("rescoring candidates", [&] {
      std::vector<float> table;
      stage.codec->prepare(h / group, queries + int64_t{h} * shape_.head_dim, &table);
      float* p = probs_.data() + h * pool;
      stage.codec->scan_positions(table.data(), stage.codes[h / group].data(),
                                  candidates_.data() + (h / group) * pool, pool, p);
      const int32_t* positions = candidates_.data() + (h / group) * pool;
      PQKV_RETURN_IF_ERROR(
          check_scores_finite(h, p, pool, [&](int64_t i) { return positions[i]; }));
      for (int64_t i = 0; i < pool; ++i)
        p[i] = std::exp((p[i] - head_max_[h]) * scale) * head_inv_z_[h];
      return ok_status();
    });
  });
  PQKV_RETURN_IF_ERROR(errors.status());
  tbb::parallel_for(0, kv_heads_, [&](int kv) {
    errors.run("reranking candidates", [&] {
      float* s = scores_.data() + kv * pool;
      cpu::aggregate_group(probs_.data() + int64_t{kv} * group * pool, group, pool,
                           request.aggregation, s);
      int32_t* out = out_indices + kv * kept;
      cpu::select_top_k(s, pool, kept, 0, topk_scratch_[kv], out);
      for (int64_t i = 0; i < kept; ++i)
        out[i] = candidates_[kv * pool + out[i]];
      return ok_status();
    });
  });
  return errors.status();
}

Status LayerIndexCpu::search(const SearchRequest& request, int32_t* out_indices, Stream /*stream*/,
                             SearchTimings* timings) {
  PQKV_RETURN_IF_ERROR(validate_request(request, out_indices));
  install_refit();
  return cpu::catch_as_status("searching the CPU index", [&]() -> Status {
    const int q_heads = static_cast<int>(request.queries.dim(0));
    const int group = q_heads / kv_heads_;
    const int64_t count = request.end - request.begin;
    const int64_t kept = cpu::clamped_k(request.k, request.begin, request.end);
    if (kept == 0) {
      if (timings != nullptr) *timings = SearchTimings{};
      return ok_status();
    }
    probs_.resize(static_cast<size_t>(q_heads * count));
    scores_.resize(static_cast<size_t>(kv_heads_ * count));

    const auto score_start = std::chrono::steady_clock::now();
    PQKV_RETURN_IF_ERROR(score_first_stage(static_cast<const float*>(request.queries.data), q_heads,
                                           request.begin, request.end));
    tbb::parallel_for(0, kv_heads_, [&](int kv) {
      cpu::aggregate_group(probs_.data() + int64_t{kv} * group * count, group, count,
                           request.aggregation, scores_.data() + kv * count);
    });
    const double score_us = micros_since(score_start);

    const auto topk_start = std::chrono::steady_clock::now();
    if (stages_.size() > 1) {
      PQKV_RETURN_IF_ERROR(rerank(request, kept, out_indices));
    } else {
      cpu::TaskErrors errors;
      tbb::parallel_for(0, kv_heads_, [&](int kv) {
        errors.run("top-k selection", [&] {
          cpu::select_top_k(scores_.data() + kv * count, count, kept, request.begin,
                            topk_scratch_[kv], out_indices + kv * kept);
          return ok_status();
        });
      });
      PQKV_RETURN_IF_ERROR(errors.status());
    }
    if (timings != nullptr) {
      timings->score_us = score_us;
      // Two stages: the candidates' top-k, their rescoring and the final top-k.
      timings->topk_us = micros_since(topk_start);
    }
    return ok_status();
  });
}

}  // namespace pqkv::index
