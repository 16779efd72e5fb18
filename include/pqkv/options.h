// Options of a Store and of its Sequences. Every field has its default and unit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "pqkv/device.h"
#include "pqkv/export.h"
#include "pqkv/model_spec.h"
#include "pqkv/status.h"

namespace pqkv {

// Product quantization of the keys of one (layer, KV head).
struct PQKV_API PqConfig {
  // Sub-spaces; divides head_dim, at most head_dim / 2. Default 0: one per 8
  // dims (head_dim / 8: 16 at head_dim 128), chosen from measured recall
  // (docs/benchmarks.md).
  int m = 0;
  int bits = 8;           // bits per sub-space code, 1..8 (2^bits centroids). Default 8.
  int kmeans_iters = 20;  // Lloyd iterations. Default 20.
  // k-means trains on at most this many keys per centroid, sampled with `seed`;
  // 0 trains on every key. Default 32 (8K keys at 8 bits).
  int max_train_points_per_centroid = 32;
  uint64_t seed = 1234;  // sampling and centroid initialisation. Default 1234.

  static constexpr int kDefaultDimsPerSubspace = 8;

  int num_centroids() const { return 1 << bits; }
  // m, with the default resolved for this head_dim.
  int resolved_m(int head_dim) const {
    return m > 0 ? m : std::max(1, head_dim / kDefaultDimsPerSubspace);
  }
  Status validate(int head_dim) const;
  std::string to_string() const;  // "m=4,b=8"; "m=d/8,b=8" for the default m

  // PQCache's setting (m = 2, b = 6), kept for comparison.
  static PqConfig pqcache();
  // pqkv's default (8 dims per sub-space, 8 bits), chosen from measured recall
  // (docs/benchmarks.md).
  static PqConfig pqkv_default() { return {}; }
  // "pqcache", "default", or "m=M,b=B" (each key once, M >= 1; the default m
  // is "default"). InvalidArgument otherwise.
  static Result<PqConfig> parse(std::string_view text);
};

// A token count given as an absolute number, a ratio of the current context
// length, or both; resolves to max(tokens, ceil(ratio * length)).
struct PQKV_API TokenCount {
  int64_t tokens = 0;  // absolute count. Default 0.
  double ratio = 0.0;  // fraction of the context length, 0..1. Default 0.

  int64_t resolve(int64_t context_length) const;
  // OK when tokens >= 0 and ratio is a number within 0..1 (NaN and Inf are
  // refused); otherwise an InvalidArgument that names `what` and the value.
  Status validate(const char* what) const;
  // The one grammar of token counts and budgets in pqkv: an integer is a count
  // of tokens ("512"); a percentage ("5%", at most "100%") or a decimal
  // fraction strictly below 1 ("0.05") is a ratio of the context; a count and
  // a ratio joined by '+' ("64+5%", "64+0.05") resolve to the larger of the
  // two. Anything else is InvalidArgument with a message that shows how to
  // write it: "1.0" and "1." (one token or the whole context?), signs,
  // exponents, NaN and Inf, fractions >= 1 and percentages above 100.
  static Result<TokenCount> parse(std::string_view text);
  std::string to_string() const;
};

// How many tokens a decode step attends to: the first `sink` tokens, the most
// recent `window` tokens, and the `top_k` best of the rest by approximate score,
// plus the current token. Counts follow the context as it grows.
struct PQKV_API BudgetPolicy {
  TokenCount sink{32, 0.0};    // default: 32 tokens
  TokenCount window{0, 0.05};  // default: 5% of the context
  TokenCount top_k{0, 0.05};   // default: 5% of the context
  // PQCache's rule: window and top-K computed once from the prompt length L as
  // (L - S) * c * r and (L - S) * c * (1 - r), never growing. Default off.
  bool fixed_at_prefill = false;

  // Resolved counts for a context of `length` tokens whose prompt had
  // `prefill_length` tokens.
  struct Counts {
    int64_t sink = 0;
    int64_t window = 0;
    int64_t top_k = 0;
  };
  Counts resolve(int64_t length, int64_t prefill_length) const;
  Status validate() const;
  std::string to_string() const;

  // Ratio budget: sink 32, then `ratio` of the context split evenly between
  // window and top-K.
  static BudgetPolicy ratio_of_context(double ratio);
  // PQCache's fixed-at-prefill budget with its c (0.1 Llama, 0.2 Mistral) and r = 0.5.
  static BudgetPolicy pqcache(double c = 0.1, double r = 0.5);
  // Every token: exact attention through the same path.
  static BudgetPolicy everything();
};

// How per-query-head scores become one score per KV head (GQA).
enum class GqaAggregation : uint8_t {
  kSoftmaxSum = 0,  // PQCache: softmax(score / sqrt(d)) per query head, summed over the group
  kMax = 1,         // the largest per-head softmax probability in the group
};
PQKV_API const char* gqa_aggregation_name(GqaAggregation a);
PQKV_API Result<GqaAggregation> parse_gqa_aggregation(std::string_view text);

// How keys are coded for scoring tokens at a decode step.
enum class KeyCode : uint8_t {
  kPq = 0,     // product quantization with SequenceOptions::pq: m bytes per token and KV head
  kInt8 = 1,   // keys scalar-quantized per channel to 8 bits: head_dim bytes
  kInt4 = 2,   // keys scalar-quantized per channel to 4 bits: head_dim / 2 bytes
  kExact = 3,  // the keys themselves in fp32 (4 * head_dim bytes): exact scores, the oracle
};
PQKV_API const char* key_code_name(KeyCode code);  // "pq", "int8", "int4", "exact"
// "pq", "int8", "int4", "exact" (also "oracle").
PQKV_API Result<KeyCode> parse_key_code(std::string_view text);

// How a decode step picks its top-K tokens of each KV head. One stage: `code`
// scores every searched token. Two stages (candidates > 0): `code` picks the
// candidates x top-K best tokens, `rerank` scores those again and keeps top-K.
//
// The default, int4 keys, is chosen by measurement (docs/benchmarks.md,
// "Selection quality"): at a 2% budget it keeps every needle exact top-K
// keeps, where PQ at head_dim / 8 sub-spaces loses some, for head_dim / 2
// bytes per token and KV head. PQ stays available: SelectionConfig::pq().
struct PQKV_API SelectionConfig {
  KeyCode code = KeyCode::kInt4;  // scores every searched token. Default kInt4.
  // Candidates kept by the first stage per top-K token (C), 1 to
  // kMaxCandidates; 0 = one stage. Default 0.
  int candidates = 0;
  static constexpr int kMaxCandidates = 1024;
  KeyCode rerank = KeyCode::kInt8;  // the second stage's code, when candidates > 0. Default kInt8.

  bool two_stage() const { return candidates > 0; }
  // True when the scores are the exact ones (one stage of kExact).
  bool is_oracle() const { return code == KeyCode::kExact && !two_stage(); }
  Status validate() const;
  // "pq", "int4", "oracle", "pq+int8:4" (PQ picks 4 x top-K, int8 keeps top-K).
  std::string to_string() const;

  // Exact top-K from the full keys: what the approximations are measured against.
  static SelectionConfig oracle();
  // One stage of PQ shaped by SequenceOptions::pq (pqkv's default before int4).
  static SelectionConfig pq();
  // "oracle", a code ("pq", "int8", "int4", "exact"), or "CODE+RERANK:C" for two
  // stages (e.g. "pq+int8:4").
  static Result<SelectionConfig> parse(std::string_view text);
};

struct PQKV_API SequenceOptions {
  PqConfig pq;  // default: PqConfig::pqkv_default()
  // Which code scores the tokens; default: one stage of int4 keys (`pq` shapes
  // PQ codes when the selection uses them).
  SelectionConfig selection;
  BudgetPolicy budget;  // default: sink 32 + 10% of the context
  // CUDA stores: keep each layer's sink and recent window in device memory
  // (charged to StoreOptions::hbm_budget_bytes) from Sequence::reserve on,
  // so a step gathers only the index's picks over PCIe. The resident slots
  // are sized for the budget at reserve's max_tokens. Ignored on cpu stores.
  // Default true.
  bool resident_sink_window = true;
  GqaAggregation aggregation = GqaAggregation::kSoftmaxSum;  // default: PQCache's
  // Drift: each layer's index tracks the quantization error of the keys
  // appended after its codec was fit, per KV head, relative to the error of
  // the fit's own keys (DriftStats). When a layer's largest ratio passes
  // refit_threshold and refit_min_tokens tokens were appended since its last
  // fit, the sequence refits that layer's codec on every key so far and
  // re-encodes them off the decode path (cpu stores: on a thread of its own;
  // cuda stores: on the index's low-priority build stream, measured on the
  // GPU as keys are encoded) while decoding goes on; searches use the old
  // codes until the new ones are swapped in at a later append or step. A
  // ratio, > 1 (e.g. 2: new keys quantize twice as badly); 0 = off.
  // Default 0.
  double refit_threshold = 0.0;
  // Tokens appended since a layer's last fit before a refit may start, >= 1.
  // Default 512.
  int64_t refit_min_tokens = 512;
  Status validate(const ModelSpec& spec) const;
};

// What one layer's index reports of drift (Sequence::drift_stats): the
// quantization error of keys encoded after the codec's fit against the error
// of the fit's own keys. Errors are mean squared reconstruction errors per key
// (||key - decoded code||^2), per KV head; for two-stage selection, of the
// stage that drifts most.
struct PQKV_API DriftStats {
  // False when nothing is tracked: exact keys (no quantization error), or an
  // index restored from a save (its fit's keys are not kept) until its first
  // refit.
  bool tracking = false;
  int64_t fit_tokens = 0;        // keys the current codec was fit on
  int64_t tokens_since_fit = 0;  // keys encoded after the fit (appended since)
  // Per KV head: (mean error of the keys since the fit + floor) / (mean
  // error of a fit key + floor), the floor 0.1% of the fit keys' mean squared
  // norm, so errors far below the keys' size do not count. About 1 for keys
  // drawn like the fit's; 0 before any key since the fit.
  std::vector<double> head_error_ratio;
  double mean_error_ratio = 0;  // mean of head_error_ratio
  double max_error_ratio = 0;   // largest of head_error_ratio
  int refits = 0;               // refits swapped in since the index was built
  bool refit_running = false;   // a refit is being built off to the side
  // Time of the last swapped-in refit (fit + re-encoding, off the decode
  // path) and of all of them, ms: wall time on a cpu store, GPU time on the
  // index's build stream on a cuda store.
  double last_refit_ms = 0;
  double total_refit_ms = 0;
  // The last refit's error when it failed (the old codes stay); empty otherwise.
  std::string last_refit_error;
};

struct PQKV_API StoreOptions {
  ModelSpec spec;                 // required: the geometry of every sequence
  Device device = Device::cpu();  // where search and attention run. Default cpu.
  // Host memory for keys and values of all sequences, in bytes; 0 = unlimited.
  // Default 0.
  int64_t dram_budget_bytes = 0;
  // Bytes of row blocks taken from host memory (pinned on a cuda store) when
  // the Store opens, charged to dram_budget_bytes, so that appends up to that
  // many bytes allocate nothing (Store::preallocate_dram). 0 = none: blocks
  // are taken as tokens arrive, 16 MiB chunks at a time. Must not pass a
  // nonzero dram_budget_bytes. Default 0.
  int64_t dram_prealloc_bytes = 0;
  // Device memory for the rows a CUDA store keeps on the GPU (each
  // sequence's resident sink and window), shared by all sequences, in bytes;
  // 0 = unlimited. Default 8 GiB: the resident rows of a 512K-token
  // Llama-3.1-8B-geometry sequence at a 10% budget take 3.4 GB. Ignored on
  // cpu stores.
  int64_t hbm_budget_bytes = int64_t{8} << 30;
  // The block cache: slots holding blocks of block_cache_tokens consecutive
  // rows of one (layer, KV head) that the index picks often, so a decode
  // step reads them in place instead of gathering them (over PCIe on a CUDA
  // store). Bytes of slots shared by the store's sequences: each sequence
  // takes its slots at Sequence::reserve, as many as its reserved rows could
  // fill, from what the others left (first come, first served). On a CUDA
  // store the slots are device memory charged to hbm_budget_bytes; on a cpu
  // store host memory (the reference of the same policy). Policy: LFU with
  // aging (block_cache_aging_steps); a block is admitted only once all its
  // rows are written, and serves from the step after its copy completes.
  // The policy runs on the host at each direct attend call, one step behind:
  // steps replayed from a CUDA graph read the cache as it stands but never
  // admit nor evict, so under replay it serves only the blocks resident at
  // capture. Except blocks of one token on a CUDA store (hot rows,
  // tiering/hot_rows.h): the slots are split evenly over (layer, KV head),
  // the policy (each step's picks stay, misses take the slots not read
  // longest, copied from the step's gathered rows within HBM) runs on the
  // device after each step's gather, direct or replayed, with no host work.
  // 0 = no cache. Default 0.
  int64_t block_cache_bytes = 0;
  // Tokens per cache block: a power of two from 1 to 128. Default 64 (32 KiB
  // blocks of Llama-geometry 512 B rows). 1: hot rows on a CUDA store (see
  // block_cache_bytes; docs/benchmarks.md, "Hot rows").
  int64_t block_cache_tokens = 64;
  // Decode steps between halvings of every block's access count, so a block
  // that was hot long ago can leave; 0 = never (plain LFU, PQCache's policy).
  // Default 16.
  int block_cache_aging_steps = 16;
  // A block is admitted only once its access count (aging included) reaches
  // this many steps: 1 admits at the first pick, 2 only a block picked again
  // (an admission moves the block's bytes over PCIe once more, so it pays
  // only if the block is then hit). >= 1; hot rows take 1 or 2 (2: a row
  // picked at one of the 8 steps before; it served fewer rows on the
  // synthetic workload, docs/benchmarks.md). Default 1.
  int block_cache_admit_steps = 1;
  // CPU worker threads; 0 = one per core. Default 0. At most kMaxThreads:
  // the thread pool makes every thread it is asked for, and millions of them
  // exhaust the machine.
  int num_threads = 0;
  static constexpr int kMaxThreads = 1024;
  // A directory that keeps saved sequences across restarts (Store::save,
  // Store::open_sequence): a RocksDB catalog and segment files of K/V rows
  // (docs/formats.md), created when missing. One Store opens it at a time.
  // Empty (the default): in memory only; save and open_sequence then fail.
  std::string directory;
  // Identifies the model whose keys and values are stored (a hash of its
  // weights, a name with a revision: anything that differs between models).
  // Saved with each sequence; open_sequence refuses a sequence saved under
  // another fingerprint. Default empty.
  std::string model_fingerprint;
  // When the DRAM budget is reached, move cold rows (the oldest middle
  // blocks of the appending sequence; never its sink or recent window) to
  // segment files under `directory`/spill instead of failing, and read the
  // ones a decode step selects back from disk (4 KiB pages through
  // io_uring), so a sequence can hold more rows than dram_budget_bytes.
  // Needs `directory` and a nonzero dram_budget_bytes (InvalidArgument
  // otherwise). On a CUDA store a decode step of a layer with spilled rows
  // copies its selected positions back and synchronises its stream (steps
  // of layers with nothing spilled do not), and cannot be captured in a
  // CUDA graph (FailedPrecondition). With a block cache (block_cache_bytes
  // > 0): cpu stores only (Unimplemented on cuda); a spilled block the cache
  // admits is read back from disk for its slot. Store::save reads a
  // sequence's spilled rows back from disk into its segment file.
  // Default false.
  bool spill_to_disk = false;
  Status validate() const;
};

}  // namespace pqkv
