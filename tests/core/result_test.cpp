// Result<T>::value() on an error stops the process with the Status message,
// in Release builds too, rather than reading an empty value.
#include <gtest/gtest.h>

#include "pqkv/status.h"
#include "test_util.h"

namespace {

pqkv::Result<int> failing() {
  return pqkv::Status::unavailable("no CUDA device: open the store on Device::cpu()");
}

TEST(ResultDeathTest, ValueOnAnErrorPrintsTheStatusAndAborts) {
  EXPECT_DEATH((void)failing().value(), "Unavailable: no CUDA device: open the store on");
}

TEST(ResultDeathTest, DereferenceOnAnErrorAborts) {
  EXPECT_DEATH((void)*failing(), "Result::value\\(\\) called on an error");
}

TEST(ResultTest, ValueOnSuccess) {
  pqkv::Result<int> r = 7;
  PQKV_ASSERT_OK(r);
  EXPECT_EQ(r.value(), 7);
}

}  // namespace
