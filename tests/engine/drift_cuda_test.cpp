// Refits on a CUDA store: not implemented yet, refused with a message that
// says what to do (SequenceOptions::refit_threshold is cpu-only).
#include <gtest/gtest.h>

#include "engine_test_util.h"
#include "index/layer_index.h"

namespace pqkv::testing {
namespace {

TEST(DriftCudaTest, RefitsAreRefusedOnACudaStore) {
  PQKV_SKIP_IF_NO_GPU();
  StoreOptions so;
  so.spec = ModelSpec::tiny();
  so.spec.head_dim = 64;  // the CUDA decode path is built for head_dim 64 and 128
  so.device = Device::cuda(0);
  auto store = Store::open(so);
  PQKV_ASSERT_OK(store);
  SequenceOptions o;
  o.refit_threshold = 2.0;
  const Status s = (*store)->create_sequence("s", o).status();
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("refit_threshold"), std::string::npos) << s.to_string();
  o.refit_threshold = 0;
  PQKV_EXPECT_OK((*store)->create_sequence("s", o));

  // The CUDA index itself: no drift tracked, refit Unimplemented.
  auto index = index::make_layer_index(Device::cuda(0), 64, 2, PqConfig{}, SelectionConfig{});
  PQKV_ASSERT_OK(index);
  EXPECT_FALSE((*index)->drift_stats().tracking);
  EXPECT_EQ((*index)->refit(std::vector<float>(64 * 2 * 64, 0.5f), 0, PqConfig{}, nullptr).code(),
            StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace pqkv::testing
