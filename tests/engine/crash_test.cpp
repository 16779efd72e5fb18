// A crash test with an expected-state oracle, as RocksDB's db_crashtest: a
// writer process appends to, saves and drops sequences of a store directory;
// the test SIGKILLs it at a random point of each round, reopens the store and
// checks every saved sequence against what the writer said it committed.
//
// The writer reports on a pipe, before each save or drop, its intent (the
// sequence's name, a version id, its lengths and the attend outputs of fixed
// queries) and, after the call returned OK, its commit. Each report is one
// write of at most PIPE_BUF bytes, so a kill never tears one. After a kill a
// name must hold its last committed version, or the version of a save (or the
// absence of a drop) that was in flight; anything else (a mix, a version never
// reported, a name never written, an orphan segment file) fails the test.
//
// The writer is this binary re-executed (CrashTest.DISABLED_Writer) so that
// it starts with no threads inherited through fork.
//
//   PQKV_CRASH_ROUNDS  rounds (default 12, a few seconds); the long run:
//                      PQKV_CRASH_ROUNDS=2000 build/tests/engine_test
//                      --gtest_filter=CrashTest.*
//   PQKV_CRASH_SEED    seed (default: from the clock, printed)
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "pqkv/store.h"
#include "test_util.h"

namespace pqkv::testing {
namespace {

namespace fs = std::filesystem;

constexpr int kNames = 3;
constexpr char kFingerprint[] = "crash-test-model";
constexpr uint32_t kMagic = 0x43525348;  // "CRSH"
constexpr int kReportFd = 100;           // the writer's end of the pipe

enum class Kind : uint32_t {
  kReady = 0,
  kSaveIntent = 1,
  kSaveCommit = 2,
  kDropIntent = 3,
  kDropCommit = 4
};

ModelSpec crash_spec() {
  ModelSpec spec = ModelSpec::tiny();  // 2 layers, 4 q heads, 2 KV heads, head_dim 32
  return spec;
}
constexpr int kOutFloats = 2 * 4 * 32;  // layers x q heads x head_dim

std::string name_of(int i) {
  return "seq-" + std::to_string(i);
}

// Each name scores with its own code, so every codec's save is exercised.
SequenceOptions options_of(int i) {
  SequenceOptions o;
  if (i == 1) {
    o.selection = SelectionConfig::pq();
    o.pq.m = 4;
    o.pq.bits = 4;
  } else if (i == 2) {
    o.selection = SelectionConfig::oracle();
  }
  return o;
}

struct Report {
  uint32_t magic = kMagic;
  Kind kind = Kind::kReady;
  int32_t name = 0;
  uint64_t version = 0;
  int64_t length = 0;
  std::array<float, kOutFloats> out{};
};
static_assert(sizeof(Report) <= PIPE_BUF, "a report must be one atomic pipe write");

// The attend outputs of every layer for queries fixed by the name.
Result<std::array<float, kOutFloats>> outputs_of(Sequence& seq, int name) {
  const ModelSpec& spec = seq.spec();
  std::array<float, kOutFloats> all{};
  const int per_layer = spec.num_q_heads * spec.head_dim;
  for (int l = 0; l < spec.num_layers; ++l) {
    auto q = random_floats(static_cast<size_t>(per_layer), 7000 + 10 * name + l);
    PQKV_RETURN_IF_ERROR(seq.attend(
        l, host_view(q.data(), {spec.num_q_heads, spec.head_dim}),
        host_view(all.data() + l * per_layer, {spec.num_q_heads, spec.head_dim}), Stream::host()));
  }
  return all;
}

// --- the writer -------------------------------------------------------------

void report(const Report& r) {
  const ssize_t n = ::write(kReportFd, &r, sizeof(r));
  if (n != static_cast<ssize_t>(sizeof(r))) std::_Exit(3);
}

Status append_tokens(Sequence& seq, int64_t n, uint64_t seed) {
  const ModelSpec& spec = seq.spec();
  for (int l = 0; l < spec.num_layers; ++l) {
    auto k =
        random_floats(static_cast<size_t>(n * spec.num_kv_heads * spec.head_dim), seed + 2 * l);
    auto v = random_floats(k.size(), seed + 2 * l + 1);
    PQKV_RETURN_IF_ERROR(seq.append(l, host_view(k.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                    host_view(v.data(), {n, spec.num_kv_heads, spec.head_dim}),
                                    Stream::host()));
  }
  return ok_status();
}

// Runs until killed: random saves (of a fresh prompt or of decode tokens
// appended to the saved sequence) and drops, each reported before and after.
Status run_writer(const std::string& dir, uint64_t seed, uint64_t round) {
  StoreOptions so;
  so.spec = crash_spec();
  so.directory = dir;
  so.model_fingerprint = kFingerprint;
  so.num_threads = 1;
  // Odd rounds write into rows preallocated at open and before each prompt.
  const bool prealloc = round % 2 == 1;
  if (prealloc) so.dram_prealloc_bytes = int64_t{4} << 20;
  PQKV_ASSIGN_OR_RETURN(auto store, Store::open(so));
  report({});
  std::mt19937_64 rng(seed * 1000003 + round);
  for (uint64_t op = 0;; ++op) {
    const uint64_t version = round * 100000 + op + 1;
    const int i = static_cast<int>(rng() % kNames);
    const std::string name = name_of(i);
    const int action = static_cast<int>(rng() % 10);
    if (action == 0) {
      report({kMagic, Kind::kDropIntent, i, version, 0, {}});
      Status s = store->drop(name);
      if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
      report({kMagic, Kind::kDropCommit, i, version, 0, {}});
      continue;
    }
    std::shared_ptr<Sequence> seq;
    auto open = store->get_sequence(name);
    if (open.ok() && action >= 3) {
      seq = *open;
    } else {
      if (open.ok()) PQKV_RETURN_IF_ERROR(store->close_sequence(name));
      PQKV_ASSIGN_OR_RETURN(const auto saved, store->saved_sequence_names());
      const bool is_saved = std::find(saved.begin(), saved.end(), name) != saved.end();
      if (is_saved && action >= 3) {
        PQKV_ASSIGN_OR_RETURN(seq, store->open_sequence(name));
      } else {
        // A fresh prompt replaces the save.
        if (prealloc)
          PQKV_RETURN_IF_ERROR(store->preallocate_dram(store->dram_bytes_for_tokens(240)));
        PQKV_ASSIGN_OR_RETURN(seq, store->create_sequence(name, options_of(i)));
        PQKV_RETURN_IF_ERROR(append_tokens(*seq, 40 + static_cast<int64_t>(rng() % 200), rng()));
        PQKV_RETURN_IF_ERROR(seq->finish_prefill());
      }
    }
    const int decode = static_cast<int>(rng() % 4);
    for (int t = 0; t < decode; ++t)
      PQKV_RETURN_IF_ERROR(append_tokens(*seq, 1, rng()));
    PQKV_ASSIGN_OR_RETURN(auto out, outputs_of(*seq, i));
    report({kMagic, Kind::kSaveIntent, i, version, seq->length(0), out});
    PQKV_RETURN_IF_ERROR(store->save(*seq));
    report({kMagic, Kind::kSaveCommit, i, version, seq->length(0), {}});
    // Sometimes forget it, so that the next save of the name reopens it.
    if (rng() % 4 == 0) {
      seq.reset();
      PQKV_RETURN_IF_ERROR(store->close_sequence(name));
    }
  }
}

TEST(CrashTest, DISABLED_Writer) {
  const char* dir = std::getenv("PQKV_CRASH_WRITER_DIR");
  if (dir == nullptr) GTEST_SKIP() << "runs only as CrashTest.KilledWriter's child";
  const Status s =
      run_writer(dir, std::strtoull(std::getenv("PQKV_CRASH_WRITER_SEED"), nullptr, 10),
                 std::strtoull(std::getenv("PQKV_CRASH_WRITER_ROUND"), nullptr, 10));
  FAIL() << s.to_string();
}

// --- the oracle ---------------------------------------------------------------

// What one version of a sequence answers.
struct Version {
  uint64_t id = 0;
  int64_t length = 0;
  std::array<float, kOutFloats> out{};
};

// Per name: the committed state (nullopt: absent) and the operation in flight
// when the writer died, if any (a save's version, or nullopt for a drop).
struct Expected {
  std::optional<Version> committed;
  bool in_flight = false;
  std::optional<Version> pending;
};

// A fresh folder under the system's temporary directory, removed with the object.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix)
      : path_(fs::temp_directory_path() / (prefix + "-" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 10) : fallback;
}

// Runs one writer round, killing it `kill_after_us` after it reports ready,
// and applies its reports to `expected`. Returns whether it got ready.
bool run_round(const std::string& dir, uint64_t seed, uint64_t round, int64_t kill_after_us,
               std::array<Expected, kNames>* expected, const fs::path& log) {
  int fds[2];
  if (::pipe(fds) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return false;
  }
  // Everything the child needs is made before fork: it only dups and execs.
  const std::string exe = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> env_strings = {"PQKV_CRASH_WRITER_DIR=" + dir,
                                          "PQKV_CRASH_WRITER_SEED=" + std::to_string(seed),
                                          "PQKV_CRASH_WRITER_ROUND=" + std::to_string(round)};
  for (char** e = environ; *e != nullptr; ++e)
    env_strings.emplace_back(*e);
  std::vector<char*> envp;
  envp.reserve(env_strings.size() + 1);
  for (auto& s : env_strings)
    envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string filter = "--gtest_filter=CrashTest.DISABLED_Writer";
  std::string also = "--gtest_also_run_disabled_tests";
  std::vector<char*> argv = {const_cast<char*>(exe.c_str()), filter.data(), also.data(), nullptr};
  const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], kReportFd);
    if (log_fd >= 0) {
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
    }
    ::execve(exe.c_str(), argv.data(), envp.data());
    std::_Exit(127);
  }
  ::close(fds[1]);
  if (log_fd >= 0) ::close(log_fd);
  if (pid < 0) {
    ::close(fds[0]);
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return false;
  }

  std::vector<char> bytes;
  bool ready = false;
  bool killed = false;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    if (!killed && now >= deadline) {
      ::kill(pid, SIGKILL);
      killed = true;
    }
    const int wait_ms =
        killed
            ? 1000
            : static_cast<int>(std::max<int64_t>(
                  0,
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count()));
    pollfd p{fds[0], POLLIN, 0};
    const int r = ::poll(&p, 1, wait_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    char buf[65536];
    const ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;  // EOF: the writer is gone
    bytes.insert(bytes.end(), buf, buf + n);
    if (!ready && bytes.size() >= sizeof(Report)) {
      ready = true;
      deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kill_after_us);
    }
  }
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the writer ended by itself (status " << status << "); its log: " << log;

  if (bytes.size() % sizeof(Report) != 0) {
    ADD_FAILURE() << "a torn report of " << bytes.size() % sizeof(Report) << " bytes";
    return ready;
  }
  for (size_t off = sizeof(Report); off < bytes.size(); off += sizeof(Report)) {
    Report r;
    std::memcpy(&r, bytes.data() + off, sizeof(r));
    EXPECT_EQ(r.magic, kMagic);
    Expected& e = (*expected)[static_cast<size_t>(r.name)];
    switch (r.kind) {
      case Kind::kSaveIntent:
        e.in_flight = true;
        e.pending = Version{r.version, r.length, r.out};
        break;
      case Kind::kDropIntent:
        e.in_flight = true;
        e.pending.reset();
        break;
      case Kind::kSaveCommit:
      case Kind::kDropCommit:
        EXPECT_TRUE(e.in_flight);
        e.committed = e.pending;
        e.in_flight = false;
        e.pending.reset();
        break;
      case Kind::kReady:
        break;
    }
  }
  return ready;
}

TEST(CrashTest, KilledWriterLeavesOnlyCommittedOrInFlightStates) {
  const uint64_t seed = env_or(
      "PQKV_CRASH_SEED",
      static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) % 1000000);
  const uint64_t rounds = env_or("PQKV_CRASH_ROUNDS", 12);
  std::printf("crash test: seed %llu, %llu rounds (PQKV_CRASH_SEED, PQKV_CRASH_ROUNDS)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(rounds));
  SCOPED_TRACE("PQKV_CRASH_SEED=" + std::to_string(seed));
  TempDir tmp("pqkv_crash");
  const std::string dir = (tmp.path() / "store").string();
  std::array<Expected, kNames> expected;
  std::mt19937_64 rng(seed);
  int64_t saves_seen = 0, in_flight_kills = 0;

  for (uint64_t round = 0; round < rounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // Mostly within the first saves; sometimes at once, sometimes later.
    const int64_t kill_after_us = rng() % 8 == 0 ? 0 : static_cast<int64_t>(rng() % 150000);
    const bool ready =
        run_round(dir, seed, round, kill_after_us, &expected, tmp.path() / "writer.log");
    if (!ready) continue;

    StoreOptions so;
    so.spec = crash_spec();
    so.directory = dir;
    so.model_fingerprint = kFingerprint;
    so.num_threads = 1;
    // Saved sequences reopen into preallocated rows in every other round.
    if (round % 2 == 0) so.dram_prealloc_bytes = int64_t{4} << 20;
    auto store = Store::open(so);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    const auto listed = (*store)->saved_sequence_names();
    ASSERT_TRUE(listed.ok()) << listed.status().to_string();
    const std::vector<std::string>& saved = *listed;
    for (const std::string& s : saved) {
      bool known = false;
      for (int i = 0; i < kNames; ++i)
        known = known || s == name_of(i);
      EXPECT_TRUE(known) << "a sequence never written is visible: " << s;
    }
    for (int i = 0; i < kNames; ++i) {
      Expected& e = expected[static_cast<size_t>(i)];
      const std::string name = name_of(i);
      const bool is_saved = std::find(saved.begin(), saved.end(), name) != saved.end();
      if (e.in_flight) ++in_flight_kills;
      if (!is_saved) {
        EXPECT_TRUE(!e.committed || (e.in_flight && !e.pending))
            << name << " is gone, but version " << e.committed->id << " was committed";
        e.committed.reset();
      } else {
        auto seq = (*store)->open_sequence(name);
        ASSERT_TRUE(seq.ok()) << name << ": " << seq.status().to_string();
        auto out = outputs_of(**seq, i);
        ASSERT_TRUE(out.ok()) << out.status().to_string();
        const auto matches = [&](const std::optional<Version>& v) {
          return v && v->length == (*seq)->length(0) && v->out == *out;
        };
        if (matches(e.committed)) {
          ++saves_seen;
        } else if (e.in_flight && matches(e.pending)) {
          e.committed = e.pending;  // the save in flight became durable
          ++saves_seen;
        } else {
          ADD_FAILURE() << name << " (" << (*seq)->length(0)
                        << " tokens) answers as neither its committed version ("
                        << (e.committed ? std::to_string(e.committed->id) : "absent")
                        << ") nor the one in flight ("
                        << (e.in_flight && e.pending ? std::to_string(e.pending->id) : "none")
                        << ")";
        }
      }
      e.in_flight = false;
      e.pending.reset();
    }
    // Opening removed the orphans of the kill: one segment file per saved sequence.
    int segments = 0;
    for (const auto& f : fs::directory_iterator(dir))
      segments += f.path().extension() == ".pqkv" ? 1 : 0;
    EXPECT_EQ(segments, static_cast<int>(saved.size()));
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("crash test: %lld saved versions checked, %lld kills with an operation in flight\n",
              static_cast<long long>(saves_seen), static_cast<long long>(in_flight_kills));
  EXPECT_GT(saves_seen, 0) << "no round got as far as a save: nothing was tested";
}

}  // namespace
}  // namespace pqkv::testing
