#include "index/cpu/layer_index_cpu.h"

#include <tbb/parallel_for.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>

#include "index/cpu/catch_status.h"
#include "index/cpu/kmeans_cpu.h"
#include "index/cpu/pq_encode_cpu.h"
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
  if (kv_heads < 1) {
    return Status::invalid_argument("a layer index needs at least one KV head, got " +
                                    std::to_string(kv_heads));
  }
  return cpu::catch_as_status(
      "creating the CPU index", [&]() -> Result<std::unique_ptr<LayerIndexCpu>> {
        return std::unique_ptr<LayerIndexCpu>(new LayerIndexCpu(shape, kv_heads));
      });
}

LayerIndexCpu::LayerIndexCpu(const PqShape& shape, int kv_heads)
    : shape_(shape),
      kv_heads_(kv_heads),
      codes_(static_cast<size_t>(kv_heads)),
      topk_scratch_(static_cast<size_t>(kv_heads)) {}

void LayerIndexCpu::install(LayerCodebook codebook) {
  codebook_ = std::move(codebook);
  for (auto& head : codes_)
    head.clear();
}

Status LayerIndexCpu::train(const TensorView& keys, const PqConfig& config, Stream /*stream*/) {
  PQKV_RETURN_IF_ERROR(shape_.check_config(config));
  PQKV_ASSIGN_OR_RETURN(
      const cpu::HostKeys host,
      cpu::HostKeys::from_view(keys, kv_heads_, shape_.head_dim, "training keys"));
  return cpu::catch_as_status("training the CPU index", [&]() -> Status {
    PQKV_ASSIGN_OR_RETURN(LayerCodebook codebook, cpu::train_codebook(host, shape_, config));
    install(std::move(codebook));
    return ok_status();
  });
}

Status LayerIndexCpu::set_codebook(const LayerCodebook& codebook, Stream /*stream*/) {
  PQKV_RETURN_IF_ERROR(codebook.check_fits(shape_, kv_heads_));
  return cpu::catch_as_status("installing a codebook", [&] {
    install(codebook);
    return ok_status();
  });
}

Result<LayerCodebook> LayerIndexCpu::codebook() const {
  if (!trained()) {
    return Status::failed_precondition("the index has no codebook yet: call train or set_codebook");
  }
  return cpu::catch_as_status("copying the codebook",
                              [&]() -> Result<LayerCodebook> { return *codebook_; });
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
  return cpu::catch_as_status("adding keys to the CPU index", [&]() -> Status {
    const cpu::PqEncoder encoder(*codebook_);
    std::vector<std::vector<uint8_t>> fresh(static_cast<size_t>(kv_heads_));
    std::vector<uint8_t*> heads;
    for (auto& head : fresh) {
      head.resize(static_cast<size_t>(host.n * shape_.m));
      heads.push_back(head.data());
    }
    PQKV_RETURN_IF_ERROR(cpu::encode_keys(encoder, host, heads));
    // Reserve first so that nothing can fail once the first head grows.
    for (auto& head : codes_)
      head.reserve(head.size() + static_cast<size_t>(host.n * shape_.m));
    for (int h = 0; h < kv_heads_; ++h) {
      codes_[h].insert(codes_[h].end(), fresh[h].begin(), fresh[h].end());
    }
    return ok_status();
  });
}

Status LayerIndexCpu::copy_codes(int kv_head, int64_t begin, int64_t end, uint8_t* out) const {
  PQKV_RETURN_IF_ERROR(check_copy_codes(*this, kv_head, begin, end, out));
  if (end == begin) return ok_status();
  std::memcpy(out, codes_[kv_head].data() + begin * shape_.m,
              static_cast<size_t>((end - begin) * shape_.m));
  return ok_status();
}

Status LayerIndexCpu::validate_request(const SearchRequest& request,
                                       const int32_t* out_indices) const {
  PQKV_RETURN_IF_ERROR(check_search_request(*this, request, out_indices));
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

Status LayerIndexCpu::search(const SearchRequest& request, int32_t* out_indices, Stream /*stream*/,
                             SearchTimings* timings) {
  PQKV_RETURN_IF_ERROR(validate_request(request, out_indices));
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
    const std::vector<float> luts =
        cpu::build_luts(*codebook_, static_cast<const float*>(request.queries.data), q_heads);
    const int64_t lut_floats = int64_t{shape_.m} * shape_.ksub();
    tbb::parallel_for(0, q_heads, [&](int h) {
      float* p = probs_.data() + h * count;
      cpu::score_tokens(shape_, luts.data() + h * lut_floats, codes_[h / group].data(),
                        request.begin, request.end, p);
      cpu::softmax_scores(p, count, shape_.head_dim);
    });
    tbb::parallel_for(0, kv_heads_, [&](int kv) {
      cpu::aggregate_group(probs_.data() + int64_t{kv} * group * count, group, count,
                           request.aggregation, scores_.data() + kv * count);
    });
    const double score_us = micros_since(score_start);

    const auto topk_start = std::chrono::steady_clock::now();
    cpu::TaskErrors errors;
    tbb::parallel_for(0, kv_heads_, [&](int kv) {
      errors.run("top-k selection", [&] {
        cpu::select_top_k(scores_.data() + kv * count, count, kept, request.begin,
                          topk_scratch_[kv], out_indices + kv * kept);
        return ok_status();
      });
    });
    PQKV_RETURN_IF_ERROR(errors.status());
    if (timings != nullptr) {
      timings->score_us = score_us;
      timings->topk_us = micros_since(topk_start);
    }
    return ok_status();
  });
}

}  // namespace pqkv::index
