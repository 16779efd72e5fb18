#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "pqkv/pqkv.h"
#include "test_util.h"

namespace {

TEST(CApiTest, PrefillDecodeAndErrors) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  EXPECT_EQ(pqkv_model_spec_preset("nope", &spec), PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "unknown model preset"), nullptr);

  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  pqkv_sequence* again = nullptr;
  EXPECT_EQ(pqkv_sequence_create(store, "a", &qo, &again), PQKV_ALREADY_EXISTS);
  EXPECT_EQ(again, nullptr);

  const int64_t n = 100;
  auto k = pqkv::testing::random_floats(n * 2 * 32, 1);
  auto v = pqkv::testing::random_floats(n * 2 * 32, 2);
  std::vector<float> q = pqkv::testing::random_floats(4 * 32, 3), out(4 * 32), exact(4 * 32);
  EXPECT_EQ(pqkv_sequence_attend(seq, 0, q.data(), out.data(), PQKV_F32, nullptr),
            PQKV_FAILED_PRECONDITION);
  for (int l = 0; l < 2; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  EXPECT_EQ(pqkv_sequence_length(seq, 1), n);
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_attend(seq, 1, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK);
  ASSERT_EQ(pqkv_sequence_attend_exact(seq, 1, q.data(), exact.data(), PQKV_F32, nullptr), PQKV_OK);
  EXPECT_EQ(pqkv_sequence_attend(seq, 9, q.data(), out.data(), PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "out of range"), nullptr);
  EXPECT_EQ(pqkv_sequence_attend(seq, 0, q.data(), out.data(), static_cast<pqkv_dtype>(7), nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_GT(pqkv_store_dram_bytes_used(store), 0);
  ASSERT_EQ(pqkv_sequence_drop(store, "a"), PQKV_OK);
  EXPECT_EQ(pqkv_sequence_get(store, "a", &seq), PQKV_NOT_FOUND);
  pqkv_store_close(store);
}

}  // namespace
