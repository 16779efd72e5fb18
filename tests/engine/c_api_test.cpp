#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "engine/c_handles.h"
#include "pqkv/pqkv.h"
#include "pqkv/store.h"
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

// DRAM preallocation through the C ABI: at open, later, repeated, and past
// the budget (refused, nothing taken).
TEST(CApiTest, PreallocateDram) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  EXPECT_EQ(so.dram_prealloc_bytes, 0);
  pqkv_store* probe = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &probe), PQKV_OK) << pqkv_last_error();
  const int64_t need = pqkv_store_dram_bytes_for_tokens(probe, 256);
  EXPECT_GT(need, 0);
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(probe, 0), 0);
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(nullptr, 256), -1);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT);
  // Past int64 the bytes saturate (they wrapped to 0 before), and taking
  // them is refused before anything is allocated (it answered OK, taking nothing).
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(probe, INT64_MAX), INT64_MAX);
  EXPECT_EQ(pqkv_store_dram_bytes_for_tokens(probe, INT64_MAX / 2), INT64_MAX);
  EXPECT_EQ(pqkv_store_preallocate_dram(probe, INT64_MAX), PQKV_RESOURCE_EXHAUSTED);
  EXPECT_NE(std::strstr(pqkv_last_error(), "nothing was taken"), nullptr) << pqkv_last_error();
  // INT64_MAX rounds to 2^63 as a double: the message printed it as a negative count.
  EXPECT_EQ(std::strstr(pqkv_last_error(), "-9223372036854775808"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_dram_bytes_used(probe), 0);
  // Past the machine's memory with no budget: refused at once (it allocated
  // for seconds until the system refused).
  EXPECT_EQ(pqkv_store_preallocate_dram(probe, int64_t{1} << 50), PQKV_RESOURCE_EXHAUSTED);
  EXPECT_NE(std::strstr(pqkv_last_error(), "this machine's"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_dram_bytes_used(probe), 0);
  pqkv_store_close(probe);

  so.dram_prealloc_bytes = need;
  so.dram_budget_bytes = 4 * need;
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_dram_bytes_used(store), need);
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  auto k = pqkv::testing::random_floats(256 * 2 * 32, 4);
  for (int l = 0; l < 2; ++l) {
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), k.data(), 256, PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
  }
  EXPECT_EQ(pqkv_store_dram_bytes_used(store), need) << "the appends used the preallocation";
  ASSERT_EQ(pqkv_store_preallocate_dram(store, need), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_store_preallocate_dram(store, need), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_dram_bytes_used(store), 2 * need) << "a repeat takes nothing";
  EXPECT_EQ(pqkv_store_preallocate_dram(store, 4 * need), PQKV_RESOURCE_EXHAUSTED);
  EXPECT_NE(std::strstr(pqkv_last_error(), "dram_budget_bytes"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_store_dram_bytes_used(store), 2 * need);
  EXPECT_EQ(pqkv_store_preallocate_dram(store, -1), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_store_preallocate_dram(nullptr, 1), PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);

  so.dram_prealloc_bytes = 5 * need;
  EXPECT_EQ(pqkv_store_open(&so, &store), PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "dram_prealloc_bytes"), nullptr) << pqkv_last_error();
}

// finish_prefill_layer through the C ABI: each layer's build starts after
// its append; a second call, a NULL sequence and appends to an ended layer
// are refused; the decode step equals one after finish_prefill alone.
TEST(CApiTest, FinishPrefillLayerStartsEachBuild) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  qo.top_k.ratio = 0.1;
  const int64_t n = 300;
  auto k = pqkv::testing::random_floats(n * 2 * 32, 11);
  auto v = pqkv::testing::random_floats(n * 2 * 32, 12);
  std::vector<float> q = pqkv::testing::random_floats(4 * 32, 13);
  std::vector<std::vector<float>> outs;
  for (bool ended : {false, true}) {
    pqkv_sequence* seq = nullptr;
    ASSERT_EQ(pqkv_sequence_create(store, ended ? "ended" : "plain", &qo, &seq), PQKV_OK)
        << pqkv_last_error();
    for (int l = 0; l < 2; ++l) {
      ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
          << pqkv_last_error();
      if (!ended) continue;
      ASSERT_EQ(pqkv_sequence_finish_prefill_layer(seq, l, nullptr), PQKV_OK) << pqkv_last_error();
      EXPECT_EQ(pqkv_sequence_finish_prefill_layer(seq, l, nullptr), PQKV_FAILED_PRECONDITION);
      EXPECT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), 1, PQKV_F32, nullptr),
                PQKV_FAILED_PRECONDITION);
    }
    ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
    std::vector<float> out(4 * 32);
    ASSERT_EQ(pqkv_sequence_attend(seq, 1, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
    outs.push_back(out);
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(pqkv_sequence_finish_prefill_layer(nullptr, 0, nullptr), PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);
}

// A C caller may pass any int as an enum and NULL for any pointer: the
// initializers leave NULL alone (once a segfault), names fall back to UNKNOWN.
TEST(CApiTest, InitializersTakeNullAndNamesTakeAnyInt) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options_init(nullptr, &spec);
  pqkv_store_options_init(nullptr, nullptr);
  pqkv_sequence_options_init(nullptr);
  pqkv_store_options o;
  pqkv_store_options_init(&o, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&o, &store), PQKV_OK) << pqkv_last_error();
  // A failed get left *out as it was: a stale handle for a caller testing it.
  auto* stale = reinterpret_cast<pqkv_sequence*>(&o);
  EXPECT_EQ(pqkv_sequence_get(store, "none", &stale), PQKV_NOT_FOUND);
  EXPECT_EQ(stale, nullptr);
  pqkv_store_close(store);
  pqkv_store_options_init(&o, nullptr);  // defaults, a zero spec
  EXPECT_EQ(o.cuda_device, -1);
  EXPECT_EQ(o.spec.num_layers, 0);
  // The code of a failure that answers -1 instead of a status.
  EXPECT_EQ(pqkv_sequence_length(nullptr, 0), -1);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  EXPECT_EQ(pqkv_last_error_code(), PQKV_OK);
  for (const int code : {-1, 12, 1 << 20, INT32_MIN}) {
    pqkv_status s;
    std::memcpy(&s, &code, sizeof s);
    EXPECT_STREQ(pqkv_status_name(s), "UNKNOWN") << code;
  }
}

// block_cache_admit_steps (appended to pqkv_store_options): the initializer
// gives the C++ default, 0 keeps it, a value reaches the store as given, and
// what StoreOptions refuses is refused naming the field and the value.
TEST(CApiTest, BlockCacheAdmitStepsReachesTheStoreAndIsChecked) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options o;
  pqkv_store_options_init(&o, &spec);
  EXPECT_EQ(o.block_cache_admit_steps, pqkv::StoreOptions{}.block_cache_admit_steps);
  o.block_cache_bytes = int64_t{1} << 20;
  const auto opened_with = [&](int admit) {
    o.block_cache_admit_steps = admit;
    pqkv_store* store = nullptr;
    EXPECT_EQ(pqkv_store_open(&o, &store), PQKV_OK) << admit << ": " << pqkv_last_error();
    auto st = pqkv::capi::resolve_store(store, "store");
    const int got = st.ok() ? (*st)->store->options().block_cache_admit_steps : -1;
    pqkv_store_close(store);
    return got;
  };
  EXPECT_EQ(opened_with(0), 1);
  EXPECT_EQ(opened_with(2), 2);
  EXPECT_EQ(opened_with(7), 7);
  for (const auto& [tokens, admit] :
       std::vector<std::pair<int64_t, int>>{{64, -1}, {64, INT_MIN}, {1, 3}, {1, INT_MAX}}) {
    o.block_cache_tokens = tokens;
    o.block_cache_admit_steps = admit;
    pqkv_store* store = nullptr;
    EXPECT_EQ(pqkv_store_open(&o, &store), PQKV_INVALID_ARGUMENT) << tokens << " " << admit;
    EXPECT_EQ(store, nullptr);
    const std::string msg = pqkv_last_error();
    EXPECT_NE(msg.find("block_cache_admit_steps"), std::string::npos) << msg;
    EXPECT_NE(msg.find("got " + std::to_string(admit)), std::string::npos) << msg;
  }
}

TEST(CApiTest, NamesVersionAndLayerErrors) {
  EXPECT_STREQ(pqkv_status_name(PQKV_OK), "OK");
  EXPECT_STREQ(pqkv_status_name(PQKV_OUT_OF_RANGE), "OUT_OF_RANGE");
  EXPECT_STREQ(pqkv_status_name(static_cast<pqkv_status>(99)), "UNKNOWN");
  EXPECT_GT(std::strlen(pqkv_version()), 4u);
  EXPECT_NE(std::strchr(pqkv_version(), '.'), nullptr);

  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  EXPECT_EQ(qo.max_train_points_per_centroid, 32);
  EXPECT_EQ(qo.seed, 1234u);
  qo.max_train_points_per_centroid = 0;
  qo.seed = 99;
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "a", &qo, &seq), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_length(seq, 0), 0);
  EXPECT_EQ(pqkv_sequence_length(seq, 2), -1);
  EXPECT_NE(std::strstr(pqkv_last_error(), "out of range"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_length(seq, -1), -1);
  EXPECT_EQ(pqkv_sequence_max_selected(seq, 0), -1);  // before finish_prefill
  EXPECT_NE(std::strstr(pqkv_last_error(), "finish_prefill"), nullptr) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_reserve(seq, -5), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_sequence_check_health(seq), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_check_health(nullptr), PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);
}

// The selection by name: every code the C++ API parses, attending as a C++
// sequence with that SelectionConfig does; the defaults; a clear refusal of
// an unknown name.
TEST(CApiTest, SelectionAndResidentRowsByName) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  EXPECT_EQ(so.hbm_budget_bytes, int64_t{8} << 30);
  so.hbm_budget_bytes = -1;
  pqkv_store* store = nullptr;
  EXPECT_EQ(pqkv_store_open(&so, &store), PQKV_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(pqkv_last_error(), "hbm_budget_bytes"), nullptr) << pqkv_last_error();
  so.hbm_budget_bytes = 0;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  EXPECT_EQ(qo.selection, nullptr);
  EXPECT_EQ(qo.resident_sink_window, 1);
  qo.selection = "int5";
  pqkv_sequence* seq = nullptr;
  EXPECT_EQ(pqkv_sequence_create(store, "bad", &qo, &seq), PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(seq, nullptr);
  EXPECT_NE(std::strstr(pqkv_last_error(), "int5"), nullptr) << pqkv_last_error();

  pqkv::StoreOptions cpp_options;
  cpp_options.spec = *pqkv::ModelSpec::preset("tiny");
  auto cpp_store = pqkv::Store::open(cpp_options);
  ASSERT_TRUE(cpp_store.ok()) << cpp_store.status().to_string();
  const int64_t n = 300;
  const auto k = pqkv::testing::random_floats(n * 2 * 32, 4);
  const auto v = pqkv::testing::random_floats(n * 2 * 32, 5);
  auto q = pqkv::testing::random_floats(4 * 32, 6);
  const pqkv::TensorView kv_k(const_cast<float*>(k.data()), pqkv::DType::kF32, pqkv::Device::cpu(),
                              {n, 2, 32});
  const pqkv::TensorView kv_v(const_cast<float*>(v.data()), pqkv::DType::kF32, pqkv::Device::cpu(),
                              {n, 2, 32});
  std::vector<std::vector<float>> outputs;
  for (const char* name : {"int4", "int8", "pq", "oracle", "pq+int8:4"}) {
    SCOPED_TRACE(name);
    qo.selection = name;
    qo.resident_sink_window = 0;
    qo.sink = {4, 0.0};
    qo.window = {8, 0.0};
    qo.top_k = {12, 0.0};
    ASSERT_EQ(pqkv_sequence_create(store, name, &qo, &seq), PQKV_OK) << pqkv_last_error();
    pqkv::SequenceOptions o;
    o.budget.sink = {4, 0.0};
    o.budget.window = {8, 0.0};
    o.budget.top_k = {12, 0.0};
    o.resident_sink_window = false;
    auto selection = pqkv::SelectionConfig::parse(name);
    ASSERT_TRUE(selection.ok()) << selection.status().to_string();
    o.selection = *selection;
    auto twin = (*cpp_store)->create_sequence(name, o);
    ASSERT_TRUE(twin.ok()) << twin.status().to_string();
    for (int l = 0; l < 2; ++l) {
      ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK)
          << pqkv_last_error();
      PQKV_ASSERT_OK((*twin)->append(l, kv_k, kv_v, pqkv::Stream::host()));
    }
    ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
    PQKV_ASSERT_OK((*twin)->finish_prefill());
    std::vector<float> out(4 * 32), want(4 * 32);
    ASSERT_EQ(pqkv_sequence_attend(seq, 1, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK)
        << pqkv_last_error();
    PQKV_ASSERT_OK((*twin)->attend(
        1, pqkv::TensorView(q.data(), pqkv::DType::kF32, pqkv::Device::cpu(), {4, 32}),
        pqkv::TensorView(want.data(), pqkv::DType::kF32, pqkv::Device::cpu(), {4, 32}),
        pqkv::Stream::host()));
    EXPECT_EQ(out, want);
    outputs.push_back(out);
  }
  // The name reached the index: PQ (the third) and the oracle (the fourth)
  // pick different tokens on random keys.
  EXPECT_NE(outputs[2], outputs[3]);
  pqkv_store_close(store);
}

// Three sequences of different lengths through the batched calls, against
// the single-sequence call.
TEST(CApiTest, BatchedAttendAndSelect) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  const int n = 3;
  const int64_t lengths[n] = {300, 150, 80};
  pqkv_sequence* seqs[n];
  for (int i = 0; i < n; ++i) {
    pqkv_sequence_options qo;
    pqkv_sequence_options_init(&qo);
    qo.pq_m = 4;
    qo.pq_bits = 4;
    qo.top_k = {0, 0.05 * (i + 1)};
    const std::string name = std::string("s").append(std::to_string(i));
    ASSERT_EQ(pqkv_sequence_create(store, name.c_str(), &qo, &seqs[i]), PQKV_OK)
        << pqkv_last_error();
    ASSERT_EQ(pqkv_sequence_reserve(seqs[i], 512), PQKV_OK) << pqkv_last_error();
    const int64_t used = pqkv_store_dram_bytes_used(store);
    auto k = pqkv::testing::random_floats(lengths[i] * 64, 10 + i);
    for (int l = 0; l < 2; ++l) {
      ASSERT_EQ(pqkv_sequence_append(seqs[i], l, k.data(), k.data(), lengths[i], PQKV_F32, nullptr),
                PQKV_OK)
          << pqkv_last_error();
    }
    EXPECT_EQ(pqkv_store_dram_bytes_used(store), used) << "appends within the reservation";
    ASSERT_EQ(pqkv_sequence_finish_prefill(seqs[i]), PQKV_OK) << pqkv_last_error();
  }
  std::vector<std::vector<float>> q(n), one(n), batched(n);
  const void* queries[n];
  void* outs[n];
  int64_t max_selected = 0;
  for (int i = 0; i < n; ++i) {
    q[i] = pqkv::testing::random_floats(4 * 32, 20 + i);
    one[i].assign(4 * 32, 0);
    batched[i].assign(4 * 32, 0);
    queries[i] = q[i].data();
    outs[i] = batched[i].data();
    ASSERT_EQ(pqkv_sequence_attend(seqs[i], 1, q[i].data(), one[i].data(), PQKV_F32, nullptr),
              PQKV_OK)
        << pqkv_last_error();
    max_selected = std::max(max_selected, pqkv_sequence_max_selected(seqs[i], 1));
  }
  ASSERT_EQ(pqkv_attend_batch(store, 1, n, seqs, queries, outs, PQKV_F32, nullptr), PQKV_OK)
      << pqkv_last_error();
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(one[i], batched[i]) << "sequence " << i;

  std::vector<int32_t> positions(n * 2 * max_selected);
  std::vector<int32_t> lens(n * 2);
  EXPECT_EQ(pqkv_select_batch(store, 1, n, seqs, queries, PQKV_F32, positions.data(),
                              max_selected - 1, lens.data(), nullptr),
            PQKV_OUT_OF_RANGE);
  EXPECT_NE(std::strstr(pqkv_last_error(), std::to_string(max_selected).c_str()), nullptr)
      << pqkv_last_error();
  ASSERT_EQ(pqkv_select_batch(store, 1, n, seqs, queries, PQKV_F32, positions.data(), max_selected,
                              lens.data(), nullptr),
            PQKV_OK)
      << pqkv_last_error();
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(lens[i * 2 + h], pqkv_sequence_max_selected(seqs[i], 1));
      const int32_t* row = positions.data() + (i * 2 + h) * max_selected;
      for (int64_t j = 0; j < max_selected; ++j) {
        if (j < lens[i * 2 + h]) {
          EXPECT_GE(row[j], 0);
          EXPECT_LT(row[j], lengths[i]);
        } else {
          EXPECT_EQ(row[j], -1);
        }
      }
    }
  }
  EXPECT_EQ(pqkv_attend_batch(store, 7, n, seqs, queries, outs, PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  EXPECT_EQ(pqkv_attend_batch(nullptr, 1, n, seqs, queries, outs, PQKV_F32, nullptr),
            PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);
}

}  // namespace
