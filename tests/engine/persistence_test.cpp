// Store::save and Store::open_sequence: a reopened sequence answers exactly as
// the saved one, for every key code; interrupted saves leave the old state or
// the new one; damaged, truncated or missing segment files are named.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "engine_test_util.h"
#include "pqkv/pqkv.h"
#include "pqkv/store.h"
#include "test_util.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

// What a sequence answers: attend outputs and selected positions of every
// layer for a fixed set of queries.
struct Answers {
  std::vector<float> out;
  std::vector<int32_t> positions;
  bool operator==(const Answers&) const = default;
};

Answers answers_of(Store& store, Sequence& seq, uint64_t seed) {
  const ModelSpec& spec = seq.spec();
  Answers a;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, seed + l);
    std::vector<float> out(q.size());
    const Status s =
        seq.attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                   host_view(out.data(), {spec.num_q_heads, spec.head_dim}), Stream::host());
    EXPECT_TRUE(s.ok()) << s.to_string();
    a.out.insert(a.out.end(), out.begin(), out.end());
    auto max_sel = seq.max_selected(l);
    EXPECT_TRUE(max_sel.ok()) << max_sel.status().to_string();
    std::vector<int32_t> positions(static_cast<size_t>(spec.num_kv_heads * *max_sel));
    std::vector<int32_t> lengths(static_cast<size_t>(spec.num_kv_heads));
    SequenceStep step{&seq, host_view(q.data(), {spec.num_q_heads, spec.head_dim}), {}};
    const Status sel = store.select(
        l, {&step, 1}, {positions.data(), *max_sel, lengths.data(), Device::cpu()}, Stream::host());
    EXPECT_TRUE(sel.ok()) << sel.to_string();
    a.positions.insert(a.positions.end(), positions.begin(), positions.end());
  }
  return a;
}

class StoreDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    dir_ = fs::temp_directory_path() /
           ("pqkv-persist-test-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(dir_);
  }
  void TearDown() override {
    engine::set_save_fault_hook(nullptr);
    fs::remove_all(dir_);
  }

  fs::path dir_;
};

class PersistenceTest : public StoreDirTest, public ::testing::WithParamInterface<const char*> {
 protected:
  StoreOptions options(const std::string& fingerprint = "model-a") const {
    StoreOptions o = cpu_store_options(ModelSpec::tiny());
    o.directory = dir_.string();
    o.model_fingerprint = fingerprint;
    return o;
  }
  SequenceOptions sequence_options() const {
    SequenceOptions o;
    auto sel = SelectionConfig::parse(GetParam());
    EXPECT_TRUE(sel.ok()) << sel.status().to_string();
    o.selection = *sel;
    o.pq = PqConfig{4, 4};
    o.budget = BudgetPolicy::ratio_of_context(0.2);
    o.budget.sink = {4, 0.0};
    return o;
  }
  // A prefilled sequence of `prompt` tokens plus `decode` decode tokens.
  std::shared_ptr<Sequence> make(Store& store, const std::string& name, int64_t prompt,
                                 int64_t decode, uint64_t seed) {
    auto seq = store.create_sequence(name, sequence_options());
    EXPECT_TRUE(seq.ok()) << seq.status().to_string();
    PQKV_EXPECT_OK(append_random(seq->get(), prompt, seed));
    PQKV_EXPECT_OK((*seq)->finish_prefill());
    for (int64_t i = 0; i < decode; ++i)
      PQKV_EXPECT_OK(append_random(seq->get(), 1, seed + 100 + i));
    return *seq;
  }
};

TEST_P(PersistenceTest, ReopenedSequenceAnswersAsBefore) {
  SCOPED_TRACE(std::string("selection ") + GetParam());
  Answers before, after_append;
  {
    auto store = Store::open(options());
    PQKV_ASSERT_OK(store);
    auto seq = make(**store, "ctx", 300, 3, 7);
    before = answers_of(**store, *seq, 11);
    PQKV_ASSERT_OK((*store)->save(*seq));
    // After the save: one more decode token, answered by the reopened copy too.
    PQKV_ASSERT_OK(append_random(seq.get(), 1, 99));
    after_append = answers_of(**store, *seq, 13);
  }
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  EXPECT_EQ((*store)->saved_sequence_names().value(), std::vector<std::string>{"ctx"});
  auto seq = (*store)->open_sequence("ctx");
  PQKV_ASSERT_OK(seq);
  EXPECT_TRUE((*seq)->prefilled());
  EXPECT_EQ((*seq)->length(0), 303);
  EXPECT_TRUE(answers_of(**store, **seq, 11) == before);
  PQKV_ASSERT_OK(append_random(seq->get(), 1, 99));
  EXPECT_TRUE(answers_of(**store, **seq, 13) == after_append);
  // The saved codec state and codes were restored, not retrained: the index
  // holds codes for every token at once.
  EXPECT_EQ((*store)->open_sequence("ctx").status().code(), StatusCode::kAlreadyExists);
}

TEST_P(PersistenceTest, InterruptedSaveLeavesOldOrNewState) {
  Answers v1, v2;
  std::vector<engine::SaveStep> steps{engine::SaveStep::kSegmentWritten,
                                      engine::SaveStep::kSegmentDurable,
                                      engine::SaveStep::kCatalogSwitched};
  for (engine::SaveStep stop : steps) {
    SCOPED_TRACE("save stopped at step " + std::to_string(static_cast<int>(stop)));
    fs::remove_all(dir_);
    {
      auto store = Store::open(options());
      PQKV_ASSERT_OK(store);
      auto seq = make(**store, "ctx", 200, 0, 3);
      v1 = answers_of(**store, *seq, 5);
      PQKV_ASSERT_OK((*store)->save(*seq));
      PQKV_ASSERT_OK(append_random(seq.get(), 2, 40));
      v2 = answers_of(**store, *seq, 5);
      engine::set_save_fault_hook([stop](engine::SaveStep at) {
        return at == stop ? Status::io_error("injected crash") : ok_status();
      });
      EXPECT_EQ((*store)->save(*seq).code(), StatusCode::kIoError);
      engine::set_save_fault_hook(nullptr);
    }
    auto store = Store::open(options());
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->open_sequence("ctx");
    PQKV_ASSERT_OK(seq);
    const bool switched = stop == engine::SaveStep::kCatalogSwitched;
    EXPECT_EQ((*seq)->length(0), switched ? 202 : 200);
    EXPECT_TRUE(answers_of(**store, **seq, 5) == (switched ? v2 : v1));
    // Reopening deleted the segment file no entry names: one file is left.
    int segments = 0;
    for (const auto& e : fs::directory_iterator(dir_))
      segments += e.path().extension() == ".pqkv";
    EXPECT_EQ(segments, 1);
  }
}

INSTANTIATE_TEST_SUITE_P(KeyCodes, PersistenceTest,
                         ::testing::Values("pq", "int8", "int4", "exact", "pq+int8:4"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n) {
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return n;
                         });

using PersistenceErrorsTest = StoreDirTest;

// Saves sequences "a" and "b" in dir and returns the segment file of "a".
fs::path save_two(const fs::path& dir, const StoreOptions& o, const SequenceOptions& so) {
  auto store = Store::open(o);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  std::set<fs::path> before;
  for (const char* name : {"a", "b"}) {
    auto seq = (*store)->create_sequence(name, so);
    if (!seq.ok()) {
      ADD_FAILURE() << seq.status().to_string();
      return {};
    }
    PQKV_EXPECT_OK(append_random(seq->get(), 150, name[0]));
    PQKV_EXPECT_OK((*seq)->finish_prefill());
    PQKV_EXPECT_OK((*store)->save(**seq));
    if (std::string(name) == "a") {
      for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".pqkv") before.insert(e.path());
    }
  }
  EXPECT_EQ(before.size(), 1u);
  return before.empty() ? fs::path() : *before.begin();
}

TEST_F(PersistenceErrorsTest, DamagedSegmentsAreNamedAndTheRestStaysUsable) {
  SequenceOptions so;
  so.budget = BudgetPolicy::ratio_of_context(0.2);
  struct Damage {
    const char* what;
    StatusCode code;
    void (*apply)(const fs::path&);
  };
  const Damage damages[] = {
      {"bit flip", StatusCode::kCorruption,
       [](const fs::path& f) {
         std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
         io.seekg(100);
         char c = 0;
         io.read(&c, 1);
         c ^= 0x10;
         io.seekp(100);
         io.write(&c, 1);
       }},
      {"truncation", StatusCode::kCorruption,
       [](const fs::path& f) { fs::resize_file(f, fs::file_size(f) / 2); }},
      {"missing file", StatusCode::kNotFound, [](const fs::path& f) { fs::remove(f); }},
  };
  for (const Damage& d : damages) {
    SCOPED_TRACE(d.what);
    fs::remove_all(dir_);
    StoreOptions o = cpu_store_options(ModelSpec::tiny());
    o.directory = dir_.string();
    const fs::path seg = save_two(dir_, o, so);
    ASSERT_FALSE(seg.empty());
    d.apply(seg);
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto a = (*store)->open_sequence("a");
    ASSERT_FALSE(a.ok());
    EXPECT_EQ(a.status().code(), d.code) << a.status().to_string();
    EXPECT_NE(a.status().message().find(seg.filename().string()), std::string::npos)
        << a.status().to_string();
    EXPECT_TRUE((*store)->get_sequence("a").status().code() == StatusCode::kNotFound);
    PQKV_EXPECT_OK((*store)->open_sequence("b"));
    // The damaged save can still be dropped.
    PQKV_EXPECT_OK((*store)->drop("a"));
    EXPECT_EQ((*store)->saved_sequence_names().value(), std::vector<std::string>{"b"});
  }
}

TEST_F(PersistenceErrorsTest, AnotherModelOrGeometryIsRefused) {
  StoreOptions o = cpu_store_options(ModelSpec::tiny());
  o.directory = dir_.string();
  o.model_fingerprint = "model-a";
  {
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", SequenceOptions{});
    PQKV_ASSERT_OK(seq);
    PQKV_ASSERT_OK(append_random(seq->get(), 100, 1));
    PQKV_ASSERT_OK((*seq)->finish_prefill());
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
  {
    StoreOptions other = o;
    other.model_fingerprint = "model-b";
    auto store = Store::open(other);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->open_sequence("s");
    EXPECT_EQ(seq.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(seq.status().message().find("model-a"), std::string::npos)
        << seq.status().to_string();
  }
  {
    StoreOptions other = o;
    other.spec = ModelSpec::tiny_mha();
    auto store = Store::open(other);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->open_sequence("s");
    EXPECT_EQ(seq.status().code(), StatusCode::kFailedPrecondition) << seq.status().to_string();
  }
  auto store = Store::open(o);
  PQKV_ASSERT_OK(store);
  PQKV_EXPECT_OK((*store)->open_sequence("s"));
}

TEST_F(PersistenceErrorsTest, DropAndCompactReclaimDiskSpace) {
  StoreOptions o = cpu_store_options(ModelSpec::tiny());
  o.directory = dir_.string();
  auto store = Store::open(o);
  PQKV_ASSERT_OK(store);
  auto seq = (*store)->create_sequence("s", SequenceOptions{});
  PQKV_ASSERT_OK(seq);
  PQKV_ASSERT_OK(append_random(seq->get(), 500, 2));
  PQKV_ASSERT_OK((*seq)->finish_prefill());
  PQKV_ASSERT_OK((*store)->save(**seq));
  // Saving again replaces the segment file.
  PQKV_ASSERT_OK((*store)->save(**seq));
  const auto segments = [&] {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir_))
      n += e.path().extension() == ".pqkv";
    return n;
  };
  EXPECT_EQ(segments(), 1);
  // A stray segment file (a crash's leftover) goes at compaction.
  std::ofstream(dir_ / "seg-000000000999.pqkv") << "orphan";
  PQKV_ASSERT_OK((*store)->compact());
  EXPECT_EQ(segments(), 1);
  PQKV_ASSERT_OK((*store)->drop("s"));
  EXPECT_EQ(segments(), 0);
  EXPECT_TRUE((*store)->saved_sequence_names().value().empty());
  EXPECT_EQ((*store)->drop("s").code(), StatusCode::kNotFound);
  PQKV_ASSERT_OK((*store)->compact());
}

TEST_F(PersistenceErrorsTest, EveryOptionOfTheSequenceSurvivesReopen) {
  StoreOptions o = cpu_store_options(ModelSpec::tiny());
  o.directory = dir_.string();
  SequenceOptions so;
  so.budget = BudgetPolicy::ratio_of_context(0.2);
  so.aggregation = GqaAggregation::kMax;
  so.resident_sink_window = false;
  so.refit_threshold = 3.5;
  so.refit_min_tokens = 4096;
  {
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("s", so);
    PQKV_ASSERT_OK(seq);
    PQKV_ASSERT_OK(append_random(seq->get(), 150, 3));
    PQKV_ASSERT_OK((*seq)->finish_prefill());
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
  auto store = Store::open(o);
  PQKV_ASSERT_OK(store);
  auto seq = (*store)->open_sequence("s");
  PQKV_ASSERT_OK(seq);
  const SequenceOptions& back = (*seq)->options();
  EXPECT_EQ(back.aggregation, GqaAggregation::kMax);
  EXPECT_FALSE(back.resident_sink_window);
  EXPECT_EQ(back.refit_threshold, 3.5);
  EXPECT_EQ(back.refit_min_tokens, 4096);
  EXPECT_EQ(back.budget.top_k.ratio, so.budget.top_k.ratio);
}

TEST_F(PersistenceErrorsTest, InMemoryStoreRefusesSave) {
  auto s = open_small_store(ModelSpec::tiny(), SequenceOptions{});
  EXPECT_EQ(s.store->save(*s.seq).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.store->open_sequence("s").status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace pqkv::testing

namespace pqkv::testing {
namespace {

TEST_F(PersistenceErrorsTest, CApiSavesAndReopens) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  const std::string dir = dir_.string();
  so.directory = dir.c_str();
  so.model_fingerprint = "m1";
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  const int64_t n = 120;
  auto k = random_floats(n * 2 * 32, 1);
  auto v = random_floats(n * 2 * 32, 2);
  std::vector<float> q = random_floats(4 * 32, 3), out(4 * 32), again(4 * 32);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  pqkv_sequence* seq = nullptr;
  ASSERT_EQ(pqkv_sequence_create(store, "c", &qo, &seq), PQKV_OK) << pqkv_last_error();
  for (int l = 0; l < 2; ++l)
    ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), v.data(), n, PQKV_F32, nullptr), PQKV_OK);
  ASSERT_EQ(pqkv_sequence_finish_prefill(seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_attend(seq, 1, q.data(), out.data(), PQKV_F32, nullptr), PQKV_OK);
  ASSERT_EQ(pqkv_sequence_save(store, seq), PQKV_OK) << pqkv_last_error();
  EXPECT_EQ(pqkv_sequence_open(store, "c", &seq), PQKV_ALREADY_EXISTS);
  ASSERT_EQ(pqkv_sequence_close(store, "c"), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_open(store, "c", &seq), PQKV_OK) << pqkv_last_error();
  ASSERT_EQ(pqkv_sequence_attend(seq, 1, q.data(), again.data(), PQKV_F32, nullptr), PQKV_OK);
  EXPECT_EQ(out, again);
  EXPECT_EQ(pqkv_store_compact(store), PQKV_OK) << pqkv_last_error();
  pqkv_store_close(store);
}

TEST_F(PersistenceErrorsTest, CApiListsSavedNames) {
  pqkv_model_spec spec;
  ASSERT_EQ(pqkv_model_spec_preset("tiny", &spec), PQKV_OK);
  pqkv_store_options so;
  pqkv_store_options_init(&so, &spec);
  const std::string dir = dir_.string();
  so.directory = dir.c_str();
  pqkv_sequence_options qo;
  pqkv_sequence_options_init(&qo);
  pqkv_store* store = nullptr;
  ASSERT_EQ(pqkv_store_open(&so, &store), PQKV_OK) << pqkv_last_error();
  int64_t needed = -1;
  ASSERT_EQ(pqkv_store_saved_sequence_names(store, nullptr, 0, &needed), PQKV_OUT_OF_RANGE);
  EXPECT_EQ(needed, 1);  // no names: the closing NUL alone
  auto k = random_floats(40 * 2 * 32, 1);
  for (const char* name : {"alpha", "b"}) {
    pqkv_sequence* seq = nullptr;
    ASSERT_EQ(pqkv_sequence_create(store, name, &qo, &seq), PQKV_OK) << pqkv_last_error();
    for (int l = 0; l < 2; ++l)
      ASSERT_EQ(pqkv_sequence_append(seq, l, k.data(), k.data(), 40, PQKV_F32, nullptr), PQKV_OK);
    ASSERT_EQ(pqkv_sequence_save(store, seq), PQKV_OK) << pqkv_last_error();
  }
  ASSERT_EQ(pqkv_store_saved_sequence_names(store, nullptr, 0, &needed), PQKV_OUT_OF_RANGE);
  EXPECT_EQ(needed, 9);
  EXPECT_NE(std::string(pqkv_last_error()).find("9 bytes"), std::string::npos) << pqkv_last_error();
  std::vector<char> names(static_cast<size_t>(needed));
  ASSERT_EQ(pqkv_store_saved_sequence_names(store, names.data(), needed, &needed), PQKV_OK)
      << pqkv_last_error();
  EXPECT_EQ(std::string(names.data(), names.size()), std::string("alpha\0b\0\0", 9));
  EXPECT_EQ(pqkv_store_saved_sequence_names(store, nullptr, 4, &needed), PQKV_INVALID_ARGUMENT);
  pqkv_store_close(store);
}

}  // namespace
}  // namespace pqkv::testing
