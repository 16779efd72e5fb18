// CPU micro-benchmarks of the index build, run by `pqkv micro`.
//
// Data: the keys of layer 0 of the synthetic workload (Llama-3.1-8B geometry:
// 8 KV heads, head_dim 128), `tokens` tokens, the default code (m = 16,
// b = 8, default iterations and sampling). Wall time per iteration.
//
//   BM_CpuIndexBuild  pqkv's CPU index: train (k-means of every KV head and
//                     sub-space) and encode the tokens.
//   BM_FaissKmeans    Faiss's k-means alone on the same sub-space data, one
//                     faiss::Clustering per (KV head, sub-space) in turn, with
//                     Faiss's own OpenMP threads: the reference the build is
//                     measured against.
#include <benchmark/benchmark.h>
#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>

#include <vector>

#include "index/cpu/kmeans_cpu.h"
#include "index/layer_index.h"
#include "pqkv/model_spec.h"
#include "workload/synthetic_workload.h"

namespace pqkv::tools {
namespace {

struct BuildData {
  ModelSpec spec;
  std::vector<float> keys;  // [tokens, kv_heads, head_dim]
};

bool make_data(benchmark::State& state, int64_t tokens, BuildData* out) {
  auto spec = ModelSpec::preset("llama-3.1-8b");
  if (!spec.ok()) {
    state.SkipWithError(spec.status().to_string().c_str());
    return false;
  }
  out->spec = *spec;
  workload::WorkloadOptions wo;
  wo.prompt_tokens = tokens;
  auto wl = workload::SyntheticWorkload::create(*spec, wo);
  if (!wl.ok()) {
    state.SkipWithError(wl.status().to_string().c_str());
    return false;
  }
  out->keys.resize(static_cast<size_t>(tokens) * spec->num_kv_heads * spec->head_dim);
  const Status s = wl->keys(0, 0, tokens, out->keys.data());
  if (!s.ok()) {
    state.SkipWithError(s.to_string().c_str());
    return false;
  }
  return true;
}

// Args: tokens.
void BM_CpuIndexBuild(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  BuildData data;
  if (!make_data(state, tokens, &data)) return;
  const ModelSpec& spec = data.spec;
  const PqConfig config = PqConfig::pqkv_default();
  const TensorView view = host_view(data.keys.data(), {tokens, spec.num_kv_heads, spec.head_dim});
  for (auto _ : state) {
    auto idx = index::make_layer_index(
        Device::cpu(), index::PqShape::from_config(spec.head_dim, config), spec.num_kv_heads);
    Status s = idx.status();
    if (s.ok()) s = (*idx)->train(view, config, Stream::host());
    if (s.ok()) s = (*idx)->add(view, Stream::host());
    if (!s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      break;
    }
  }
  state.SetLabel("train + encode one layer, " + config.to_string());
}

// Args: tokens.
void BM_FaissKmeans(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  BuildData data;
  if (!make_data(state, tokens, &data)) return;
  const ModelSpec& spec = data.spec;
  const PqConfig config = PqConfig::pqkv_default();
  const int m = config.resolved_m(spec.head_dim);
  const int dsub = spec.head_dim / m;
  const faiss::ClusteringParameters params = index::cpu::clustering_parameters(config);
  std::vector<float> x(static_cast<size_t>(tokens) * dsub);
  for (auto _ : state) {
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      for (int j = 0; j < m; ++j) {
        for (int64_t t = 0; t < tokens; ++t) {
          const float* src =
              data.keys.data() + (t * spec.num_kv_heads + h) * spec.head_dim + j * dsub;
          std::copy(src, src + dsub, x.data() + t * dsub);
        }
        faiss::Clustering clustering(dsub, config.num_centroids(), params);
        faiss::IndexFlatL2 assign(dsub);
        clustering.train(tokens, x.data(), assign);
        benchmark::DoNotOptimize(clustering.centroids.data());
      }
    }
  }
  state.SetLabel("Faiss k-means alone, every KV head and sub-space of one layer");
}

BENCHMARK(BM_CpuIndexBuild)
    ->ArgNames({"tokens"})
    ->Arg(1024)
    ->Arg(4096)
    ->Iterations(3)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_FaissKmeans)
    ->ArgNames({"tokens"})
    ->Arg(1024)
    ->Arg(4096)
    ->Iterations(3)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace pqkv::tools
