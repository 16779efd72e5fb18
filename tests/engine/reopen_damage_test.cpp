// A store whose catalog entries or files were damaged on disk, reopened: every
// value read back (records, manifests, index records, code chunks) is checked
// against its CRC-32C, and, past it (damage written with a matching sum), by
// its decoder before use. Each damaged copy of a saved sequence must open (when the damage
// is harmless) or fail with Corruption / InvalidArgument / NotFound /
// FailedPrecondition naming what is wrong; never a crash, a sanitizer report,
// a huge allocation (reported as ResourceExhausted) or an exception
// (Internal).
//
// The damaged copies live side by side in one catalog: each is a copy of a
// saved sequence's entries under another name with one value changed, so one
// store open covers thousands of them.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/saved_sequences.h"
#include "engine_test_util.h"
#include "pqkv/pqkv.h"
#include "pqkv/store.h"
#include "storage/catalog.h"
#include "storage/checksum.h"
#include "test_util.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

std::string hex(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

// Names of one length, so that a copy's record holds its name in place.
std::string read_file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

constexpr char kBaseRerank[] = "base-pq2";  // PQ then int8 rerank: two stages per layer
constexpr char kBaseInt4[] = "base-in4";    // int4, decode tokens after the prompt
constexpr char kBaseRaw[] = "base-raw";     // saved before finish_prefill: no index
std::string copy_name(size_t i) {
  const std::string n = std::to_string(i);
  std::string name = "m";
  name.append(7 - n.size(), '0');
  return name.append(n);
}

// The codes the status of a damaged copy may have.
bool acceptable(StatusCode c) {
  return c == StatusCode::kOk || c == StatusCode::kCorruption ||
         c == StatusCode::kInvalidArgument || c == StatusCode::kNotFound ||
         c == StatusCode::kFailedPrecondition;
}

class ReopenDamageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("pqkv-reopen-damage-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  StoreOptions options() const {
    StoreOptions o = cpu_store_options(ModelSpec::tiny());
    o.directory = dir_.string();
    o.model_fingerprint = "model-a";
    return o;
  }

  // Saves the three base sequences.
  void save_bases() {
    auto store = Store::open(options());
    PQKV_ASSERT_OK(store);
    for (const char* name : {kBaseRerank, kBaseInt4, kBaseRaw}) {
      SequenceOptions so;
      so.pq = PqConfig{4, 4};
      so.budget = BudgetPolicy::ratio_of_context(0.2);
      if (name == std::string(kBaseRerank)) {
        auto sel = SelectionConfig::parse("pq+int8:4");
        PQKV_ASSERT_OK(sel);
        so.selection = *sel;
      }
      auto seq = (*store)->create_sequence(name, so);
      PQKV_ASSERT_OK(seq);
      PQKV_ASSERT_OK(append_random(seq->get(), 150, name[5]));
      if (name != std::string(kBaseRaw)) PQKV_ASSERT_OK((*seq)->finish_prefill());
      if (name == std::string(kBaseInt4)) PQKV_ASSERT_OK(append_random(seq->get(), 3, 7));
      PQKV_ASSERT_OK((*store)->save(**seq));
    }
  }

  // Opens every name in `names` through the Store and uses what opens.
  void open_each(const std::vector<std::string>& names,
                 const std::map<std::string, std::string>& what) {
    auto store = Store::open(options());
    PQKV_ASSERT_OK(store);
    const ModelSpec spec = ModelSpec::tiny();
    int opened = 0, refused = 0;
    for (const std::string& name : names) {
      const std::string trace = name + ": " + what.at(name);
      auto seq = (*store)->open_sequence(name);
      if (!seq.ok()) {
        ++refused;
        EXPECT_TRUE(acceptable(seq.status().code())) << trace << " -> " << seq.status().to_string();
        EXPECT_FALSE(seq.status().message().empty()) << trace;
        continue;
      }
      ++opened;
      // What opened answers a step without a sanitizer report.
      for (int l = 0; l < spec.num_layers; ++l) {
        auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, 5 + l);
        std::vector<float> out(q.size());
        const Status s = (*seq)->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                        host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                        Stream::host());
        EXPECT_TRUE(acceptable(s.code())) << trace << " attend -> " << s.to_string();
        if (s.ok()) {
          for (float v : out)
            ASSERT_TRUE(std::isfinite(v)) << trace << " attend gave " << v;
        }
      }
      PQKV_EXPECT_OK((*store)->close_sequence(name));
    }
    std::printf("%d damaged copies opened, %d refused\n", opened, refused);
    // The store still lists and opens its undamaged sequences.
    for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
      auto seq = (*store)->open_sequence(base);
      PQKV_EXPECT_OK(seq);
    }
  }

  fs::path dir_;
};

// The payload of a value the current format sealed (storage/checksum.h).
std::string payload_of(const std::string& sealed) {
  EXPECT_GE(sealed.size(), 4u);
  return sealed.substr(0, sealed.size() - 4);
}

// The changes made to one value: truncations, extensions, and at each byte
// offset a flipped byte and the integers and doubles that break sizes.
std::vector<std::pair<std::string, std::string>> damaged_values(const std::string& v,
                                                                bool every_offset,
                                                                std::mt19937_64& rng) {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t n : {size_t{0}, size_t{1}, v.size() / 2, v.size() > 0 ? v.size() - 1 : 0}) {
    if (n < v.size()) out.push_back({"truncated to " + std::to_string(n), v.substr(0, n)});
  }
  out.push_back({"one byte more", v + std::string(1, '\x01')});
  out.push_back({"8 bytes more", v + std::string(8, '\xff')});
  const auto put_at = [&](size_t at, const void* p, size_t n, const std::string& what) {
    if (at + n > v.size()) return;
    std::string d = v;
    std::memcpy(d.data() + at, p, n);
    if (d != v) out.push_back({what + " at byte " + std::to_string(at), d});
  };
  const int64_t i64s[] = {-1, std::numeric_limits<int64_t>::max(), int64_t{1} << 40};
  const int32_t i32s[] = {-1, std::numeric_limits<int32_t>::max(), 65536};
  const double f64s[] = {std::nan(""), std::numeric_limits<double>::infinity()};
  // Every offset of a small value, or of a large one's first 96 bytes (its
  // header fields) and some others.
  std::vector<size_t> offsets;
  const size_t every = every_offset ? std::min<size_t>(v.size(), v.size() <= 512 ? 512 : 96) : 0;
  for (size_t at = 0; at < every; ++at)
    offsets.push_back(at);
  for (int i = 0; i < 8 && v.size() > every; ++i)
    offsets.push_back(every + rng() % (v.size() - every));
  for (size_t at : offsets) {
    std::string d = v;
    d[at] = static_cast<char>(d[at] ^ 0xff);
    out.push_back({"byte flipped at " + std::to_string(at), d});
    for (int64_t x : i64s)
      put_at(at, &x, sizeof(x), "int64 " + std::to_string(x));
    for (int32_t x : i32s)
      put_at(at, &x, sizeof(x), "int32 " + std::to_string(x));
    for (double x : f64s)
      put_at(at, &x, sizeof(x), "double " + std::to_string(x));
    const uint8_t b = static_cast<uint8_t>(rng());
    put_at(at, &b, 1, "byte " + std::to_string(b));
  }
  return out;
}

TEST_F(ReopenDamageTest, EveryDamagedCatalogValueIsRefusedOrHarmless) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  save_bases();
  std::vector<std::string> names;
  std::map<std::string, std::string> what;
  {
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    storage::Catalog::Batch batch;
    for (const std::string base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
      const std::string prefix = "seq/" + hex(base) + "/";
      auto entries = (*catalog)->scan(prefix);
      PQKV_ASSERT_OK(entries);
      ASSERT_FALSE(entries->empty());
      for (const auto& [key, sealed] : *entries) {
        const std::string value = payload_of(sealed);
        const std::string field = key.substr(prefix.size());
        // Records and manifests are damaged at every offset; code chunks,
        // which any byte value fits, at a few.
        // Every offset of the rerank sequence's record, manifest and first
        // index record; a few offsets of the other values.
        const bool small = base == kBaseRerank &&
                           (field == "record" || field == "segment" || field == "index/000000");
        for (auto& [change, damaged] : damaged_values(value, small, rng)) {
          const std::string name = copy_name(names.size());
          names.push_back(name);
          what[name] = base + " " + field + ": " + change;
          const std::string to = "seq/" + hex(name) + "/";
          // Sealed again under the copy's keys: each damage reaches the
          // decoders, as damage whose sum happens to match would.
          for (const auto& [k, v] : *entries) {
            std::string copied = k == key ? damaged : payload_of(v);
            // The record holds the sequence's name after its version and length.
            if (k.size() >= 7 && k.compare(k.size() - 7, 7, "/record") == 0 &&
                copied.size() >= 20 && copied.compare(12, 8, base) == 0) {
              copied.replace(12, 8, name);
            }
            const std::string to_key = to + k.substr(prefix.size());
            batch.put(to_key, storage::seal_value(to_key, copied));
          }
        }
      }
    }
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  }
  std::printf("%zu damaged copies\n", names.size());
  open_each(names, what);

  // Read-only, as the tools read: info, verify, read_index, read_keys.
  auto saved =
      engine::SavedSequences::open(dir_.string(), engine::SavedSequences::Access::kReadOnly);
  PQKV_ASSERT_OK(saved);
  const auto names_read = (*saved)->names();
  PQKV_ASSERT_OK(names_read);
  const std::vector<std::string>& listed = *names_read;
  for (const std::string& name : names) {
    const std::string trace = name + ": " + what.at(name);
    auto info = (*saved)->info(name);
    if (!info.ok()) {
      EXPECT_TRUE(acceptable(info.status().code())) << trace << " -> " << info.status().to_string();
      continue;
    }
    const Status v = (*saved)->verify(name);
    EXPECT_TRUE(acceptable(v.code())) << trace << " verify -> " << v.to_string();
    for (int l = 0; l < info->spec.num_layers; ++l) {
      auto idx = (*saved)->read_index(name, l);
      EXPECT_TRUE(acceptable(idx.status().code())) << trace << " -> " << idx.status().to_string();
      auto keys = (*saved)->read_keys(name, l);
      EXPECT_TRUE(acceptable(keys.status().code())) << trace << " -> " << keys.status().to_string();
    }
  }
  // A record whose name is not its key's is not listed under a name that
  // opens another sequence.
  for (const std::string& n : listed) {
    auto info = (*saved)->info(n);
    if (info.ok()) {
      EXPECT_EQ(info->name, n);
    }
  }
}

// One sequence's damaged segment manifest once made Store::open fail for the
// whole directory (its orphan sweep decoded every manifest).
TEST_F(ReopenDamageTest, OneDamagedManifestLeavesTheOtherSequencesUsable) {
  save_bases();
  {
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    storage::Catalog::Batch batch;
    batch.put("seq/" + hex(kBaseInt4) + "/segment", "not a manifest");
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  }
  const size_t files_before = std::distance(fs::directory_iterator(dir_), fs::directory_iterator());
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  // No segment file was taken for an orphan: the damaged manifest may name any.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()),
            static_cast<std::ptrdiff_t>(files_before));
  PQKV_EXPECT_OK((*store)->open_sequence(kBaseRerank));
  auto damaged = (*store)->open_sequence(kBaseInt4);
  EXPECT_EQ(damaged.status().code(), StatusCode::kCorruption) << damaged.status().to_string();
  const Status compact = (*store)->compact();
  EXPECT_EQ(compact.code(), StatusCode::kCorruption) << compact.to_string();
  EXPECT_NE(compact.message().find("drop its sequence"), std::string::npos) << compact.to_string();
  PQKV_EXPECT_OK((*store)->drop(kBaseInt4));
  PQKV_EXPECT_OK((*store)->compact());
  PQKV_EXPECT_OK((*store)->open_sequence(kBaseRaw));
}

// A sequence whose record was damaged was left out of the saved names (pqkv
// inspect said "no saved sequences" and exited 0); it is listed, and opening
// it names the damage.
TEST_F(ReopenDamageTest, ASequenceWithADamagedRecordIsListedAndNamedAsDamaged) {
  save_bases();
  {
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    storage::Catalog::Batch batch;
    batch.put("seq/" + hex(kBaseInt4) + "/record", "short");
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  }
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  const auto listed = (*store)->saved_sequence_names();
  ASSERT_TRUE(listed.ok()) << listed.status().to_string();
  const std::vector<std::string>& names = *listed;
  EXPECT_NE(std::find(names.begin(), names.end(), kBaseInt4), names.end());
  auto damaged = (*store)->open_sequence(kBaseInt4);
  EXPECT_EQ(damaged.status().code(), StatusCode::kCorruption) << damaged.status().to_string();
  EXPECT_NE(damaged.status().message().find("/record"), std::string::npos)
      << damaged.status().to_string();
}

// A PQ code byte past its 4-bit codebook indexed past the scoring table (a
// heap read out of bounds at the first attend after reopening).
TEST_F(ReopenDamageTest, APqCodePastItsCodebookIsCorruption) {
  save_bases();
  {
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    const std::string key = "seq/" + hex(kBaseRerank) + "/codes/000001/0/000001/0000000000";
    auto chunk = (*catalog)->get(key);
    PQKV_ASSERT_OK(chunk);
    std::string damaged = payload_of(*chunk);
    damaged[damaged.size() / 2] = static_cast<char>(0xf0);
    storage::Catalog::Batch batch;
    batch.put(key, storage::seal_value(key, damaged));  // past its CRC, as a matching sum would
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  }
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  auto seq = (*store)->open_sequence(kBaseRerank);
  EXPECT_EQ(seq.status().code(), StatusCode::kCorruption) << seq.status().to_string();
  EXPECT_NE(seq.status().message().find("not a centroid"), std::string::npos)
      << seq.status().to_string();
}

// The attend outputs of every layer of saved sequence `name` in `store`, for
// fixed queries (its lengths when it was saved before finish_prefill).
std::vector<float> answers(Store& store, const std::string& name) {
  const ModelSpec spec = ModelSpec::tiny();
  auto seq = store.open_sequence(name);
  EXPECT_TRUE(seq.ok()) << seq.status().to_string();
  std::vector<float> all;
  if (!seq.ok()) return all;
  for (int l = 0; l < spec.num_layers; ++l) {
    if (!(*seq)->prefilled()) {
      all.push_back(static_cast<float>((*seq)->length(l)));
      continue;
    }
    auto q = random_floats(static_cast<size_t>(spec.num_q_heads) * spec.head_dim, 50 + l);
    std::vector<float> out(q.size());
    PQKV_EXPECT_OK((*seq)->attend(l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
                                  host_view(out.data(), {spec.num_q_heads, spec.head_dim}),
                                  Stream::host()));
    all.insert(all.end(), out.begin(), out.end());
  }
  PQKV_EXPECT_OK(store.close_sequence(name));
  return all;
}

// Damage that every decoder takes (a changed code byte, centroid or length
// within range; a code chunk moved under another KV head's key) went unseen
// before values carried a CRC-32C: the sequence opened and answered wrongly.
// Each such change is now Corruption naming the entry and what to do, at
// open_sequence and at verify (pqkv inspect --verify).
TEST_F(ReopenDamageTest, DamageThatDecodesIsCaughtByItsChecksum) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  save_bases();
  std::vector<std::pair<std::string, std::string>> entries;  // every base's, pristine
  for (const std::string base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
    auto catalog = storage::Catalog::open_read_only(dir_.string());
    PQKV_ASSERT_OK(catalog);
    auto scanned = (*catalog)->scan("seq/" + hex(base) + "/");
    PQKV_ASSERT_OK(scanned);
    entries.insert(entries.end(), scanned->begin(), scanned->end());
  }
  ASSERT_GT(entries.size(), 20u);
  const auto put = [&](const std::vector<std::pair<std::string, std::string>>& kv) {
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    storage::Catalog::Batch batch;
    for (const auto& [k, v] : kv)
      batch.put(k, v);
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  };
  const auto name_of = [](const std::string& key) {
    for (const std::string base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
      if (key.rfind("seq/" + hex(base) + "/", 0) == 0) return base;
    }
    return std::string();
  };
  const auto expect_caught = [&](const std::string& name, const std::string& key,
                                 const std::string& trace) {
    {
      auto store = Store::open(options());
      PQKV_ASSERT_OK(store);
      auto seq = (*store)->open_sequence(name);
      ASSERT_EQ(seq.status().code(), StatusCode::kCorruption) << trace;
      const std::string m = seq.status().message();
      EXPECT_NE(m.find(key), std::string::npos) << trace << ": " << m;
      EXPECT_NE(m.find("CRC-32C"), std::string::npos) << trace << ": " << m;
      EXPECT_NE(m.find("drop '" + name + "'"), std::string::npos) << trace << ": " << m;
      EXPECT_NE(m.find("backup"), std::string::npos) << trace << ": " << m;
    }
    auto saved =
        engine::SavedSequences::open(dir_.string(), engine::SavedSequences::Access::kReadOnly);
    PQKV_ASSERT_OK(saved);
    const Status v = (*saved)->verify(name);
    EXPECT_EQ(v.code(), StatusCode::kCorruption) << trace << ": " << v.to_string();
    EXPECT_NE(v.message().find(key), std::string::npos) << trace << ": " << v.to_string();
  };
  for (const auto& [key, value] : entries) {
    // One bit of the payload, the CRC itself left as it was. Not in a
    // record's version number, whose flip to 1 or 2 (the formats before
    // sums) is refused as a record of the wrong length instead.
    const bool record = key.size() > 7 && key.compare(key.size() - 7, 7, "/record") == 0;
    const size_t lo = record ? 4 : 0;
    std::string d = value;
    const size_t at = lo + rng() % (value.size() - 4 - lo);
    d[at] = static_cast<char>(d[at] ^ (1 << (rng() % 8)));
    const std::string trace = key + " bit flipped at byte " + std::to_string(at);
    SCOPED_TRACE(trace);
    put({{key, d}});
    expect_caught(name_of(key), key, trace);
    put({{key, value}});
  }
  // The code chunks of KV heads 0 and 1 of one layer and stage swapped:
  // each is a valid chunk, of the right size, under the wrong key.
  const std::string head0 = "seq/" + hex(kBaseInt4) + "/codes/000001/0/000000/0000000000";
  const std::string head1 = "seq/" + hex(kBaseInt4) + "/codes/000001/0/000001/0000000000";
  std::map<std::string, std::string> pristine(entries.begin(), entries.end());
  ASSERT_EQ(pristine.count(head0), 1u);
  ASSERT_EQ(pristine.count(head1), 1u);
  ASSERT_EQ(pristine[head0].size(), pristine[head1].size());
  put({{head0, pristine[head1]}, {head1, pristine[head0]}});
  expect_caught(kBaseInt4, head0, "chunks of two KV heads swapped");
  put({{head0, pristine[head0]}, {head1, pristine[head1]}});
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw})
    PQKV_EXPECT_OK((*store)->open_sequence(base));
}

// A sequence saved before values carried a CRC-32C (record version 2, no
// sums) opens and answers as it did; it reports that it has none.
TEST_F(ReopenDamageTest, ASaveOfTheFormatBeforeChecksumsOpensWithoutThem) {
  save_bases();
  std::map<std::string, std::vector<float>> before;
  {
    auto store = Store::open(options());
    PQKV_ASSERT_OK(store);
    for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw})
      before[base] = answers(**store, base);
  }
  {
    // Written as the earlier format wrote it: the payloads, record version 2.
    auto catalog = storage::Catalog::open(dir_.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    auto entries = (*catalog)->scan("seq/");
    PQKV_ASSERT_OK(entries);
    storage::Catalog::Batch batch;
    for (const auto& [key, value] : *entries) {
      std::string old = payload_of(value);
      if (key.size() > 7 && key.compare(key.size() - 7, 7, "/record") == 0) {
        const uint32_t version = 2;
        std::memcpy(old.data(), &version, sizeof version);
      }
      batch.put(key, old);
    }
    PQKV_ASSERT_OK((*catalog)->commit(batch));
  }
  {
    auto saved =
        engine::SavedSequences::open(dir_.string(), engine::SavedSequences::Access::kReadOnly);
    PQKV_ASSERT_OK(saved);
    for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
      auto info = (*saved)->info(base);
      PQKV_ASSERT_OK(info);
      EXPECT_FALSE(info->checksummed) << base;
      PQKV_EXPECT_OK((*saved)->verify(base));
    }
  }
  const size_t files = std::distance(fs::directory_iterator(dir_), fs::directory_iterator());
  auto store = Store::open(options());
  PQKV_ASSERT_OK(store);
  // No segment file of the older saves was taken for an orphan.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()),
            static_cast<std::ptrdiff_t>(files));
  for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw})
    EXPECT_EQ(answers(**store, base), before[base]) << base;
  // Saved again, it has them.
  {
    auto seq = (*store)->open_sequence(kBaseInt4);
    PQKV_ASSERT_OK(seq);
    PQKV_ASSERT_OK((*store)->save(**seq));
    PQKV_ASSERT_OK((*store)->close_sequence(kBaseInt4));
  }
  store->reset();
  auto saved =
      engine::SavedSequences::open(dir_.string(), engine::SavedSequences::Access::kReadOnly);
  PQKV_ASSERT_OK(saved);
  auto info = (*saved)->info(kBaseInt4);
  PQKV_ASSERT_OK(info);
  EXPECT_TRUE(info->checksummed);
}

// Each file of the store directory (catalog files and segments) truncated,
// emptied, flipped or extended: the store opens or refuses, and what opens
// answers or names the damage.
TEST_F(ReopenDamageTest, EveryDamagedFileIsRefusedOrHarmless) {
  save_bases();
  const fs::path pristine = dir_.string() + "-pristine";
  fs::remove_all(pristine);
  fs::copy(dir_, pristine, fs::copy_options::recursive);
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(pristine)) {
    if (e.is_regular_file() && e.path().filename() != "LOCK")
      files.push_back(fs::relative(e.path(), pristine));
  }
  ASSERT_GT(files.size(), 3u);
  for (const fs::path& file : files) {
    const std::string bytes = read_file_bytes(pristine / file);
    std::vector<std::pair<std::string, std::string>> changes = {
        {"emptied", ""},
        {"truncated to half", bytes.substr(0, bytes.size() / 2)},
        {"one byte short", bytes.substr(0, bytes.empty() ? 0 : bytes.size() - 1)},
        {"extended", bytes + std::string(4096, '\x5a')}};
    for (size_t at : {size_t{0}, bytes.size() / 3, bytes.size() / 2, bytes.size() - 1}) {
      if (bytes.empty()) break;
      std::string d = bytes;
      d[at] = static_cast<char>(d[at] ^ 0x41);
      changes.push_back({"byte flipped at " + std::to_string(at), d});
    }
    for (const auto& [change, damaged] : changes) {
      const std::string trace = file.string() + " " + change;
      SCOPED_TRACE(trace);
      fs::remove_all(dir_);
      fs::copy(pristine, dir_, fs::copy_options::recursive);
      std::ofstream(dir_ / file, std::ios::binary | std::ios::trunc) << damaged;
      auto store = Store::open(options());
      // A catalog log cut short reads as a crash before its last commits:
      // their sequences are gone and, when the log kept older entries, their
      // segment files look like orphans. An emptied log keeps them.
      const bool log_cut = file.extension() == ".log" && damaged.size() < bytes.size();
      const bool log_emptied = log_cut && damaged.empty();
      // Otherwise no segment file is deleted as an orphan.
      for (const fs::path& f : files) {
        if (f.extension() == ".pqkv" && (!log_cut || log_emptied)) {
          EXPECT_TRUE(fs::exists(dir_ / f)) << f << " was deleted";
        }
      }
      if (!store.ok()) {
        EXPECT_TRUE(acceptable(store.status().code())) << store.status().to_string();
        continue;
      }
      // A store that opens has lost no sequence silently: each opens or
      // names its damage.
      for (const char* base : {kBaseRerank, kBaseInt4, kBaseRaw}) {
        auto seq = (*store)->open_sequence(base);
        EXPECT_TRUE(acceptable(seq.status().code())) << base << " -> " << seq.status().to_string();
        if (!log_cut) {
          EXPECT_NE(seq.status().code(), StatusCode::kNotFound) << base << " vanished";
        }
      }
    }
  }
  fs::remove_all(pristine);
}

}  // namespace
}  // namespace pqkv::testing
