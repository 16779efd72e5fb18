#include "model/generator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

namespace pqkv::model {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Share of exact softmax(q.k / sqrt(d)) mass on the attended tokens, averaged
// over query heads. keys: [n, kv_heads, d], the current token last.
double attention_recall(const std::vector<float>& q, const std::vector<float>& keys,
                        const AttendTrace& trace, const LlamaConfig& cfg) {
  if (trace.exact) return 1.0;
  const int d = cfg.head_dim;
  const int group = cfg.num_q_heads / cfg.num_kv_heads;
  const int64_t row = int64_t{cfg.num_kv_heads} * d;
  const int64_t n = static_cast<int64_t>(keys.size()) / row;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  double total = 0;
  std::vector<char> attended(n);
  std::vector<double> p(n);
  for (int g = 0; g < cfg.num_kv_heads; ++g) {
    std::fill(attended.begin(), attended.end(), 0);
    attended[n - 1] = 1;
    if (g < static_cast<int>(trace.attended.size())) {
      for (int64_t j : trace.attended[g]) {
        if (j >= 0 && j < n) attended[j] = 1;
      }
    }
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const float* qh = q.data() + int64_t{h} * d;
      double max_s = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const float* k = keys.data() + j * row + int64_t{g} * d;
        double s = 0;
        for (int i = 0; i < d; ++i)
          s += double(qh[i]) * k[i];
        p[j] = s * scale;
        max_s = std::max(max_s, p[j]);
      }
      double sum = 0;
      double hit = 0;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - max_s);
        sum += p[j];
        if (attended[j]) hit += p[j];
      }
      total += hit / sum;
    }
  }
  return total / cfg.num_q_heads;
}

}  // namespace

const char* attention_path_name(AttentionPath path) {
  switch (path) {
    case AttentionPath::kBackendCache:
      return "exact (model cache)";
    case AttentionPath::kStoreExact:
      return "exact (pqkv attend_exact)";
    case AttentionPath::kStoreSparse:
      return "pqkv";
  }
  return "?";
}

struct Generator::PassContext {
  AttentionPath path = AttentionPath::kBackendCache;
  StoreTarget store;
  bool staged = false;           // the store is on the host, the backend is not
  bool chunked_prefill = false;  // the prompt runs in several passes
  // This pass ends the prompt: each layer's index build starts after its append.
  bool end_layers = false;
  bool record_keys = false;
  bool probe_recall = false;                  // this decode step measures recall
  std::vector<std::vector<float>> host_keys;  // per layer, with record_keys
  std::vector<double> recall;
  double prefill_append_ms = 0;  // host time in Sequence::append of the prefill passes
  // Host staging of q, k, v and the attention output.
  std::vector<float> q, k, v, out;
};

Status Generator::attend_layer(int layer, const QkvViews& qkv, bool prefill, PassContext& ctx) {
  const LlamaConfig& cfg = model_.config();
  TensorView q = qkv.q;
  TensorView k = qkv.k;
  TensorView v = qkv.v;
  const TensorView backend_out = backend_.attention_output();
  TensorView out = backend_out;
  Stream stream = backend_.stream();
  if (ctx.staged || ctx.record_keys) {
    ctx.k.resize(k.numel());
    PQKV_RETURN_IF_ERROR(backend_.copy_to_host(k, ctx.k.data()));
    if (ctx.record_keys) {
      auto& keys = ctx.host_keys[layer];
      keys.insert(keys.end(), ctx.k.begin(), ctx.k.end());
    }
  }
  if (ctx.staged) {
    ctx.q.resize(q.numel());
    ctx.v.resize(v.numel());
    ctx.out.resize(out.numel());
    PQKV_RETURN_IF_ERROR(backend_.copy_to_host(q, ctx.q.data()));
    PQKV_RETURN_IF_ERROR(backend_.copy_to_host(v, ctx.v.data()));
    const Device host = Device::cpu();
    k = TensorView(ctx.k.data(), DType::kF32, host, {k.dim(0), k.dim(1), k.dim(2)});
    v = TensorView(ctx.v.data(), DType::kF32, host, {v.dim(0), v.dim(1), v.dim(2)});
    q = TensorView(ctx.q.data(), DType::kF32, host, {q.dim(0), q.dim(1), q.dim(2)});
    out = TensorView(ctx.out.data(), DType::kF32, host, {out.dim(0), out.dim(1), out.dim(2)});
    stream = Stream::host();
  }
  Sequence& seq = *ctx.store.sequence;
  const auto t_append = Clock::now();
  PQKV_RETURN_IF_ERROR(
      seq.append(layer, k, v, stream)
          .with_context("appending layer " + std::to_string(layer) + " to the sequence"));
  if (prefill) ctx.prefill_append_ms += ms_between(t_append, Clock::now());
  if (prefill && ctx.end_layers) {
    // Ordered after the append on `stream`; runs under this layer's
    // attention and the layers above.
    PQKV_RETURN_IF_ERROR(
        seq.finish_prefill_layer(layer, stream)
            .with_context("starting the index build of layer " + std::to_string(layer)));
  }
  // Chunked prefill keeps the prompt in the backend's cache too, for the later
  // chunks' exact attention; generate() drops it once the prompt is in.
  if (prefill) return backend_.self_attention(layer, ctx.chunked_prefill);

  const TensorView q1(q.data, q.dtype, q.device, {cfg.num_q_heads, cfg.head_dim});
  const TensorView out1(out.data, out.dtype, out.device, {cfg.num_q_heads, cfg.head_dim});
  if (ctx.path == AttentionPath::kStoreExact) {
    PQKV_RETURN_IF_ERROR(seq.attend_exact(layer, q1, out1, stream));
  } else {
    AttendTrace trace;
    PQKV_RETURN_IF_ERROR(seq.attend(layer, q1, out1, stream, ctx.probe_recall ? &trace : nullptr));
    if (ctx.probe_recall) {
      if (!ctx.staged) {
        ctx.q.resize(q.numel());
        PQKV_RETURN_IF_ERROR(backend_.copy_to_host(q, ctx.q.data()));
      }
      ctx.recall[layer] = attention_recall(ctx.q, ctx.host_keys[layer], trace, cfg);
    }
  }
  if (ctx.staged) PQKV_RETURN_IF_ERROR(backend_.copy_from_host(ctx.out.data(), backend_out));
  return ok_status();
}

Status Generator::run_pass(std::span<const int32_t> tokens, int64_t start, bool prefill,
                           PassContext& ctx, std::vector<float>* logits) {
  PQKV_RETURN_IF_ERROR(backend_.begin_pass(tokens, start));
  for (int layer = 0; layer < model_.config().num_layers; ++layer) {
    QkvViews qkv;
    PQKV_RETURN_IF_ERROR(backend_.project_qkv(layer, &qkv));
    if (ctx.path == AttentionPath::kBackendCache) {
      PQKV_RETURN_IF_ERROR(backend_.self_attention(layer, /*cache=*/true));
    } else {
      PQKV_RETURN_IF_ERROR(attend_layer(layer, qkv, prefill, ctx));
    }
    PQKV_RETURN_IF_ERROR(backend_.finish_layer(layer));
  }
  return backend_.logits(/*all_positions=*/false, logits);
}

Result<GenerateResult> Generator::generate(std::span<const int32_t> prompt, AttentionPath path,
                                           const StoreTarget& store, const GenerateOptions& options,
                                           const std::function<void(int32_t)>& on_token) {
  const LlamaConfig& cfg = model_.config();
  if (prompt.empty()) {
    return Status::invalid_argument("the prompt is empty; give at least one token");
  }
  if (options.max_new_tokens < 1) {
    return Status::invalid_argument("max_new_tokens must be at least 1");
  }
  if (options.prefill_chunk < 0) return Status::invalid_argument("prefill_chunk must be >= 0");
  // Before any work: a bad temperature must not cost a prefill.
  PQKV_ASSIGN_OR_RETURN(Sampler sampler, Sampler::create(options.sampling));
  PassContext ctx;
  ctx.path = path;
  ctx.store = store;
  if (path != AttentionPath::kBackendCache) {
    if (store.sequence == nullptr) {
      return Status::invalid_argument(std::string(attention_path_name(path)) +
                                      " attention needs a pqkv Sequence");
    }
    const ModelSpec& spec = store.sequence->spec();
    if (spec.num_layers != cfg.num_layers || spec.num_q_heads != cfg.num_q_heads ||
        spec.num_kv_heads != cfg.num_kv_heads || spec.head_dim != cfg.head_dim) {
      return Status::invalid_argument("the sequence's geometry " + spec.to_string() +
                                      " does not match the model's " +
                                      cfg.kv_spec(spec.dtype).to_string());
    }
    if (store.sequence->length(0) != 0) {
      return Status::failed_precondition("sequence '" + store.sequence->name() +
                                         "' is not empty; generation needs a new sequence");
    }
    if (!(store.device == backend_.device())) {
      if (!store.device.is_cpu()) {
        return Status::invalid_argument("a store on " + store.device.to_string() +
                                        " needs the backend on the same device, not " +
                                        backend_.device().to_string());
      }
      ctx.staged = true;
    }
    ctx.record_keys = options.measure_recall && path == AttentionPath::kStoreSparse;
    if (ctx.record_keys) {
      ctx.host_keys.resize(cfg.num_layers);
      ctx.recall.assign(cfg.num_layers, 0.0);
    }
  }
  backend_.reset();
  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<float> logits;

  const auto t0 = Clock::now();
  const bool split = options.decode_last_prompt_token && prompt.size() >= 2;
  const auto prefill_tokens = split ? prompt.first(prompt.size() - 1) : prompt;
  const auto n_prefill = static_cast<int64_t>(prefill_tokens.size());
  const int64_t chunk = options.prefill_chunk > 0 ? options.prefill_chunk : n_prefill;
  ctx.chunked_prefill = chunk < n_prefill;
  for (int64_t start = 0; start < n_prefill; start += chunk) {
    const auto part = prefill_tokens.subspan(start, std::min(chunk, n_prefill - start));
    ctx.end_layers = options.overlap_index_builds && path != AttentionPath::kBackendCache &&
                     start + chunk >= n_prefill;
    PQKV_RETURN_IF_ERROR(run_pass(part, start, /*prefill=*/true, ctx, &logits));
  }
  if (path != AttentionPath::kBackendCache) {
    ctx.end_layers = false;
    const auto t_finish = Clock::now();
    PQKV_RETURN_IF_ERROR(store.sequence->finish_prefill(options.on_index_build));
    result.finish_prefill_ms = ms_between(t_finish, Clock::now());
    if (ctx.chunked_prefill) backend_.reset();  // the sequence holds the prompt now
  }
  int64_t position = static_cast<int64_t>(prefill_tokens.size());
  // The first decode step probes recall: the answer position when the last
  // prompt token is decoded.
  ctx.probe_recall = ctx.record_keys;
  if (split) {
    PQKV_RETURN_IF_ERROR(run_pass(prompt.last(1), position, false, ctx, &logits));
    ctx.probe_recall = false;
    ctx.record_keys = false;
    ++position;
  }
  PQKV_ASSIGN_OR_RETURN(int32_t token, sampler.next(logits));
  const auto t_first = Clock::now();
  result.ttft_ms = ms_between(t0, t_first);
  result.prefill_append_ms = ctx.prefill_append_ms;
  while (true) {
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    if (static_cast<int>(result.tokens.size()) >= options.max_new_tokens) break;
    if (options.stop_at_eos && cfg.is_eos(token)) break;
    PQKV_RETURN_IF_ERROR(
        run_pass(std::span<const int32_t>(&token, 1), position, false, ctx, &logits));
    ctx.probe_recall = false;
    ctx.record_keys = false;
    ++position;
    PQKV_ASSIGN_OR_RETURN(token, sampler.next(logits));
  }
  if (result.tokens.size() > 1) {
    result.tpot_ms =
        ms_between(t_first, Clock::now()) / static_cast<double>(result.tokens.size() - 1);
  }
  result.layer_recall = std::move(ctx.recall);
  return result;
}

}  // namespace pqkv::model
