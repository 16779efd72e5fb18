/* Compiles pqkv.h as plain C: the embedding header must not need C++. */
#include "pqkv/pqkv.h"

int pqkv_c_header_check(void) {
  pqkv_sequence_options options;
  pqkv_sequence_options_init(&options);
  return options.pq_m > 0 ? 0 : 1;
}
