// GPU test of the CUDA error check: an error it reports is not reported
// again by the next launch check.
#include <gtest/gtest.h>

#if PQKV_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#include "test_util.h"

namespace pqkv {
namespace {

Status copy_in_no_direction(void* dst, const void* src) {
  // Not a cudaMemcpyKind: a non-sticky error.
  PQKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, 4, static_cast<cudaMemcpyKind>(99)));
  return ok_status();
}

Status check_launch() {
  PQKV_CUDA_CHECK_LAUNCH();
  return ok_status();
}

TEST(CudaCheckTest, AReportedErrorDoesNotResurfaceInTheNextLaunchCheck) {
  PQKV_SKIP_IF_NO_GPU();
  float a = 1.0f;
  float b = 0.0f;
  const Status failed = copy_in_no_direction(&b, &a);
  EXPECT_EQ(failed.code(), StatusCode::kInternal) << failed.to_string();
  EXPECT_NE(failed.message().find("cudaMemcpy"), std::string::npos) << failed.to_string();
  PQKV_EXPECT_OK(check_launch());
}

}  // namespace
}  // namespace pqkv
#endif  // PQKV_HAVE_CUDA
