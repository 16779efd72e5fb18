// The block cache wired into the decode step (StoreOptions::block_cache_bytes):
// over many decode steps, with the context growing through partly written
// blocks and a cache small enough to evict and reuse slots, a sequence with
// the cache attends exactly as one without it, and its trace moves the hits
// from DRAM to the cache. On the CPU (the reference) always; on a GPU the
// same against the CUDA store without the cache and against the CPU store.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "engine_test_util.h"

namespace pqkv {
namespace {

using testing::random_floats;
using testing::relative_error;

// Sink 8, a window of 16 tokens, top-64: the middle ends inside the last,
// partly written block at most steps.
SequenceOptions cache_sequence_options() {
  SequenceOptions o;
  o.budget.sink = {8, 0};
  o.budget.window = {16, 0};
  o.budget.top_k = {64, 0};
  return o;
}

struct Opened {
  std::unique_ptr<Store> store;
  Sequence* seq = nullptr;
};

Opened open_store(const ModelSpec& spec, Device device, int64_t cache_blocks, int64_t block_tokens,
                  int admit_steps = 1) {
  StoreOptions o;
  o.spec = spec;
  o.device = device;
  o.block_cache_tokens = block_tokens;
  o.block_cache_bytes = cache_blocks * block_tokens * spec.row_bytes();
  o.block_cache_aging_steps = 4;
  o.block_cache_admit_steps = admit_steps;
  auto store = Store::open(o);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  Opened g;
  g.store = std::move(store).value();
  auto seq = g.store->create_sequence("s", cache_sequence_options());
  EXPECT_TRUE(seq.ok()) << seq.status().to_string();
  g.seq = seq.value().get();
  return g;
}

struct Tokens {
  int64_t n = 0;
  std::vector<float> keys, values;  // [layer][n, kv_heads, d]
};

Status append(Sequence* seq, const Tokens& t, int layer, int64_t first, int64_t count) {
  const ModelSpec& spec = seq->spec();
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  const int64_t base = (layer * t.n + first) * kv * d;
  return seq->append(layer, host_view(t.keys.data() + base, {count, kv, d}),
                     host_view(t.values.data() + base, {count, kv, d}), Stream::host());
}

struct Check {
  int64_t prompt = 0;
  int steps = 0;
  int64_t cache_blocks = 0;
  int64_t block_tokens = 64;
  uint64_t seed = 0;
};

// Decodes on `cached` (with a cache) and `plain` (without), same tokens and
// queries; the queries of a layer repeat from step to step, so picks recur
// and blocks hit. Every step must give the same output bit for bit where
// both attended the same tokens; `reference` (may be null: none) is a
// store of another backend compared within a tolerance. Returns the hits.
int64_t decode_and_compare(const ModelSpec& spec, const Check& c, Opened& cached, Opened& plain,
                           Opened* reference) {
  SCOPED_TRACE("seed " + std::to_string(c.seed) + ", prompt " + std::to_string(c.prompt) + ", " +
               std::to_string(c.steps) + " steps, " + std::to_string(c.cache_blocks) +
               " cache blocks of " + std::to_string(c.block_tokens) + " tokens");
  const int kv = spec.num_kv_heads;
  const int d = spec.head_dim;
  const int64_t total = c.prompt + c.steps;
  const int64_t per = total * kv * d * spec.num_layers;
  const Tokens t{total, random_floats(per, c.seed), random_floats(per, c.seed + 1)};
  std::vector<Opened*> all = {&cached, &plain};
  if (reference != nullptr) all.push_back(reference);
  for (Opened* o : all) {
    EXPECT_TRUE(o->seq->reserve(total).ok());
    for (int l = 0; l < spec.num_layers; ++l) {
      const Status s = append(o->seq, t, l, 0, c.prompt);
      EXPECT_TRUE(s.ok()) << s.to_string();
    }
    const Status s = o->seq->finish_prefill();
    EXPECT_TRUE(s.ok()) << s.to_string();
  }
  int64_t hits = 0;
  int same = 0;
  for (int step = 0; step <= c.steps; ++step) {
    for (int l = 0; l < spec.num_layers; ++l) {
      if (step > 0) {
        for (Opened* o : all) {
          const Status s = append(o->seq, t, l, c.prompt + step - 1, 1);
          EXPECT_TRUE(s.ok()) << s.to_string();
        }
      }
      auto q = random_floats(int64_t{spec.num_q_heads} * d, c.seed * 31 + l);
      // A small drift, so the picks change a little from step to step.
      const auto drift = random_floats(q.size(), c.seed * 131 + step * 7 + l, 0.05f);
      for (size_t i = 0; i < q.size(); ++i)
        q[i] += drift[i];
      std::vector<float> a(q.size()), b(q.size()), r(q.size());
      AttendTrace ta, tb, tr;
      const TensorView qv = host_view(q.data(), {spec.num_q_heads, d});
      Status s = cached.seq->attend(l, qv, host_view(a.data(), {spec.num_q_heads, d}),
                                    Stream::host(), &ta);
      EXPECT_TRUE(s.ok()) << s.to_string();
      s = plain.seq->attend(l, qv, host_view(b.data(), {spec.num_q_heads, d}), Stream::host(), &tb);
      EXPECT_TRUE(s.ok()) << s.to_string();
      const int64_t rows = kv * static_cast<int64_t>(ta.attended[0].size());
      EXPECT_EQ(ta.fetch.resident_rows + ta.fetch.dram_rows + ta.fetch.cache_hits, rows);
      EXPECT_EQ(ta.fetch.cache_bytes, ta.fetch.cache_hits * spec.row_bytes());
      EXPECT_EQ(tb.fetch.cache_hits, 0);
      hits += ta.fetch.cache_hits;
      if (ta.attended == tb.attended) {
        ++same;
        EXPECT_EQ(a, b) << "step " << step << ", layer " << l;
      }
      if (reference != nullptr) {
        s = reference->seq->attend(l, qv, host_view(r.data(), {spec.num_q_heads, d}),
                                   Stream::host(), &tr);
        EXPECT_TRUE(s.ok()) << s.to_string();
        if (tr.attended == ta.attended) {
          EXPECT_LT(relative_error(a, r), 2e-3) << "step " << step << ", layer " << l;
        }
      }
    }
  }
  // Both sequences build the same index, so most steps attend the same tokens.
  EXPECT_GT(same, 0);
  return hits;
}

TEST(BlockCacheTest, CpuResultsWithTheCacheEqualResultsWithout) {
  const ModelSpec spec = ModelSpec::tiny();
  for (const int64_t block : {16, 32, 64, 128}) {
    const Check c{1500, 60, 12, block, 71 + static_cast<uint64_t>(block)};
    Opened cached = open_store(spec, Device::cpu(), c.cache_blocks, block);
    Opened plain = open_store(spec, Device::cpu(), 0, block);
    const int64_t hits = decode_and_compare(spec, c, cached, plain, nullptr);
    EXPECT_GT(hits, 0) << "block " << block;
  }
}

TEST(BlockCacheTest, CpuOddSizesAndACacheOfOneBlock) {
  const ModelSpec spec = ModelSpec::tiny();
  const Check c{1097, 41, 1, 16, 83};
  Opened cached = open_store(spec, Device::cpu(), c.cache_blocks, c.block_tokens);
  Opened plain = open_store(spec, Device::cpu(), 0, c.block_tokens);
  decode_and_compare(spec, c, cached, plain, nullptr);
}

TEST(BlockCacheTest, CpuBlocksOfOneTokenAdmittedAtTheSecondPick) {
  const ModelSpec spec = ModelSpec::tiny();
  const Check c{1203, 50, 200, 1, 87};
  Opened cached = open_store(spec, Device::cpu(), c.cache_blocks, 1, 2);
  Opened plain = open_store(spec, Device::cpu(), 0, 1);
  EXPECT_GT(decode_and_compare(spec, c, cached, plain, nullptr), 0);
}

TEST(BlockCacheTest, RejectsBadOptions) {
  StoreOptions o;
  o.spec = ModelSpec::tiny();
  o.block_cache_tokens = 48;
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
  o.block_cache_tokens = 256;
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
  o.block_cache_tokens = 1;
  o.block_cache_admit_steps = 0;
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
  o.block_cache_admit_steps = 1;
  o.block_cache_tokens = 64;
  o.block_cache_bytes = -1;
  EXPECT_EQ(Store::open(o).status().code(), StatusCode::kInvalidArgument);
}

#if PQKV_HAVE_CUDA
ModelSpec gpu_spec() {
  ModelSpec spec = ModelSpec::tiny();
  spec.head_dim = 64;  // the GPU kernels are built for head_dim 64 and 128
  spec.num_q_heads = 8;
  return spec;
}

TEST(BlockCacheCudaTest, GpuResultsWithTheCacheEqualResultsWithoutAndTheCpu) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  for (const int64_t block : {16, 64, 128}) {
    const Check c{3000, 80, 24, block, 91 + static_cast<uint64_t>(block)};
    Opened cached = open_store(spec, Device::cuda(0), c.cache_blocks, block);
    Opened plain = open_store(spec, Device::cuda(0), 0, block);
    Opened cpu = open_store(spec, Device::cpu(), c.cache_blocks, block);
    const int64_t hits = decode_and_compare(spec, c, cached, plain, &cpu);
    EXPECT_GT(hits, 0) << "block " << block;
  }
}

// Hot rows (one-token blocks, policy on the device): enough slots for every
// pick of a step, and so few that slots are reused at every step; admitted
// at the first pick and at the second.
TEST(BlockCacheCudaTest, GpuHotRowsGiveResultsEqualToResultsWithoutAndTheCpu) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  const int64_t lanes = int64_t{spec.num_layers} * spec.num_kv_heads;
  for (const int64_t per_head : {160, 7}) {
    for (const int admit : {1, 2}) {
      SCOPED_TRACE(std::to_string(per_head) + " slots per (layer, KV head), admit at pick " +
                   std::to_string(admit));
      const Check c{2500, 60, per_head * lanes, 1, 97 + static_cast<uint64_t>(per_head + admit)};
      Opened cached = open_store(spec, Device::cuda(0), c.cache_blocks, 1, admit);
      Opened plain = open_store(spec, Device::cuda(0), 0, 1);
      Opened cpu = open_store(spec, Device::cpu(), c.cache_blocks, 1, admit);
      const int64_t hits = decode_and_compare(spec, c, cached, plain, &cpu);
      EXPECT_GT(hits, 0);
    }
  }
}

// The same sequences' steps captured once in a CUDA graph and replayed: the
// hot rows' policy runs inside the replays (the cache adapts), and every
// replayed step's output equals the one of the sequence without a cache.
// The policy of a captured step runs on its own stream beside the next
// captured steps (the next layer's search, gather and attention, and here
// the other sequence's steps when `interleave` captures them layer by
// layer), reading the gathered rows of its own step while the next step
// gathers into the other buffer; with 3 layers the buffers and device plans
// alternate over an odd count, and with 7 slots per (layer, KV head) a step
// picks more rows than the cache holds, so slots are reused at every step.
void replay_hot_rows(const ModelSpec& spec, int64_t slots_per_head, bool interleave,
                     uint64_t seed) {
  const int layers = spec.num_layers;
  const int64_t kv = int64_t{spec.num_kv_heads} * spec.head_dim;
  const int64_t qn = int64_t{spec.num_q_heads} * spec.head_dim;
  const int64_t prompt = 2000;
  const int steps = 40;
  SCOPED_TRACE("seed " + std::to_string(seed) + ", " + std::to_string(layers) + " layers, " +
               std::to_string(slots_per_head) + " slots per (layer, KV head), captured " +
               (interleave ? "layer by layer" : "sequence by sequence"));
  const int64_t lanes = int64_t{layers} * spec.num_kv_heads;
  Opened cached = open_store(spec, Device::cuda(0), slots_per_head * lanes, 1);
  Opened plain = open_store(spec, Device::cuda(0), 0, 1);
  const int64_t per = (prompt + steps) * kv * layers;
  const Tokens t{prompt + steps, random_floats(per, seed), random_floats(per, seed + 1)};
  for (Opened* o : {&cached, &plain}) {
    for (int l = 0; l < layers; ++l)
      PQKV_ASSERT_OK(append(o->seq, t, l, 0, prompt));
    PQKV_ASSERT_OK(o->seq->finish_prefill());
    PQKV_ASSERT_OK(o->seq->reserve(prompt + steps));
  }
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  // Per sequence and layer: key, value, query, output, on the device.
  float* buffers = nullptr;
  const int64_t per_layer = 2 * kv + 2 * qn;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&buffers), 2 * layers * per_layer * 4),
            cudaSuccess);
  const auto at = [&](int which, int l) { return buffers + (which * layers + l) * per_layer; };
  const Device dev = Device::cuda(0);
  const auto capture_step = [&](int which, int l) {
    Sequence* seq = which == 0 ? cached.seq : plain.seq;
    float* b = at(which, l);
    PQKV_RETURN_IF_ERROR(
        seq->append(l, TensorView(b, DType::kF32, dev, {1, spec.num_kv_heads, spec.head_dim}),
                    TensorView(b + kv, DType::kF32, dev, {1, spec.num_kv_heads, spec.head_dim}),
                    Stream::cuda(stream)));
    return seq->attend(
        l, TensorView(b + 2 * kv, DType::kF32, dev, {spec.num_q_heads, spec.head_dim}),
        TensorView(b + 2 * kv + qn, DType::kF32, dev, {spec.num_q_heads, spec.head_dim}),
        Stream::cuda(stream));
  };
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  Status captured = ok_status();
  for (int i = 0; i < 2 * layers && captured.ok(); ++i) {
    const int which = interleave ? i % 2 : i / layers;
    const int l = interleave ? i / 2 : i % layers;
    captured = capture_step(which, l);
  }
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  PQKV_ASSERT_OK(captured);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  int equal = 0;
  std::vector<float> a(qn), b(qn);
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < layers; ++l) {
      auto q = random_floats(qn, seed * 31 + l);
      const auto drift = random_floats(qn, seed * 131 + step * 7 + l, 0.05f);
      for (int64_t i = 0; i < qn; ++i)
        q[i] += drift[i];
      const float* k = t.keys.data() + (l * t.n + prompt + step) * kv;
      const float* v = t.values.data() + (l * t.n + prompt + step) * kv;
      for (int which = 0; which < 2; ++which) {
        float* d = at(which, l);
        ASSERT_EQ(cudaMemcpy(d, k, kv * 4, cudaMemcpyHostToDevice), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(d + kv, v, kv * 4, cudaMemcpyHostToDevice), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(d + 2 * kv, q.data(), qn * 4, cudaMemcpyHostToDevice), cudaSuccess);
      }
    }
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    for (int l = 0; l < layers; ++l) {
      ASSERT_EQ(cudaMemcpy(a.data(), at(0, l) + 2 * kv + qn, qn * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(b.data(), at(1, l) + 2 * kv + qn, qn * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      equal += a == b ? 1 : 0;
      EXPECT_LT(relative_error(a, b), 1e-6) << "step " << step << ", layer " << l;
    }
  }
  // Both sequences build the same index from the same rows: the picks agree.
  EXPECT_EQ(equal, steps * layers);
  // The replays filled the cache: direct steps read from it, and give the
  // results of the sequence without a cache.
  PQKV_ASSERT_OK(cached.seq->sync_length(Stream::cuda(stream)));
  PQKV_ASSERT_OK(plain.seq->sync_length(Stream::cuda(stream)));
  int64_t hits = 0;
  for (int l = 0; l < layers; ++l) {
    std::vector<float> q = random_floats(qn, seed * 31 + l);
    std::vector<float> out(qn), want(qn);
    AttendTrace trace, plain_trace;
    PQKV_ASSERT_OK(cached.seq->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                      host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                      Stream::host(), &trace));
    PQKV_ASSERT_OK(plain.seq->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                     host_view(want.data(), {spec.num_q_heads, spec.head_dim}),
                                     Stream::host(), &plain_trace));
    if (trace.attended == plain_trace.attended) {
      EXPECT_EQ(out, want) << "layer " << l;
    }
    hits += trace.fetch.cache_hits;
  }
  EXPECT_GT(hits, 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaFree(buffers);
  cudaStreamDestroy(stream);
}

TEST(BlockCacheCudaTest, GpuHotRowsUnderGraphReplayGiveResultsEqualToResultsWithout) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  replay_hot_rows(spec, 160, /*interleave=*/false, 131);
  replay_hot_rows(spec, 7, /*interleave=*/false, 137);
  replay_hot_rows(spec, 160, /*interleave=*/true, 139);
}

TEST(BlockCacheCudaTest, GpuHotRowsUnderGraphReplayOverAnOddCountOfLayers) {
  PQKV_SKIP_IF_NO_GPU();
  ModelSpec spec = gpu_spec();
  spec.num_layers = 3;
  replay_hot_rows(spec, 160, /*interleave=*/true, 149);
  replay_hot_rows(spec, 7, /*interleave=*/false, 151);
}

TEST(BlockCacheCudaTest, SlotsAreChargedToTheHbmBudget) {
  PQKV_SKIP_IF_NO_GPU();
  const ModelSpec spec = gpu_spec();
  Opened g = open_store(spec, Device::cuda(0), 10, 64);
  const int64_t before = g.store->hbm_bytes_used();
  PQKV_ASSERT_OK(g.seq->reserve(4096));
  EXPECT_GE(g.store->hbm_bytes_used() - before, 10 * 64 * spec.row_bytes());
  PQKV_ASSERT_OK(g.store->drop("s"));
  EXPECT_EQ(g.store->hbm_bytes_used(), 0);
}
#endif  // PQKV_HAVE_CUDA

}  // namespace
}  // namespace pqkv
