/* pqkv's C API: the C++ API (pqkv/store.h, pqkv/sequence.h) for embedding in
 * engines written in C or behind an FFI. Every call returns a status code; on
 * an error pqkv_last_error() gives the message of the calling thread's last
 * failed call. No C++ exception crosses this boundary.
 *
 * Tensors are dense row-major buffers: keys and values [tokens, kv_heads,
 * head_dim], queries and outputs [q_heads, head_dim]. A cpu store takes host
 * memory only. A CUDA store takes, for each pointer, host memory or device
 * memory of its GPU: pqkv asks CUDA where each pointer lives
 * (cudaPointerGetAttributes; device and managed memory count as device
 * memory, pinned or pageable host memory as host memory) and never reads a
 * device pointer on the host. `stream` is a cudaStream_t, or NULL for host
 * work (the call then finishes before it returns).
 *
 * Handles: a pqkv_store* or pqkv_sequence* is an id that pqkv checks on every
 * call, never an address it follows; ids are never reused. A call given a
 * handle that is NULL, was never given by pqkv (uninitialised, overwritten),
 * is of the other kind, or was released (a closed store; a sequence that was
 * dropped or closed, or whose store was closed) changes nothing and answers
 * PQKV_INVALID_ARGUMENT (the functions that answer a count: -1) with a
 * message that says which and what to do. Copies of a handle are the same
 * handle.
 *
 * Threads: every function may be called from any thread. A sequence is
 * driven by one thread at a time (append, finish_prefill*, attend*, reserve,
 * sync_length, save); different sequences and the store's own calls may run
 * at once. Releasing a handle (pqkv_sequence_drop, pqkv_sequence_close,
 * pqkv_store_close) while another thread is inside a call on it is safe:
 * that call finishes on the sequence or store as it was, its memory is freed
 * when the last such call returns, and calls that start after the release
 * fail as above.
 */
#ifndef PQKV_PQKV_H_
#define PQKV_PQKV_H_

#include <stdint.h>

#include "pqkv/export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pqkv_status {
  PQKV_OK = 0,
  PQKV_INVALID_ARGUMENT = 1,
  PQKV_FAILED_PRECONDITION = 2,
  PQKV_NOT_FOUND = 3,
  PQKV_ALREADY_EXISTS = 4,
  PQKV_OUT_OF_RANGE = 5,
  PQKV_RESOURCE_EXHAUSTED = 6,
  PQKV_UNIMPLEMENTED = 7,
  PQKV_UNAVAILABLE = 8,
  PQKV_IO_ERROR = 9,
  PQKV_CORRUPTION = 10,
  PQKV_INTERNAL = 11
} pqkv_status;

typedef enum pqkv_dtype { PQKV_BF16 = 0, PQKV_F16 = 1, PQKV_F32 = 2 } pqkv_dtype;

typedef enum pqkv_gqa_aggregation {
  PQKV_GQA_SOFTMAX_SUM = 0, /* PQCache: per-head softmax summed over the group */
  PQKV_GQA_MAX = 1
} pqkv_gqa_aggregation;

typedef struct pqkv_model_spec {
  int num_layers;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  pqkv_dtype dtype; /* how keys and values are stored */
} pqkv_model_spec;

typedef struct pqkv_store_options {
  pqkv_model_spec spec;
  int cuda_device;           /* -1: cpu (default); N >= 0: cuda:N; others INVALID_ARGUMENT */
  int64_t dram_budget_bytes; /* 0 = unlimited (default) */
  int num_threads;           /* 0 = one per core (default), at most 1024 */
  /* A directory that keeps saved sequences (pqkv_sequence_save); NULL
   * (default): in memory only. Copied by pqkv_store_open. */
  const char* directory;
  /* Identifies the model; a sequence saved under another one is refused by
   * pqkv_sequence_open. NULL (default) is "". */
  const char* model_fingerprint;
  /* CUDA stores: device memory for the sequences' resident sink and window
   * rows, bytes; 0 = unlimited. Default 8 GiB. */
  int64_t hbm_budget_bytes;
  /* The block cache (StoreOptions::block_cache_bytes): bytes of slots shared
   * by the sequences, in device memory on a CUDA store (charged to
   * hbm_budget_bytes), host memory on a cpu store; 0 = none (default). */
  int64_t block_cache_bytes;
  /* Tokens per cache block: a power of two from 1 to 128; 0 = the default,
   * 64. 1 on a CUDA store: hot rows, single rows whose policy runs on the
   * device and adapts under graph replay (StoreOptions::block_cache_bytes). */
  int64_t block_cache_tokens;
  /* Steps between halvings of the blocks' access counts; 0 = plain LFU.
   * Default 16. */
  int block_cache_aging_steps;
  /* Nonzero: when the DRAM budget is reached, move cold rows to files under
   * directory/spill instead of failing (StoreOptions::spill_to_disk; needs
   * directory and dram_budget_bytes; with a block cache, cpu stores only).
   * Default 0. */
  int spill_to_disk;
  /* Bytes of row memory (pinned on a CUDA store) taken when the store opens,
   * charged to dram_budget_bytes, so that appends up to that many bytes
   * allocate nothing (StoreOptions::dram_prealloc_bytes); must not pass a
   * nonzero dram_budget_bytes (PQKV_INVALID_ARGUMENT). 0 = none (default). */
  int64_t dram_prealloc_bytes;
  /* Steps a block must be picked at (its access count, aging included)
   * before the block cache admits it (StoreOptions::block_cache_admit_steps):
   * 1 admits at the first pick, 2 only a block picked again. >= 1; 1 or 2
   * with block_cache_tokens 1; others are PQKV_INVALID_ARGUMENT. 0 (a zeroed
   * struct) = the default, 1. */
  int block_cache_admit_steps;
} pqkv_store_options;

/* A token count: max(tokens, ceil(ratio * context length)). tokens >= 0 and
 * ratio within 0..1 (NaN and Inf are refused with PQKV_INVALID_ARGUMENT). */
typedef struct pqkv_token_count {
  int64_t tokens;
  double ratio;
} pqkv_token_count;

typedef struct pqkv_sequence_options {
  int pq_m;                /* PQ sub-spaces; 0 = head_dim / 8 (default) */
  int pq_bits;             /* bits per code, 1..8 (default 8) */
  int kmeans_iters;        /* default 20 */
  pqkv_token_count sink;   /* default 32 tokens */
  pqkv_token_count window; /* default 5% */
  pqkv_token_count top_k;  /* default 5% */
  int fixed_at_prefill;    /* PQCache's frozen budget; default 0 */
  pqkv_gqa_aggregation aggregation;
  int max_train_points_per_centroid; /* k-means sample per centroid; 0 = all (default 32) */
  uint64_t seed;                     /* k-means sampling and init seed (default 1234) */
  /* How the top-K tokens are picked: "int4" (keys scalar-quantized per
   * channel; NULL = the default), "int8", "pq" (shaped by pq_m and pq_bits),
   * "oracle" (exact scores), or two stages such as "pq+int8:4".
   * Read by pqkv_sequence_create; an unknown name is PQKV_INVALID_ARGUMENT. */
  const char* selection;
  /* CUDA stores: keep each layer's sink and window in device memory from
   * pqkv_sequence_reserve on (charged to hbm_budget_bytes). Default 1. */
  int resident_sink_window;
  /* Drift (SequenceOptions::refit_threshold): refit a layer's codec off the
   * decode path (cpu stores: a thread of its own; cuda stores: the index's
   * build stream) when its new keys' quantization error passes this ratio
   * to the fit's, > 1; 0 = off (default). */
  double refit_threshold;
  /* Tokens appended since a layer's last fit before a refit may start; 0
   * (a zeroed struct) = the default 512. */
  int64_t refit_min_tokens;
} pqkv_sequence_options;

/* One layer's drift (Sequence::drift_stats): mean and largest over KV heads
 * of (mean squared quantization error of the keys appended since the fit) /
 * (that of the fit's keys), and the refits so far. */
typedef struct pqkv_drift_stats {
  int tracking; /* 0: nothing tracked (exact keys, or a restored index) */
  int64_t fit_tokens;
  int64_t tokens_since_fit;
  double mean_error_ratio;
  double max_error_ratio;
  int refits;
  int refit_running;
  double last_refit_ms;  /* time of the last refit's build, off the decode path (cpu: wall
                          * time; cuda: GPU time on the build stream) */
  double total_refit_ms; /* of every refit so far */
} pqkv_drift_stats;

typedef struct pqkv_store pqkv_store;
typedef struct pqkv_sequence pqkv_sequence;

/* The message of this thread's last failed call ("" when none). The string
 * stays valid until this thread's next pqkv call: copy it before another. */
PQKV_API const char* pqkv_last_error(void);
/* The status code of this thread's last failed call (PQKV_OK when none): the
 * code of the functions that answer -1 on an error instead of a status
 * (pqkv_sequence_length, pqkv_sequence_max_selected). */
PQKV_API pqkv_status pqkv_last_error_code(void);
/* The name of a status code ("OK", "INVALID_ARGUMENT", ...); "UNKNOWN" for
 * a value that is not one. Static storage. */
PQKV_API const char* pqkv_status_name(pqkv_status s);
/* pqkv's version, "MAJOR.MINOR.PATCH". Static storage. */
PQKV_API const char* pqkv_version(void);

/* Fills `out` with a preset: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha. */
PQKV_API pqkv_status pqkv_model_spec_preset(const char* name, pqkv_model_spec* out);
/* Fill `options` with the defaults (and `spec`, when not NULL); a NULL
 * `options` is left alone (nothing to fill). */
PQKV_API void pqkv_store_options_init(pqkv_store_options* options, const pqkv_model_spec* spec);
PQKV_API void pqkv_sequence_options_init(pqkv_sequence_options* options);

PQKV_API pqkv_status pqkv_store_open(const pqkv_store_options* options, pqkv_store** out);
/* Closes the store and releases every handle to its sequences (see Handles
 * above); NULL does nothing. A handle that is not an open store (closed
 * already, made up) changes nothing: pqkv_last_error_code() is then
 * PQKV_INVALID_ARGUMENT and pqkv_last_error() says why; PQKV_OK otherwise. */
PQKV_API void pqkv_store_close(pqkv_store* store);
/* Host bytes the store holds for rows (Store::dram_bytes_used); -1 (and the
 * error set) for a NULL or released store. */
PQKV_API int64_t pqkv_store_dram_bytes_used(const pqkv_store* store);
/* Takes row memory now so that later appends do not allocate: afterwards at
 * least `bytes` (rounded up to whole row blocks) of the store's held memory
 * is free for appends; only the part not already free is taken, so a repeat
 * with the same bytes takes nothing until appends use the rows. Memory taken
 * stays held, charged to dram_budget_bytes, until the store closes.
 * Store::preallocate_dram. PQKV_RESOURCE_EXHAUSTED when dram_budget_bytes
 * cannot take it or the system has no more (pinned) memory: nothing is taken
 * and nothing held is lost; PQKV_INVALID_ARGUMENT for a null store or
 * bytes < 0. Thread-safe. */
PQKV_API pqkv_status pqkv_store_preallocate_dram(pqkv_store* store, int64_t bytes);
/* Bytes of row memory one sequence of `tokens` tokens holds in every layer:
 * what to pass to pqkv_store_preallocate_dram before appending them; 0 for
 * tokens <= 0, INT64_MAX when the bytes would pass it (no store takes that).
 * -1 (and the error set) for a NULL or released store.
 * Store::dram_bytes_for_tokens. */
PQKV_API int64_t pqkv_store_dram_bytes_for_tokens(const pqkv_store* store, int64_t tokens);

/* The sequence belongs to the store: its handle is valid until the sequence
 * is dropped or closed or the store closes; later calls with it answer
 * PQKV_INVALID_ARGUMENT (see Handles above). get and open give the handle the
 * sequence already has, if any. The calls that give a handle (create, get,
 * open) set *out to NULL when they fail. */
PQKV_API pqkv_status pqkv_sequence_create(pqkv_store* store, const char* name,
                                          const pqkv_sequence_options* options,
                                          pqkv_sequence** out);
PQKV_API pqkv_status pqkv_sequence_get(pqkv_store* store, const char* name, pqkv_sequence** out);
/* Removes the name from memory and, when saved, from the store's directory;
 * releases the sequence's handle. */
PQKV_API pqkv_status pqkv_sequence_drop(pqkv_store* store, const char* name);

/* Persistence (a store opened with a directory), as Store::save,
 * Store::open_sequence, Store::close_sequence and Store::compact: save writes
 * the sequence atomically (a crash keeps the earlier save); open loads a saved
 * sequence that answers as it did when saved (PQKV_ALREADY_EXISTS when one of
 * that name is in memory, PQKV_FAILED_PRECONDITION for another model
 * fingerprint or geometry, PQKV_CORRUPTION / PQKV_NOT_FOUND naming a damaged
 * or missing segment file); close forgets the in-memory sequence (releasing
 * its handle) and keeps its save; compact reclaims what crashes left. save
 * refuses a sequence of another store (PQKV_INVALID_ARGUMENT). */
PQKV_API pqkv_status pqkv_sequence_save(pqkv_store* store, pqkv_sequence* seq);
PQKV_API pqkv_status pqkv_sequence_open(pqkv_store* store, const char* name, pqkv_sequence** out);
PQKV_API pqkv_status pqkv_sequence_close(pqkv_store* store, const char* name);
PQKV_API pqkv_status pqkv_store_compact(pqkv_store* store);
/* The names of the sequences saved in the store's directory
 * (Store::saved_sequence_names), in the catalog's order, written to `names`
 * as consecutive NUL-terminated strings followed by one more NUL ("a\0b\0\0";
 * just "\0" when none is saved or the store has no directory). *needed gets
 * the bytes that takes. OUT_OF_RANGE, naming *needed, when `capacity` bytes
 * are too few (names may be NULL with capacity 0 to ask for the size);
 * CORRUPTION or IO_ERROR when the catalog cannot be read. */
PQKV_API pqkv_status pqkv_store_saved_sequence_names(pqkv_store* store, char* names,
                                                     int64_t capacity, int64_t* needed);

/* Tokens stored for `layer`; -1 (and the error set) for a NULL or released
 * sequence or a layer out of range. */
PQKV_API int64_t pqkv_sequence_length(const pqkv_sequence* seq, int layer);
/* num_tokens >= 0; keys and values must be finite and stay finite in the
 * store's dtype (fp32 input above 65504 overflows fp16): otherwise
 * PQKV_INVALID_ARGUMENT and nothing is appended. */
PQKV_API pqkv_status pqkv_sequence_append(pqkv_sequence* seq, int layer, const void* keys,
                                          const void* values, int64_t num_tokens, pqkv_dtype dtype,
                                          void* stream);
PQKV_API pqkv_status pqkv_sequence_finish_prefill(pqkv_sequence* seq);
/* Sequence::finish_prefill_layer: ends the prompt of `layer` and starts its
 * index build while the caller prefills the layers above (cuda: on a Store
 * build stream after the work queued on `stream`, a cudaStream_t or NULL for
 * the layer's appends only; cpu: a task on the store's threads). Build errors
 * come back from finish_prefill. PQKV_FAILED_PRECONDITION when the layer was
 * ended already, holds no tokens, or finish_prefill has run;
 * PQKV_INVALID_ARGUMENT for a layer out of range. */
PQKV_API pqkv_status pqkv_sequence_finish_prefill_layer(pqkv_sequence* seq, int layer,
                                                        void* stream);
/* Where finish_prefill's index build stands: layers built (cpu) or enqueued
 * (cuda) of num_layers, prompt tokens per layer, wall seconds so far. */
typedef void (*pqkv_build_progress_fn)(int layers_done, int num_layers, int64_t tokens,
                                       double elapsed_s, void* user_data);
/* finish_prefill, calling `progress` (may be NULL) with `user_data` before the
 * first layer and after each one, on the calling thread, one call at a time. */
PQKV_API pqkv_status pqkv_sequence_finish_prefill_with_progress(pqkv_sequence* seq,
                                                                pqkv_build_progress_fn progress,
                                                                void* user_data);
PQKV_API pqkv_status pqkv_sequence_attend(pqkv_sequence* seq, int layer, const void* queries,
                                          void* out, pqkv_dtype dtype, void* stream);
PQKV_API pqkv_status pqkv_sequence_attend_exact(pqkv_sequence* seq, int layer, const void* queries,
                                                void* out, pqkv_dtype dtype, void* stream);

/* Sequence::check_health: waits for the appends issued so far (a host sync on
 * a CUDA store) and answers PQKV_INVALID_ARGUMENT, naming layer, token, head
 * and dim, when a key or value appended from device memory was NaN, Inf or
 * overflowed the store's dtype (it is stored already: drop the sequence);
 * then, on a CUDA store, PQKV_INVALID_ARGUMENT naming layer, query head and
 * dim when an attend whose stream has finished gave a NaN or Inf output (its
 * scores or sums passed fp32's range; reported once, nothing stored is
 * harmed). An attend into host memory, and any call on a cpu store, answers
 * these at the call instead. PQKV_OK otherwise. */
PQKV_API pqkv_status pqkv_sequence_check_health(pqkv_sequence* seq);

/* Sizes the sequence for up to `max_tokens` tokens in every layer (row
 * blocks charged to the store's DRAM budget; on a CUDA store also device
 * tables, index capacity and the decode step's workspaces). Call it after
 * finish_prefill for the index capacity to count. RESOURCE_EXHAUSTED names
 * the budget to raise, and nothing is then taken. */
PQKV_API pqkv_status pqkv_sequence_reserve(pqkv_sequence* seq, int64_t max_tokens);

/* After replays of a decode step captured in a CUDA graph (appends and
 * attends enqueued on a capturing stream after reserve), waits for `stream`
 * (a cudaStream_t, or NULL for the store's own) and takes the lengths the
 * replays reached on the device as the sequence's. Direct calls answer
 * FAILED_PRECONDITION until it is called; OUT_OF_RANGE when replays reached
 * the reserved length (those appends were dropped). Sequence::sync_length. */
PQKV_API pqkv_status pqkv_sequence_sync_length(pqkv_sequence* seq, void* stream);

/* Positions per KV head that the next select/attend of `layer` needs (sink +
 * top-K or the whole middle + window, the newest token included); -1 on error
 * (before finish_prefill, a layer out of range). */
PQKV_API int64_t pqkv_sequence_max_selected(const pqkv_sequence* seq, int layer);

/* `layer`'s drift into *out (host memory): Sequence::drift_stats, a read of
 * counters with no device sync, safe beside calls on other threads.
 * PQKV_FAILED_PRECONDITION before finish_prefill built its index;
 * PQKV_INVALID_ARGUMENT for a null seq or out, or a layer out of range. */
PQKV_API pqkv_status pqkv_sequence_drift_stats(const pqkv_sequence* seq, int layer,
                                               pqkv_drift_stats* out);

/* One decode step of `layer` for `n` sequences of `store` (distinct, each
 * prefilled): outs[i] gets what pqkv_sequence_attend(seqs[i], layer,
 * queries[i], outs[i], dtype, stream) would write. queries[i], outs[i]:
 * [q_heads, head_dim] of `dtype`. Every step is checked before any runs: a
 * NULL, released or other store's seqs[i] is PQKV_INVALID_ARGUMENT naming i. */
PQKV_API pqkv_status pqkv_attend_batch(pqkv_store* store, int layer, int n,
                                       pqkv_sequence* const* seqs, const void* const* queries,
                                       void* const* outs, pqkv_dtype dtype, void* stream);

/* The selector alone: the positions pqkv_attend_batch would attend to, without
 * attending. positions [n, kv_heads, max_selected] int32, padded with -1;
 * lengths [n, kv_heads] int32 (valid positions per row). Both in host memory,
 * or both in device memory of a CUDA store's GPU. OUT_OF_RANGE naming the
 * needed size when max_selected is too small (see
 * pqkv_sequence_max_selected). */
PQKV_API pqkv_status pqkv_select_batch(pqkv_store* store, int layer, int n,
                                       pqkv_sequence* const* seqs, const void* const* queries,
                                       pqkv_dtype dtype, int32_t* positions, int64_t max_selected,
                                       int32_t* lengths, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* PQKV_PQKV_H_ */
