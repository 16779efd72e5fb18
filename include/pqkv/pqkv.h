/* pqkv's C API: the C++ API (pqkv/store.h, pqkv/sequence.h) for embedding in
 * engines written in C or behind an FFI. Every call returns a status code; on
 * an error pqkv_last_error() gives the message of the calling thread's last
 * failed call. No C++ exception crosses this boundary.
 *
 * Tensors are dense row-major buffers in the store's memory space (host memory
 * for a cpu store): keys and values [tokens, kv_heads, head_dim], queries and
 * outputs [q_heads, head_dim]. `stream` is a cudaStream_t or NULL for host work.
 */
#ifndef PQKV_PQKV_H_
#define PQKV_PQKV_H_

#include <stdint.h>

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
  int cuda_device;           /* -1: cpu (default); N: cuda:N */
  int64_t dram_budget_bytes; /* 0 = unlimited (default) */
  int num_threads;           /* 0 = one per core (default) */
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
} pqkv_sequence_options;

typedef struct pqkv_store pqkv_store;
typedef struct pqkv_sequence pqkv_sequence;

/* The message of this thread's last failed call ("" when none). */
const char* pqkv_last_error(void);

/* Fills `out` with a preset: llama-3.1-8b, mistral-7b, qwen2.5-7b, tiny, tiny-mha. */
pqkv_status pqkv_model_spec_preset(const char* name, pqkv_model_spec* out);
void pqkv_store_options_init(pqkv_store_options* options, const pqkv_model_spec* spec);
void pqkv_sequence_options_init(pqkv_sequence_options* options);

pqkv_status pqkv_store_open(const pqkv_store_options* options, pqkv_store** out);
void pqkv_store_close(pqkv_store* store);
int64_t pqkv_store_dram_bytes_used(const pqkv_store* store);

/* The sequence belongs to the store: valid until dropped or the store closes. */
pqkv_status pqkv_sequence_create(pqkv_store* store, const char* name,
                                 const pqkv_sequence_options* options, pqkv_sequence** out);
pqkv_status pqkv_sequence_get(pqkv_store* store, const char* name, pqkv_sequence** out);
pqkv_status pqkv_sequence_drop(pqkv_store* store, const char* name);

int64_t pqkv_sequence_length(const pqkv_sequence* seq, int layer);
/* num_tokens >= 0; keys and values must be finite and stay finite in the
 * store's dtype (fp32 input above 65504 overflows fp16): otherwise
 * PQKV_INVALID_ARGUMENT and nothing is appended. */
pqkv_status pqkv_sequence_append(pqkv_sequence* seq, int layer, const void* keys,
                                 const void* values, int64_t num_tokens, pqkv_dtype dtype,
                                 void* stream);
pqkv_status pqkv_sequence_finish_prefill(pqkv_sequence* seq);
pqkv_status pqkv_sequence_attend(pqkv_sequence* seq, int layer, const void* queries, void* out,
                                 pqkv_dtype dtype, void* stream);
pqkv_status pqkv_sequence_attend_exact(pqkv_sequence* seq, int layer, const void* queries,
                                       void* out, pqkv_dtype dtype, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* PQKV_PQKV_H_ */
