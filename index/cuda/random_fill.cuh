// Seeded random data written straight into device memory, for benchmarks and
// tools that need realistic (never zero) keys, queries and codes at sizes the
// host would take seconds to generate. Element i depends only on (seed, i).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::index::cuda {

// n values of `dtype`, each the sum of two uniforms in [-scale, scale)
// (a triangular distribution centred on zero).
Status fill_random(void* data, DType dtype, int64_t n, uint64_t seed, float scale,
                   cudaStream_t stream);

// n codes uniform in [0, ksub), as uint8 or int64 (the original method's code table).
Status fill_random_codes(uint8_t* codes, int64_t n, int ksub, uint64_t seed, cudaStream_t stream);
Status fill_random_codes(int64_t* codes, int64_t n, int ksub, uint64_t seed, cudaStream_t stream);

}  // namespace pqkv::index::cuda
