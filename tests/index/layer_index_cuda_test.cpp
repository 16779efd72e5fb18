// The CUDA index against the CPU reference: codes, scores, top-k sets, k-means
// objective against Faiss, CUDA-graph replay, and bad input. Every test skips
// without a GPU.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <faiss/impl/ProductQuantizer.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/cuda_handles.h"
#include "index/cpu/kmeans_cpu.h"
#include "index/cpu/pq_search_cpu.h"
#include "index/cuda/layer_index_cuda.h"
#include "index/cuda/pq_search.cuh"
#include "index_test_util.h"

namespace pqkv::testing {
namespace {

using index::LayerCodebook;
using index::LayerIndexCuda;
using index::PqShape;
using index::SearchRequest;

#define ASSERT_OK(expr)                              \
  do {                                               \
    const ::pqkv::Status assert_ok_status_ = (expr); \
    PQKV_ASSERT_OK(assert_ok_status_);               \
  } while (0)

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A stream per test, and device copies of host vectors that live as long as it.
class CudaIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PQKV_SKIP_IF_NO_GPU();
    ASSERT_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      buffers_.clear();
      EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
      cudaStreamDestroy(stream_);
    }
  }

  template <class T>
  T* upload(const std::vector<T>& host) {
    auto made = gpu::DeviceArray<std::byte>::allocate(
        std::max<int64_t>(1, int64_t(host.size() * sizeof(T))), stream_);
    PQKV_EXPECT_OK(made);
    auto* p = reinterpret_cast<T*>(made->get());
    EXPECT_EQ(
        cudaMemcpyAsync(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream_),
        cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    buffers_.push_back(std::move(made).value());
    return p;
  }
  template <class T>
  T* device_buffer(int64_t count) {
    return upload(std::vector<T>(static_cast<size_t>(count)));
  }
  template <class T>
  std::vector<T> download(const T* p, int64_t count) {
    std::vector<T> host(static_cast<size_t>(count));
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), p, host.size() * sizeof(T), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return host;
  }

  Stream stream() const { return Stream::cuda(stream_); }

  std::unique_ptr<LayerIndexCuda> make_index(const PqShape& shape, int kv_heads) {
    auto made = LayerIndexCuda::create(Device::cuda(0), shape, kv_heads);
    PQKV_EXPECT_OK(made);
    return made.ok() ? std::move(made).value() : nullptr;
  }

  cudaStream_t stream_ = nullptr;
  std::vector<gpu::DeviceArray<std::byte>> buffers_;
};

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = float_to_bf16(v[i]);
  return out;
}

std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = bf16_to_float(v[i]);
  return out;
}

// Squared distance of sub-vector j of key t (head h) to centroid c, in double.
double sub_distance(const LayerCodebook& cb, const std::vector<float>& keys, int kv_heads,
                    int64_t t, int h, int j, int c) {
  const auto& s = cb.shape;
  const float* x = keys.data() + (t * kv_heads + h) * s.head_dim + j * s.dsub();
  const float* y = cb.sub(h, j) + int64_t{c} * s.dsub();
  double d2 = 0;
  for (int d = 0; d < s.dsub(); ++d)
    d2 += (double(x[d]) - y[d]) * (double(x[d]) - y[d]);
  return d2;
}

struct Geometry {
  int kv_heads;
  int group;
  int head_dim;
  int m;
  int bits;
  std::string to_string() const {
    return "kv_heads=" + std::to_string(kv_heads) + " group=" + std::to_string(group) +
           " head_dim=" + std::to_string(head_dim) + " m=" + std::to_string(m) +
           " bits=" + std::to_string(bits);
  }
};

// Same codebook: GPU codes equal the CPU encoder's codes (ties aside), added
// one token, a decode-sized batch, and a prefill-sized batch at a time, in fp32
// and bf16.
TEST_F(CudaIndexTest, CodesEqualCpuCodes) {
  const uint64_t seed = 101;
  for (const Geometry geo :
       {Geometry{2, 2, 32, 4, 6}, Geometry{3, 1, 64, 2, 8}, Geometry{1, 4, 128, 8, 5}}) {
    for (const bool bf16 : {false, true}) {
      SCOPED_TRACE("seed=" + std::to_string(seed) + " " + geo.to_string() +
                   (bf16 ? " bf16 keys" : " fp32 keys"));
      const PqConfig config = small_config(geo.m, geo.bits);
      const int64_t train_n = 400;
      const auto train_keys = clustered_keys(train_n, geo.kv_heads, geo.head_dim, seed);
      auto cpu = trained_index(train_keys, train_n, geo.kv_heads, geo.head_dim, config);
      auto codebook = cpu->codebook();
      PQKV_ASSERT_OK(codebook);

      auto gpu = make_index(codebook->shape, geo.kv_heads);
      ASSERT_NE(gpu, nullptr);
      ASSERT_OK(gpu->set_codebook(*codebook, stream()));
      auto cpu_only = index::make_layer_index(Device::cpu(), codebook->shape, geo.kv_heads);
      PQKV_ASSERT_OK(cpu_only);
      ASSERT_OK((*cpu_only)->set_codebook(*codebook, Stream::host()));

      std::vector<float> all;  // keys as both sides saw them
      for (const int64_t n : {int64_t{1}, int64_t{17}, int64_t{97}}) {
        auto keys = clustered_keys(n, geo.kv_heads, geo.head_dim, seed + n);
        TensorView gpu_view;
        std::vector<uint16_t> half;
        if (bf16) {
          half = to_bf16(keys);
          keys = from_bf16(half);
          gpu_view = TensorView(upload(half), DType::kBF16, Device::cuda(0),
                                {n, geo.kv_heads, geo.head_dim});
        } else {
          gpu_view = TensorView(upload(keys), DType::kF32, Device::cuda(0),
                                {n, geo.kv_heads, geo.head_dim});
        }
        ASSERT_OK(gpu->add(gpu_view, stream()));
        ASSERT_OK((*cpu_only)->add(host_view(keys.data(), {n, geo.kv_heads, geo.head_dim}),
                                   Stream::host()));
        all.insert(all.end(), keys.begin(), keys.end());
      }
      ASSERT_EQ(gpu->num_tokens(), 115);
      for (int h = 0; h < geo.kv_heads; ++h) {
        const auto ours = all_codes(*gpu, h);
        const auto ref = all_codes(**cpu_only, h);
        for (int64_t t = 0; t < gpu->num_tokens(); ++t) {
          for (int j = 0; j < geo.m; ++j) {
            const int a = ours[t * geo.m + j];
            const int b = ref[t * geo.m + j];
            if (a == b) continue;
            const double da = sub_distance(*codebook, all, geo.kv_heads, t, h, j, a);
            const double db = sub_distance(*codebook, all, geo.kv_heads, t, h, j, b);
            EXPECT_NEAR(da, db, 1e-5 * (db + 1e-6))
                << "token " << t << " head " << h << " sub-space " << j << ": GPU code " << a
                << ", CPU code " << b << " are not a tie";
          }
        }
      }
    }
  }
}

struct SearchCase {
  Geometry geo;
  int64_t tokens;
  int64_t begin;
  int64_t end;
  int64_t k;
  GqaAggregation aggregation;
  bool bf16_queries;
  std::string to_string() const {
    return geo.to_string() + " tokens=" + std::to_string(tokens) + " range=[" +
           std::to_string(begin) + "," + std::to_string(end) + ") k=" + std::to_string(k) +
           " aggregation=" + gqa_aggregation_name(aggregation) +
           (bf16_queries ? " bf16 queries" : " fp32 queries");
  }
};

std::vector<SearchCase> search_cases() {
  const auto sum = GqaAggregation::kSoftmaxSum;
  const auto max = GqaAggregation::kMax;
  return {
      {{2, 4, 128, 2, 6}, 1, 0, 1, 1, sum, false},
      {{2, 4, 128, 2, 6}, 17, 0, 17, 5, sum, false},
      {{2, 4, 128, 2, 6}, 97, 3, 97, 10, max, false},
      {{2, 4, 128, 4, 8}, 97, 0, 97, 200, sum, true},
      {{8, 4, 128, 4, 8}, 5000, 32, 4900, 250, sum, false},
      {{3, 8, 64, 4, 8}, 3001, 0, 3001, 150, max, false},
      {{2, 7, 64, 2, 6}, 1000, 10, 1000, 33, sum, true},
      {{2, 1, 64, 8, 4}, 777, 0, 777, 1, sum, false},
      {{2, 4, 128, 2, 6}, 70001, 32, 70001, 3500, sum, false},
      // The persistent kernel's shapes: the benchmarked one (Llama-3.1-8B,
      // 128K tokens, 5% top-k), groups of 5 and 8, 16 sub-spaces of 256
      // centroids (64 KB of LUTs a block), odd sizes.
      {{8, 4, 128, 4, 8}, 131072, 0, 131072, 6554, sum, true},
      {{2, 5, 64, 2, 6}, 60013, 1, 60013, 1201, sum, true},
      {{2, 8, 128, 8, 6}, 30011, 0, 30011, 1500, max, false},
      {{2, 4, 64, 16, 8}, 9001, 5, 9001, 450, sum, false},
  };
}

class CudaSearchTest : public CudaIndexTest, public ::testing::WithParamInterface<SearchCase> {};

// Same codebook and codes: aggregated scores agree with the CPU reference's
// within float tolerance, and the top-k sets agree up to ties at the boundary.
TEST_P(CudaSearchTest, ScoresAndTopKMatchCpuReference) {
  const SearchCase c = GetParam();
  const uint64_t seed = 2024 + c.tokens;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + c.to_string());
  const Geometry& geo = c.geo;
  const int q_heads = geo.kv_heads * geo.group;
  const PqConfig config = small_config(geo.m, geo.bits);
  const int64_t train_n = std::min<int64_t>(c.tokens, 2000);
  const auto keys = clustered_keys(c.tokens, geo.kv_heads, geo.head_dim, seed);
  const auto train_keys =
      std::vector<float>(keys.begin(), keys.begin() + train_n * geo.kv_heads * geo.head_dim);
  auto cpu = trained_index(train_keys, train_n, geo.kv_heads, geo.head_dim, config);
  auto codebook = cpu->codebook();
  PQKV_ASSERT_OK(codebook);

  auto gpu = make_index(codebook->shape, geo.kv_heads);
  ASSERT_NE(gpu, nullptr);
  ASSERT_OK(gpu->set_codebook(*codebook, stream()));
  ASSERT_OK(gpu->add(TensorView(upload(keys), DType::kF32, Device::cuda(0),
                                {c.tokens, geo.kv_heads, geo.head_dim}),
                     stream()));

  auto queries = random_floats(size_t(q_heads) * geo.head_dim, seed + 1, 2.0f);
  TensorView qview;
  if (c.bf16_queries) {
    const auto half = to_bf16(queries);
    queries = from_bf16(half);
    qview = TensorView(upload(half), DType::kBF16, Device::cuda(0), {q_heads, geo.head_dim});
  } else {
    qview = TensorView(upload(queries), DType::kF32, Device::cuda(0), {q_heads, geo.head_dim});
  }
  const int64_t kept = index::cpu::clamped_k(c.k, c.begin, c.end);
  int32_t* out = device_buffer<int32_t>(std::max<int64_t>(1, geo.kv_heads * kept));
  SearchRequest request{qview, c.begin, c.end, c.k, c.aggregation};
  ASSERT_OK(gpu->search(request, out, stream(), nullptr));
  const auto picked = download(out, geo.kv_heads * kept);

  // The CPU reference over the GPU's own codes.
  std::vector<std::vector<uint8_t>> codes;
  index::cpu::SearchInputs inputs;
  inputs.codebook = &*codebook;
  for (int h = 0; h < geo.kv_heads; ++h)
    codes.push_back(all_codes(*gpu, h));
  for (const auto& h : codes)
    inputs.codes.push_back(h.data());
  inputs.queries = queries.data();
  inputs.q_heads = q_heads;
  inputs.begin = c.begin;
  inputs.end = c.end;
  inputs.aggregation = c.aggregation;
  const auto ref_scores = index::cpu::score_layer(inputs);
  const int64_t count = c.end - c.begin;

  // Scores, read back from the search's workspace through the launcher API:
  // the multi-kernel path leaves them there. The index ran the persistent
  // kernel where it covers the shape; the launcher's persistent path gives
  // its positions, and the multi-kernel path a top-k of the same scores up to
  // the order of the softmax denominators' additions (checked below).
  auto ws =
      index::cuda::SearchWorkspace::allocate(geo.kv_heads, geo.m, 1 << geo.bits, c.tokens, stream_);
  PQKV_ASSERT_OK(ws);
  index::cuda::PqSearchArgs args;
  args.shape = {q_heads, geo.kv_heads, geo.head_dim, geo.m, 1 << geo.bits};
  args.queries = qview.data;
  args.query_dtype = qview.dtype;
  args.centroids = upload(codebook->centroids);
  std::vector<uint8_t> flat;
  for (const auto& h : codes)
    flat.insert(flat.end(), h.begin(), h.end());
  args.codes = upload(flat);
  args.head_stride = c.tokens * geo.m;
  int32_t* out2 = device_buffer<int32_t>(std::max<int64_t>(1, geo.kv_heads * kept));
  args.request = {c.begin, c.end, kept, c.aggregation, out2};
  ASSERT_OK(index::cuda::launch_pq_search(args, ws->view(), stream_));
  const auto picked_fused = download(out2, geo.kv_heads * kept);
  EXPECT_EQ(picked_fused, picked) << "the launcher and the index disagree";
  args.fused = false;
  ASSERT_OK(index::cuda::launch_pq_search(args, ws->view(), stream_));
  const auto picked_kernels = download(out2, geo.kv_heads * kept);

  for (int h = 0; h < geo.kv_heads; ++h) {
    SCOPED_TRACE("KV head " + std::to_string(h));
    const auto bits = download(ws->view().scores + h * ws->view().score_stride, count);
    const float* ref = ref_scores.data() + h * count;
    float max_ref = 0;
    int bad = 0;
    for (int64_t i = 0; i < count; ++i) {
      float ours;
      std::memcpy(&ours, &bits[i], 4);
      max_ref = std::max(max_ref, ref[i]);
      if (!(std::fabs(ours - ref[i]) <= 2e-5f * std::fabs(ref[i]) + 1e-12f) && bad++ < 5) {
        ADD_FAILURE() << "score of token " << c.begin + i << ": GPU " << ours << ", CPU " << ref[i];
      }
    }
    EXPECT_EQ(bad, 0) << "scores beyond tolerance";
    const Status top = index::cpu::verify_top_k(ref, count, c.begin, kept, picked.data() + h * kept,
                                                2e-5f * max_ref);
    PQKV_EXPECT_OK(top);
    const Status top_kernels = index::cpu::verify_top_k(
        ref, count, c.begin, kept, picked_kernels.data() + h * kept, 2e-5f * max_ref);
    EXPECT_TRUE(top_kernels.ok()) << "multi-kernel path: " << top_kernels.to_string();
    EXPECT_TRUE(std::is_sorted(picked.begin() + h * kept, picked.begin() + (h + 1) * kept))
        << "positions are written in increasing order";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaSearchTest, ::testing::ValuesIn(search_cases()));

// The persistent PQ search on a share of the SMs: its blocks build a KV head's
// LUTs between them (a share of the entries each, several staged chunks when
// the blocks are few), so each share splits the LUTs and the tokens
// differently. Every share's top-k agrees with the CPU reference up to ties
// at the boundary, down to a share where a block holds thousands of tokens.
TEST_F(CudaIndexTest, PersistentPqSearchOnAShareOfTheSmsMatchesCpu) {
  struct Case {
    Geometry geo;
    int64_t tokens;
    int64_t k;
    GqaAggregation aggregation;
  };
  for (const Case c : {Case{{2, 4, 128, 2, 8}, 20011, 1000, GqaAggregation::kSoftmaxSum},
                       Case{{3, 5, 64, 16, 6}, 9001, 451, GqaAggregation::kMax},
                       Case{{2, 8, 128, 4, 8}, 7919, 397, GqaAggregation::kSoftmaxSum}}) {
    const Geometry& geo = c.geo;
    const uint64_t seed = 900 + c.tokens;
    SCOPED_TRACE("seed=" + std::to_string(seed) + " " + geo.to_string() +
                 " tokens=" + std::to_string(c.tokens) + " k=" + std::to_string(c.k));
    const int q_heads = geo.kv_heads * geo.group;
    const auto keys = clustered_keys(c.tokens, geo.kv_heads, geo.head_dim, seed);
    const int64_t train_n = std::min<int64_t>(c.tokens, 2000);
    const auto train_keys =
        std::vector<float>(keys.begin(), keys.begin() + train_n * geo.kv_heads * geo.head_dim);
    auto cpu = trained_index(train_keys, train_n, geo.kv_heads, geo.head_dim,
                             small_config(geo.m, geo.bits));
    auto codebook = cpu->codebook();
    PQKV_ASSERT_OK(codebook);
    auto gpu = make_index(codebook->shape, geo.kv_heads);
    ASSERT_NE(gpu, nullptr);
    ASSERT_OK(gpu->set_codebook(*codebook, stream()));
    ASSERT_OK(gpu->add(TensorView(upload(keys), DType::kF32, Device::cuda(0),
                                  {c.tokens, geo.kv_heads, geo.head_dim}),
                       stream()));
    const auto queries = random_floats(size_t(q_heads) * geo.head_dim, seed + 1, 2.0f);
    const TensorView qview(upload(queries), DType::kF32, Device::cuda(0), {q_heads, geo.head_dim});

    std::vector<std::vector<uint8_t>> codes;
    index::cpu::SearchInputs inputs;
    inputs.codebook = &*codebook;
    for (int h = 0; h < geo.kv_heads; ++h)
      codes.push_back(all_codes(*gpu, h));
    for (const auto& h : codes)
      inputs.codes.push_back(h.data());
    inputs.queries = queries.data();
    inputs.q_heads = q_heads;
    inputs.begin = 0;
    inputs.end = c.tokens;
    inputs.aggregation = c.aggregation;
    const auto ref = index::cpu::score_layer(inputs);

    int32_t* out = device_buffer<int32_t>(geo.kv_heads * c.k);
    for (const float share : {1.0f, 0.25f, 0.05f, 0.0f}) {
      SCOPED_TRACE("sm_share " + std::to_string(share));
      SearchRequest request{qview, 0, c.tokens, c.k, c.aggregation};
      request.sm_share = share;
      ASSERT_OK(gpu->search(request, out, stream(), nullptr));
      const auto picked = download(out, geo.kv_heads * c.k);
      for (int h = 0; h < geo.kv_heads; ++h) {
        SCOPED_TRACE("KV head " + std::to_string(h));
        const float* scores = ref.data() + h * c.tokens;
        const float top = *std::max_element(scores, scores + c.tokens);
        const Status s = index::cpu::verify_top_k(scores, c.tokens, 0, c.k, picked.data() + h * c.k,
                                                  2e-5f * top);
        EXPECT_TRUE(s.ok()) << s.to_string();
        EXPECT_TRUE(std::is_sorted(picked.begin() + h * c.k, picked.begin() + (h + 1) * c.k))
            << "positions are written in increasing order";
      }
    }
  }
}

// Exact ties (duplicate codes) keep the lower positions, as the CPU does.
TEST_F(CudaIndexTest, TiesKeepLowerPositions) {
  const Geometry geo{1, 2, 32, 2, 4};
  SCOPED_TRACE(geo.to_string());
  LayerCodebook cb;
  cb.shape = {geo.head_dim, geo.m, geo.bits};
  cb.num_kv_heads = 1;
  cb.centroids = random_floats(size_t(cb.floats_per_head()), 5);
  auto gpu = make_index(cb.shape, 1);
  ASSERT_OK(gpu->set_codebook(cb, stream()));
  // 40 copies of one key: all scores equal.
  std::vector<float> one = random_floats(geo.head_dim, 6);
  std::vector<float> keys;
  for (int i = 0; i < 40; ++i)
    keys.insert(keys.end(), one.begin(), one.end());
  ASSERT_OK(gpu->add(TensorView(upload(keys), DType::kF32, Device::cuda(0), {40, 1, geo.head_dim}),
                     stream()));
  const auto q = random_floats(size_t(geo.group) * geo.head_dim, 7);
  int32_t* out = device_buffer<int32_t>(7);
  SearchRequest request{
      TensorView(upload(q), DType::kF32, Device::cuda(0), {geo.group, geo.head_dim}), 5, 40, 7};
  ASSERT_OK(gpu->search(request, out, stream(), nullptr));
  EXPECT_EQ(download(out, 7), (std::vector<int32_t>{5, 6, 7, 8, 9, 10, 11}));
}

// Tokens that repeat a few keys tie in groups: the persistent kernel and the
// multi-kernel path keep the same positions (the lowest of the tied group at
// the boundary), whether the k-th best's bucket fits the persistent search's
// list of candidates (7 keys over 5000 tokens), overflows it (3 keys over
// 70001 tokens), or the group has no room for one (one query head a KV head).
// With queries scaled up, only the groups that some head scores best have a
// probability above 0: with k past those, the k-th best falls in the first
// radix pass's lowest bucket, which holds every score under 2^-61 and is
// refined over all 31 bits (from the list, and past it).
TEST_F(CudaIndexTest, PersistentAndKernelPathsKeepTheSameTies) {
  struct Case {
    int group;
    int64_t tokens;
    int distinct;
    int64_t k;
    float query_scale;
  };
  for (const Case c : {Case{4, 5000, 7, 250, 2.0f}, Case{4, 70001, 3, 3500, 2.0f},
                       Case{1, 20011, 5, 999, 2.0f}, Case{4, 5000, 7, 4500, 400.0f},
                       Case{4, 20011, 5, 18000, 400.0f}, Case{1, 70001, 3, 50000, 400.0f}}) {
    const Geometry geo{2, c.group, 64, 4, 8};
    const uint64_t seed = 300 + c.tokens;
    SCOPED_TRACE("seed=" + std::to_string(seed) + " " + geo.to_string() +
                 " tokens=" + std::to_string(c.tokens) + " distinct keys " +
                 std::to_string(c.distinct) + " query scale " + std::to_string(c.query_scale));
    LayerCodebook cb;
    cb.shape = {geo.head_dim, geo.m, geo.bits};
    cb.num_kv_heads = geo.kv_heads;
    cb.centroids = random_floats(size_t(cb.floats_per_head()) * geo.kv_heads, seed);
    auto gpu = make_index(cb.shape, geo.kv_heads);
    ASSERT_NE(gpu, nullptr);
    ASSERT_OK(gpu->set_codebook(cb, stream()));
    const auto base = random_floats(size_t(c.distinct) * geo.kv_heads * geo.head_dim, seed + 1);
    std::vector<float> keys;
    keys.reserve(size_t(c.tokens) * geo.kv_heads * geo.head_dim);
    for (int64_t t = 0; t < c.tokens; ++t) {
      const auto* row = base.data() + (t * 7 % c.distinct) * geo.kv_heads * geo.head_dim;
      keys.insert(keys.end(), row, row + geo.kv_heads * geo.head_dim);
    }
    ASSERT_OK(gpu->add(TensorView(upload(keys), DType::kF32, Device::cuda(0),
                                  {c.tokens, geo.kv_heads, geo.head_dim}),
                       stream()));
    const int q_heads = geo.kv_heads * geo.group;
    const auto q = random_floats(size_t(q_heads) * geo.head_dim, seed + 2, c.query_scale);
    const TensorView qview(upload(q), DType::kF32, Device::cuda(0), {q_heads, geo.head_dim});
    int32_t* out = device_buffer<int32_t>(geo.kv_heads * c.k);
    ASSERT_OK(gpu->search({qview, 0, c.tokens, c.k}, out, stream(), nullptr));
    const auto fused = download(out, geo.kv_heads * c.k);
    SearchRequest kernels_request{qview, 0, c.tokens, c.k};
    kernels_request.sm_share = 0.0f;  // the multi-kernel path
    ASSERT_OK(gpu->search(kernels_request, out, stream(), nullptr));
    const auto kernels = download(out, geo.kv_heads * c.k);
    EXPECT_EQ(fused, kernels);
    for (int h = 0; h < geo.kv_heads; ++h) {
      EXPECT_TRUE(std::is_sorted(fused.begin() + h * c.k, fused.begin() + (h + 1) * c.k))
          << "positions are written in increasing order";
    }
  }
}

// k-means on the GPU reaches Faiss's objective (within 2%) on the same keys and
// iterations, and reports the real objective of its centroids.
TEST_F(CudaIndexTest, KmeansObjectiveWithinTwoPercentOfFaiss) {
  struct Case {
    int head_dim, m, bits, iters;
    int64_t n;
    int max_points;
  };
  const int kv_heads = 2;
  for (const Case c : {Case{128, 2, 6, 20, 4000, 0}, Case{64, 4, 8, 10, 6000, 0},
                       Case{128, 4, 8, 20, 20000, 64}, Case{32, 2, 6, 8, 40, 0}}) {
    const uint64_t seed = 11;
    SCOPED_TRACE("seed=" + std::to_string(seed) + " head_dim=" + std::to_string(c.head_dim) +
                 " m=" + std::to_string(c.m) + " bits=" + std::to_string(c.bits) +
                 " iters=" + std::to_string(c.iters) + " n=" + std::to_string(c.n) +
                 " max_points=" + std::to_string(c.max_points));
    const auto keys = clustered_keys(c.n, kv_heads, c.head_dim, seed);
    PqConfig config = small_config(c.m, c.bits, c.iters);
    config.max_train_points_per_centroid = c.max_points;
    auto gpu = make_index(PqShape::from_config(c.head_dim, config), kv_heads);
    ASSERT_OK(gpu->train(
        TensorView(upload(keys), DType::kF32, Device::cuda(0), {c.n, kv_heads, c.head_dim}), config,
        stream()));
    auto cb = gpu->codebook();
    PQKV_ASSERT_OK(cb);
    PQKV_ASSERT_OK(cb->validate());
    ASSERT_EQ(cb->objective.size(), size_t(kv_heads * c.m));
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<float> x(size_t(c.n) * c.head_dim);
      for (int64_t t = 0; t < c.n; ++t) {
        std::copy_n(keys.begin() + (t * kv_heads + h) * c.head_dim, c.head_dim,
                    x.begin() + t * c.head_dim);
      }
      double ours = 0;
      double recomputed = 0;
      for (int j = 0; j < c.m; ++j)
        ours += cb->objective[h * c.m + j];
      for (int64_t t = 0; t < c.n; ++t) {
        for (int j = 0; j < c.m; ++j) {
          double best = INFINITY;
          for (int k = 0; k < (1 << c.bits); ++k) {
            best = std::min(best, sub_distance(*cb, keys, kv_heads, t, h, j, k));
          }
          recomputed += best;
        }
      }
      EXPECT_NEAR(ours, recomputed, 1e-4 * recomputed + 1e-9) << "KV head " << h;
      if (c.n <= (1 << c.bits)) {
        EXPECT_EQ(ours, 0.0) << "every key is a centroid";
        continue;
      }
      faiss::ProductQuantizer pq(c.head_dim, c.m, c.bits);
      pq.cp = index::cpu::clustering_parameters(config);
      pq.verbose = false;
      pq.train(c.n, x.data());
      std::vector<uint8_t> codes(static_cast<size_t>(c.n) * pq.code_size);
      pq.compute_codes(x.data(), codes.data(), c.n);
      std::vector<float> decoded(x.size());
      pq.decode(codes.data(), decoded.data(), c.n);
      double faiss_objective = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        faiss_objective += (double(x[i]) - decoded[i]) * (double(x[i]) - decoded[i]);
      }
      EXPECT_LE(ours, 1.02 * faiss_objective) << "KV head " << h << ": Faiss " << faiss_objective;
      std::printf("[ kmeans   ] %s head %d: GPU objective %.6g, Faiss %.6g (ratio %.4f)\n",
                  ("head_dim=" + std::to_string(c.head_dim) + " m=" + std::to_string(c.m) +
                   " b=" + std::to_string(c.bits) + " n=" + std::to_string(c.n))
                      .c_str(),
                  h, ours, faiss_objective, ours / faiss_objective);
    }
  }
}

// A new codebook drops the held codes; training twice with one seed gives the
// same objective.
TEST_F(CudaIndexTest, NewCodebookDropsCodesAndTrainingIsSeeded) {
  const Geometry geo{2, 2, 64, 4, 6};
  const uint64_t seed = 33;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + geo.to_string());
  const int64_t n = 1500;
  const auto keys = clustered_keys(n, geo.kv_heads, geo.head_dim, seed);
  const TensorView view(upload(keys), DType::kF32, Device::cuda(0),
                        {n, geo.kv_heads, geo.head_dim});
  PqConfig config = small_config(geo.m, geo.bits, 10);
  auto gpu = make_index(PqShape::from_config(geo.head_dim, config), geo.kv_heads);
  ASSERT_OK(gpu->train(view, config, stream()));
  ASSERT_OK(gpu->add(view, stream()));
  auto first = gpu->codebook();
  PQKV_ASSERT_OK(first);

  auto other = make_index(PqShape::from_config(geo.head_dim, config), geo.kv_heads);
  ASSERT_OK(other->train(view, config, stream()));
  auto again = other->codebook();
  PQKV_ASSERT_OK(again);
  // Float atomics sum in any order, so equal seeds give codebooks equal up to
  // rounding (and, rarely, a point that flips between two near centroids).
  for (size_t p = 0; p < first->objective.size(); ++p) {
    EXPECT_NEAR(first->objective[p], again->objective[p], 5e-3 * first->objective[p])
        << "same seed, same keys: problem " << p;
  }

  // Install a different codebook: the held codes are dropped, and keys added
  // again encode as in an index that had that codebook from the start.
  LayerCodebook cb = *first;
  cb.centroids = random_floats(cb.centroids.size(), seed + 1);
  cb.objective.clear();
  ASSERT_OK(gpu->set_codebook(cb, stream()));
  EXPECT_EQ(gpu->num_tokens(), 0);
  auto installed = gpu->codebook();
  PQKV_ASSERT_OK(installed);
  EXPECT_EQ(installed->centroids, cb.centroids);
  EXPECT_TRUE(installed->objective.empty());
  ASSERT_OK(gpu->add(view, stream()));
  auto fresh = make_index(PqShape::from_config(geo.head_dim, config), geo.kv_heads);
  ASSERT_OK(fresh->set_codebook(cb, stream()));
  ASSERT_OK(fresh->add(view, stream()));
  for (int h = 0; h < geo.kv_heads; ++h)
    EXPECT_EQ(all_codes(*gpu, h), all_codes(*fresh, h));
}

// A search captured in a CUDA graph and replayed (with new query values in
// the same buffer) gives what a direct search gives.
TEST_F(CudaIndexTest, GraphReplayEqualsDirectSearch) {
  const Geometry geo{8, 4, 128, 4, 8};
  const uint64_t seed = 77;
  SCOPED_TRACE("seed=" + std::to_string(seed) + " " + geo.to_string());
  const int q_heads = geo.kv_heads * geo.group;
  const int64_t n = 20000;
  const int64_t k = 1000;
  const auto keys = clustered_keys(n, geo.kv_heads, geo.head_dim, seed);
  const TensorView view(upload(keys), DType::kF32, Device::cuda(0),
                        {n, geo.kv_heads, geo.head_dim});
  PqConfig config = small_config(geo.m, geo.bits, 5);
  auto gpu = make_index(PqShape::from_config(geo.head_dim, config), geo.kv_heads);
  ASSERT_OK(gpu->reserve(n, stream()));
  ASSERT_OK(gpu->train(view, config, stream()));
  ASSERT_OK(gpu->add(view, stream()));

  float* q = device_buffer<float>(int64_t{q_heads} * geo.head_dim);
  int32_t* graph_out = device_buffer<int32_t>(geo.kv_heads * k);
  int32_t* direct_out = device_buffer<int32_t>(geo.kv_heads * k);
  const TensorView qview(q, DType::kF32, Device::cuda(0), {q_heads, geo.head_dim});
  const SearchRequest request{qview, 32, n, k, GqaAggregation::kSoftmaxSum};
  ASSERT_CUDA(cudaStreamSynchronize(stream_));
  ASSERT_CUDA(cudaEventSynchronize(gpu->ready_event()));

  cudaGraph_t graph = nullptr;
  ASSERT_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal));
  const Status captured = gpu->search(request, graph_out, stream(), nullptr);
  ASSERT_CUDA(cudaStreamEndCapture(stream_, &graph));
  ASSERT_OK(captured);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));

  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("replay " + std::to_string(step));
    const auto host_q = random_floats(size_t(q_heads) * geo.head_dim, seed + 10 + step, 2.0f);
    ASSERT_CUDA(
        cudaMemcpyAsync(q, host_q.data(), host_q.size() * 4, cudaMemcpyHostToDevice, stream_));
    ASSERT_CUDA(cudaGraphLaunch(exec, stream_));
    ASSERT_OK(gpu->search(request, direct_out, stream(), nullptr));
    EXPECT_EQ(download(graph_out, geo.kv_heads * k), download(direct_out, geo.kv_heads * k));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// Bad input comes back as a Status that says what is wrong.
TEST_F(CudaIndexTest, BadInputIsAStatus) {
  const PqShape shape{64, 2, 6};
  const int kv_heads = 2;
  auto made = index::make_layer_index(Device::cuda(0), shape, kv_heads);
  PQKV_ASSERT_OK(made);
  auto& idx = **made;
  EXPECT_EQ(idx.device(), Device::cuda(0));

  const auto keys = clustered_keys(300, kv_heads, shape.head_dim, 3);
  const TensorView dev_keys(upload(keys), DType::kF32, Device::cuda(0), {300, kv_heads, 64});
  const auto q_host = random_floats(4 * 64, 4);
  const TensorView q(upload(q_host), DType::kF32, Device::cuda(0), {4, 64});
  int32_t* out = device_buffer<int32_t>(64);

  // No index yet.
  EXPECT_EQ(idx.search({q, 0, 0, 1}, out, stream(), nullptr).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx.add(dev_keys, stream()).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(idx.codebook().status().code(), StatusCode::kFailedPrecondition);

  // Codebook of another shape.
  LayerCodebook cb;
  cb.shape = {64, 4, 6};
  cb.num_kv_heads = kv_heads;
  cb.centroids.assign(size_t(kv_heads * cb.floats_per_head()), 0.5f);
  EXPECT_EQ(idx.set_codebook(cb, stream()).code(), StatusCode::kInvalidArgument);
  cb.shape = shape;
  cb.num_kv_heads = 3;
  cb.centroids.assign(size_t(3 * cb.floats_per_head()), 0.5f);
  EXPECT_EQ(idx.set_codebook(cb, stream()).code(), StatusCode::kInvalidArgument);

  // Keys on the host, or of the wrong shape, or a host stream.
  PqConfig config = small_config(2, 6);
  EXPECT_EQ(idx.train(host_view(keys.data(), {300, kv_heads, 64}), config, stream()).code(),
            StatusCode::kInvalidArgument);
  const TensorView lying(const_cast<float*>(keys.data()), DType::kF32, Device::cuda(0),
                         {300, kv_heads, 64});
  const Status host_ptr = idx.train(lying, config, stream());
  EXPECT_EQ(host_ptr.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(host_ptr.message().find("host memory"), std::string::npos) << host_ptr.message();
  EXPECT_EQ(idx.train(TensorView(dev_keys.data, DType::kF32, Device::cuda(0), {300, 3, 64}), config,
                      stream())
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(idx.train(dev_keys, config, Stream::host()).code(), StatusCode::kInvalidArgument);
  config.bits = 5;
  EXPECT_EQ(idx.train(dev_keys, config, stream()).code(), StatusCode::kInvalidArgument);
  config.bits = 6;
  ASSERT_OK(idx.train(dev_keys, config, stream()));
  ASSERT_OK(idx.add(dev_keys, stream()));

  const auto search = [&](const TensorView& queries, int64_t begin, int64_t end, int64_t k,
                          int32_t* dst) {
    return idx.search({queries, begin, end, k}, dst, stream(), nullptr).code();
  };
  EXPECT_EQ(search(q, 0, 300, 8, out), StatusCode::kOk);
  // Query of the wrong shape, dtype or device.
  EXPECT_EQ(search(TensorView(q.data, DType::kF32, Device::cuda(0), {4, 32}), 0, 300, 8, out),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(search(TensorView(q.data, DType::kF32, Device::cuda(0), {3, 64}), 0, 300, 8, out),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(search(TensorView(q.data, DType::kF32, Device::cuda(0), {4, 64, 1}), 0, 300, 8, out),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(search(TensorView(q.data, DType::kF16, Device::cuda(0), {4, 64}), 0, 300, 8, out),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(search(TensorView(q.data, DType::kF32, Device::cuda(0), {18 * 2, 64}), 0, 300, 8, out),
            StatusCode::kUnimplemented);
  EXPECT_EQ(search(host_view(q_host.data(), {4, 64}), 0, 300, 8, out),
            StatusCode::kInvalidArgument);
  const Status host_q =
      idx.search({TensorView(q_host.data(), DType::kF32, Device::cuda(0), {4, 64}), 0, 300, 8}, out,
                 stream(), nullptr);
  EXPECT_EQ(host_q.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(host_q.message().find("host memory"), std::string::npos) << host_q.message();
  // Output on the host, bad ranges and k.
  std::vector<int32_t> host_out(64);
  EXPECT_EQ(search(q, 0, 300, 8, host_out.data()), StatusCode::kInvalidArgument);
  EXPECT_EQ(search(q, 0, 300, 8, nullptr), StatusCode::kInvalidArgument);
  EXPECT_EQ(search(q, 0, 301, 8, out), StatusCode::kInvalidArgument);
  EXPECT_EQ(search(q, 5, 4, 8, out), StatusCode::kInvalidArgument);
  EXPECT_EQ(search(q, 0, 300, -1, out), StatusCode::kInvalidArgument);
  EXPECT_EQ(search(q, 0, 300, 0, nullptr), StatusCode::kOk);
  EXPECT_EQ(search(q, 7, 7, 4, nullptr), StatusCode::kOk);
  // Codes: bad head and range.
  std::vector<uint8_t> codes(600);
  EXPECT_EQ(idx.copy_codes(2, 0, 1, codes.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(idx.copy_codes(0, 0, 301, codes.data()).code(), StatusCode::kInvalidArgument);
  ASSERT_CUDA(cudaStreamSynchronize(stream_));
  ASSERT_CUDA(cudaGetLastError());
}

}  // namespace
}  // namespace pqkv::testing
#endif  // PQKV_HAVE_CUDA
