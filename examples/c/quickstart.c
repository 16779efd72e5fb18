/* pqkv quick start in C: the lifecycle an engine drives through
 * include/pqkv/pqkv.h, on a cpu store. It opens a store, prefills one
 * sequence, then decodes a few steps; at each (step, layer) it asks which
 * tokens the step will attend to (pqkv_select_batch, what an engine with its
 * own attention kernel consumes), lets pqkv attend (pqkv_sequence_attend) and
 * compares with exact attention over every token. Every call's status is
 * checked; on an error it prints the function, the status name and
 * pqkv_last_error(), and exits 1.
 *
 * Shapes (dense, row-major, host memory here):
 *   keys, values  [tokens, kv_heads, head_dim]  keys after RoPE
 *   queries, out  [q_heads, head_dim]           queries after RoPE
 *   positions     [kv_heads, max_selected] int32, -1 padded; lengths [kv_heads]
 *
 * Built against an installed pqkv (examples/c/CMakeLists.txt, or
 * `cc quickstart.c $(pkg-config --cflags --libs pqkv) -lm`). */
#include <pqkv/pqkv.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { kLayers = 4, kQHeads = 8, kKvHeads = 2, kHeadDim = 64, kPromptTokens = 1024, kSteps = 4 };

/* Reports a failed call with pqkv's message; returns nonzero when it failed. */
static int failed(pqkv_status status, const char* call) {
  if (status == PQKV_OK) return 0;
  fprintf(stderr, "quickstart_c: %s failed: %s: %s\n", call, pqkv_status_name(status),
          pqkv_last_error());
  return 1;
}

/* A standard normal sample (Box-Muller over a 64-bit LCG), so the example
 * gives the same numbers everywhere. */
static float normal(uint64_t* state) {
  double u[2];
  for (int i = 0; i < 2; ++i) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    u[i] = ((double)(*state >> 11) + 0.5) / 9007199254740992.0; /* in (0, 1) */
  }
  return (float)(sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

static void fill_normal(float* v, long count, uint64_t* state) {
  for (long i = 0; i < count; ++i)
    v[i] = normal(state);
}

int main(void) {
  const long row = (long)kKvHeads * kHeadDim; /* one token of one layer */
  const long q_size = (long)kQHeads * kHeadDim;
  const int group = kQHeads / kKvHeads; /* GQA: query head h uses KV head h / group */
  uint64_t rng = 2025;
  int rc = 1;
  pqkv_store* store = NULL;
  pqkv_sequence* seq = NULL;
  float* keys = malloc(sizeof(float) * kLayers * (kPromptTokens + kSteps) * row);
  float* values = malloc(sizeof(float) * (kPromptTokens + kSteps) * row);
  float* queries = malloc(sizeof(float) * q_size);
  float* out = malloc(sizeof(float) * q_size);
  float* exact = malloc(sizeof(float) * q_size);
  int32_t* positions = NULL;
  int32_t lengths[kKvHeads];
  if (!keys || !values || !queries || !out || !exact) {
    fprintf(stderr, "quickstart_c: out of memory\n");
    goto done;
  }
  printf("pqkv %s\n", pqkv_version());

  /* The geometry: a small Llama-shaped model; pqkv_model_spec_preset
   * ("llama-3.1-8b", &spec) fills the real one. The store keeps rows in bf16
   * whatever dtype the caller's buffers have (fp32 here). */
  pqkv_model_spec spec = {kLayers, kQHeads, kKvHeads, kHeadDim, PQKV_BF16};
  pqkv_store_options store_options;
  pqkv_store_options_init(&store_options, &spec); /* defaults first, then changes */
  store_options.cuda_device = -1;                 /* cpu; N runs on cuda:N */
  if (failed(pqkv_store_open(&store_options, &store), "pqkv_store_open")) goto done;

  /* The budget of each decode step: 32 sink tokens, a window of 5% and the
   * top 5% of the context, picked by the int4 key index (the defaults). */
  pqkv_sequence_options options;
  pqkv_sequence_options_init(&options);
  options.top_k.ratio = 0.05;
  if (failed(pqkv_sequence_create(store, "chat-1", &options, &seq), "pqkv_sequence_create"))
    goto done;

  /* Prefill: the prompt's keys and values, layer by layer (any chunking);
   * NULL as the stream: host work, finished when the call returns. */
  for (int layer = 0; layer < kLayers; ++layer) {
    float* layer_keys = keys + (long)layer * (kPromptTokens + kSteps) * row;
    fill_normal(layer_keys, (kPromptTokens + kSteps) * row, &rng);
    fill_normal(values, (kPromptTokens + kSteps) * row, &rng);
    if (failed(pqkv_sequence_append(seq, layer, layer_keys, values, kPromptTokens, PQKV_F32, NULL),
               "pqkv_sequence_append"))
      goto done;
  }
  /* Fits one index per (layer, KV head) and encodes the prompt's keys. */
  if (failed(pqkv_sequence_finish_prefill(seq), "pqkv_sequence_finish_prefill")) goto done;

  /* Decode: each step appends the new token to a layer, then attends with
   * that layer's queries; layers in order, 0 first. */
  for (int step = 0; step < kSteps; ++step) {
    const long t = kPromptTokens + step; /* the new token's position */
    int found = 0, looked = 0;
    double max_error = 0;
    for (int layer = 0; layer < kLayers; ++layer) {
      const float* layer_keys = keys + (long)layer * (kPromptTokens + kSteps) * row;
      fill_normal(values, row, &rng);
      if (failed(pqkv_sequence_append(seq, layer, layer_keys + t * row, values, 1, PQKV_F32, NULL),
                 "pqkv_sequence_append"))
        goto done;

      /* Each query head looks for one prompt token of its KV head, as a
       * retrieval head does: the index has to find it among the prompt. */
      int32_t target[kKvHeads];
      for (int kv = 0; kv < kKvHeads; ++kv) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        target[kv] = 32 + (int32_t)((rng >> 33) % 800);
      }
      fill_normal(queries, q_size, &rng);
      for (int h = 0; h < kQHeads; ++h) {
        const float* k = layer_keys + ((long)target[h / group] * kKvHeads + h / group) * kHeadDim;
        for (int i = 0; i < kHeadDim; ++i)
          queries[h * kHeadDim + i] = 0.5f * queries[h * kHeadDim + i] + 2.0f * k[i];
      }

      /* The selector: which positions this step attends to, per KV head. */
      const int64_t max_selected = pqkv_sequence_max_selected(seq, layer);
      if (max_selected < 0 && failed(pqkv_last_error_code(), "pqkv_sequence_max_selected"))
        goto done;
      free(positions);
      positions = malloc(sizeof(int32_t) * kKvHeads * (size_t)max_selected);
      if (!positions) {
        fprintf(stderr, "quickstart_c: out of memory\n");
        goto done;
      }
      const void* query_list[1] = {queries};
      if (failed(pqkv_select_batch(store, layer, 1, &seq, query_list, PQKV_F32, positions,
                                   max_selected, lengths, NULL),
                 "pqkv_select_batch"))
        goto done;
      for (int kv = 0; kv < kKvHeads; ++kv) {
        ++looked;
        for (int32_t i = 0; i < lengths[kv]; ++i)
          found += positions[kv * max_selected + i] == target[kv];
      }

      /* pqkv attends over those positions; the reference attends to all. */
      if (failed(pqkv_sequence_attend(seq, layer, queries, out, PQKV_F32, NULL),
                 "pqkv_sequence_attend") ||
          failed(pqkv_sequence_attend_exact(seq, layer, queries, exact, PQKV_F32, NULL),
                 "pqkv_sequence_attend_exact"))
        goto done;
      for (long i = 0; i < q_size; ++i)
        max_error = fmax(max_error, fabs(out[i] - exact[i]));
    }
    printf(
        "step %d: %lld tokens per layer, %d of %d looked-for tokens selected, "
        "largest difference from exact attention %.4f\n",
        step, (long long)pqkv_sequence_length(seq, 0), found, looked, max_error);
  }
  if (failed(pqkv_sequence_drop(store, "chat-1"), "pqkv_sequence_drop")) goto done;
  seq = NULL; /* released by the drop */
  rc = 0;

done:
  pqkv_store_close(store); /* NULL does nothing; releases every sequence handle */
  free(positions);
  free(exact);
  free(out);
  free(queries);
  free(values);
  free(keys);
  return rc;
}
