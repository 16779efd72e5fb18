// The `pqkv` command as a user runs it: exit codes, what goes to stdout and
// stderr, and the checks made before any work starts. Each test runs the built
// binary on tiny inputs (a random checkpoint of a few KB, short prompts).
#include <gtest/gtest.h>
#include <pty.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>

#include "model/random_checkpoint.h"
#include "pqkv/device.h"
#include "pqkv/store.h"
#include "storage/catalog.h"
#include "test_util.h"
#include "tools/cli_run.h"

namespace pqkv::tools {
namespace {

namespace fs = std::filesystem;

// A random Llama checkpoint with a 256-byte vocabulary (so text prompts need
// no tokenizer file), written once for the suite.
const fs::path& tiny_model() {
  static TempDir dir;
  static const bool written = [] {
    model::RandomCheckpoint c;
    c.vocab = 256;
    c.hidden = 64;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.head_dim = 16;
    c.layers = 2;
    c.max_position_embeddings = 4096;
    const Status s = model::write_random_checkpoint(dir.path(), c);
    PQKV_EXPECT_OK(s);
    return s.ok();
  }();
  EXPECT_TRUE(written);
  return dir.path();
}

std::string model_flag() {
  return "--model '" + tiny_model().string() + "'";
}

fs::path haystack_file(const TempDir& dir) {
  const fs::path p = dir.path() / "haystack.txt";
  std::ofstream out(p);
  for (int i = 0; i < 200; ++i) {
    out << "Sentence number " << i << " of the haystack talks about nothing in particular. ";
  }
  return p;
}

TEST(CliTest, VersionAndHelp) {
  const CliRun v = pqkv("--version");
  EXPECT_EQ(v.code, 0) << describe(v);
  EXPECT_TRUE(std::regex_search(v.out, std::regex(R"(^pqkv \d+\.\d+\.\d+)"))) << describe(v);

  for (const char* command : {"generate", "needle", "bench"}) {
    SCOPED_TRACE(command);
    const CliRun h = pqkv(std::string(command) + " --help");
    EXPECT_EQ(h.code, 0) << describe(h);
    // The one budget grammar, written out in every command that reads one.
    EXPECT_NE(h.out.find("a percentage (10%) or a fraction below 1 (0.1)"), std::string::npos)
        << describe(h);
    EXPECT_NE(h.out.find("64+10%"), std::string::npos) << describe(h);
  }
  const CliRun g = pqkv("generate --help");
  EXPECT_NE(g.out.find("tokenizer"), std::string::npos) << describe(g);
}

TEST(CliTest, UsageErrorsExitWithTwo) {
  EXPECT_EQ(pqkv("").code, 2);
  EXPECT_EQ(pqkv("no-such-command").code, 2);
  EXPECT_EQ(pqkv("bench --no-such-flag").code, 2);
  // A geometry random-model cannot write is a usage error too, found before any file.
  TempDir dir;
  const CliRun geometry =
      pqkv("random-model --out '" + (dir.path() / "m").string() + "' --hidden 100 --heads 3");
  EXPECT_EQ(geometry.code, 2) << describe(geometry);
  EXPECT_FALSE(fs::exists(dir.path() / "m" / "config.json")) << describe(geometry);
}

TEST(CliTest, EveryCommandReadsABudgetTheSameWay) {
  // Ambiguous or non-finite budgets are refused before any work, in every command.
  for (const char* budget : {"1.0", "1.", "nan", "nan%", "inf", "-0.1", "2.5", "150%", "1e3"}) {
    SCOPED_TRACE(budget);
    // --flag=value, so that "-0.1" reaches the parser as a value.
    const CliRun b =
        pqkv(std::string("bench --model tiny --context 64 --steps 1 '--budget=") + budget + "'");
    EXPECT_EQ(b.code, 2) << describe(b);
    EXPECT_NE(b.err.find("64+5%"), std::string::npos) << describe(b);
    EXPECT_EQ(b.out, "") << describe(b);
    const CliRun g =
        pqkv("generate " + model_flag() + " --prompt-ids 1,2 '--budget=" + budget + "'");
    EXPECT_EQ(g.code, 2) << describe(g);
    EXPECT_NE(g.err.find("64+5%"), std::string::npos) << describe(g);
    const CliRun s = pqkv("generate " + model_flag() + " --prompt-ids 1,2 '--sink=" + budget + "'");
    EXPECT_EQ(s.code, 2) << describe(s);
  }
  // A count, a ratio and both are read alike by bench and generate.
  for (const char* budget : {"1", "16", "10%", "0.1", "8+10%"}) {
    SCOPED_TRACE(budget);
    const CliRun b =
        pqkv(std::string("bench --model tiny --layers 1 --context 96 --steps 1 --sink 4 "
                         "--budget ") +
             budget);
    EXPECT_EQ(b.code, 0) << describe(b);
    const CliRun g = pqkv("generate " + model_flag() + " --prompt-ids 1,2,3 --max-new 2 --sink 1 " +
                          "--budget '" + budget + "'");
    EXPECT_EQ(g.code, 0) << describe(g);
  }
}

TEST(CliTest, BenchOutputHasALegendAndDashesForWhatWasNotMeasured) {
  const CliRun b =
      pqkv("bench --model tiny --layers 1 --context 256 --steps 2 --selection pq --compare-faiss");
  ASSERT_EQ(b.code, 0) << describe(b);
  for (const char* column : {"B/tok", "build ms", "recall", "out err", "needles", "score us",
                             "topk us", "gather us", "attn us", "step us", "exact us"}) {
    // In the header and explained in the legend.
    const std::string name(column);
    const size_t header = b.out.find(name);
    ASSERT_NE(header, std::string::npos) << name << "\n" << describe(b);
    EXPECT_NE(b.out.find("  " + name + " ", b.out.find("columns:")), std::string::npos)
        << name << "\n"
        << describe(b);
  }
  EXPECT_NE(b.out.find("microseconds per (decode step, layer)"), std::string::npos);
  EXPECT_NE(b.out.find("in ms, all measured layers together"), std::string::npos);
  // The Faiss row: its search time and quality, '-' for the stages it does not have.
  std::istringstream lines(b.out);
  std::string line;
  bool saw_faiss = false;
  bool saw_pqkv = false;
  while (std::getline(lines, line)) {
    if (line.rfind("faiss IndexPQ", 0) == 0) {
      saw_faiss = true;
      EXPECT_EQ(line.find(" 0.0 "), std::string::npos) << line;
      EXPECT_NE(line.find(" - "), std::string::npos) << line;
    }
    if (line.rfind("pqkv m=", 0) == 0) {
      saw_pqkv = true;
      EXPECT_EQ(line.find(" - "), std::string::npos) << line;
    }
  }
  EXPECT_TRUE(saw_faiss) << describe(b);
  EXPECT_TRUE(saw_pqkv) << describe(b);
}

TEST(CliTest, BenchDriftComparesRefitsForEachCode) {
  const CliRun b = pqkv("bench --drift 64 --model tiny --layers 1 --context 256 --quiet --json -");
  ASSERT_EQ(b.code, 0) << describe(b);
  // int4, int8 and PQ by default, each without and with refits.
  size_t rows = 0;
  for (size_t at = b.out.find("\"refit\": "); at != std::string::npos;
       at = b.out.find("\"refit\": ", at + 1)) {
    ++rows;
  }
  EXPECT_EQ(rows, 6u) << describe(b);
  for (const char* key : {"\"recall_quarter\"", "\"refits\"", "\"refit_ms\"", "\"end_error_ratio\"",
                          "\"refit_threshold\""}) {
    EXPECT_NE(b.out.find(key), std::string::npos) << key << "\n" << describe(b);
  }
  const CliRun table = pqkv(
      "bench --drift 64 --model tiny --layers 1 --context 256 --quiet "
      "--selection int4");
  ASSERT_EQ(table.code, 0) << describe(table);
  EXPECT_NE(table.out.find("end ratio"), std::string::npos) << describe(table);
  EXPECT_NE(table.out.find("  q1..q4 "), std::string::npos) << describe(table);
  EXPECT_EQ(pqkv("bench --drift 64 --graph").code, 2);
  EXPECT_EQ(pqkv("bench --drift 64 --model tiny --drift-threshold 1").code, 2);
  EXPECT_NE(pqkv("bench --drift 64 --model tiny --backend cuda").code, 0);
  // A greatest-priority decode stream is a CUDA stream.
  EXPECT_EQ(pqkv("bench --drift 64 --model tiny --drift-stream high").code, 2);
  if (cuda_device_count() == 0) {
    // Without a GPU (or without CUDA in the build), the same message as every
    // cuda run, not a CUDA call's error.
    const CliRun high = pqkv("bench --drift 64 --model tiny --backend cuda --drift-stream high");
    EXPECT_EQ(high.code, 1) << describe(high);
    EXPECT_NE(high.err.find("or use cpu"), std::string::npos) << describe(high);
    EXPECT_EQ(high.err.find("cuda_"), std::string::npos) << describe(high);
  }
}

TEST(CliTest, BenchChecksTheJsonPathBeforeTheRun) {
  TempDir dir;
  const std::string missing = (dir.path() / "no_such_folder" / "out.json").string();
  const CliRun b =
      pqkv("bench --model tiny --layers 1 --context 128 --steps 1 --json '" + missing + "'");
  EXPECT_EQ(b.code, 2) << describe(b);
  EXPECT_NE(b.err.find("--json"), std::string::npos) << describe(b);
  EXPECT_EQ(b.err.find("decoding"), std::string::npos) << "the run started: " << describe(b);
  const CliRun folder = pqkv("bench --model tiny --json '" + dir.path().string() + "'");
  EXPECT_EQ(folder.code, 2) << describe(folder);

  const std::string good = (dir.path() / "out.json").string();
  const CliRun ok =
      pqkv("bench --model tiny --layers 1 --context 128 --steps 1 --json '" + good + "'");
  EXPECT_EQ(ok.code, 0) << describe(ok);
  const std::string json = read_file(good);
  EXPECT_NE(json.find("\"exact_us\""), std::string::npos) << json;
}

TEST(CliTest, BenchExplainsTheBlockCacheTier) {
  for (const char* flags :
       {"--block-cache 5% --block-tokens 16", "--block-cache 64K", "--cache-policy pqcache",
        "--block-cache 5% --block-tokens 1 --cache-admit 2"}) {
    SCOPED_TRACE(flags);
    const CliRun b = pqkv(std::string("bench --model tiny --layers 1 --context 2048 --steps 6 "
                                      "--no-quality --quiet --explain ") +
                          flags);
    ASSERT_EQ(b.code, 0) << describe(b);
    EXPECT_NE(b.out.find("  cache "), std::string::npos) << describe(b);
    EXPECT_NE(b.out.find("block cache: "), std::string::npos) << describe(b);
    const CliRun j = pqkv(std::string("bench --model tiny --layers 1 --context 2048 --steps 6 "
                                      "--no-quality --json - ") +
                          flags);
    ASSERT_EQ(j.code, 0) << describe(j);
    for (const char* key : {"\"cache_tier_hits\"", "\"cache_tier_bytes\"",
                            "\"cache_tier_hit_rate\"", "\"tier\": \"cache\""}) {
      EXPECT_NE(j.out.find(key), std::string::npos) << key << "\n" << describe(j);
    }
  }
  for (const char* bad : {"--block-cache 5x", "--block-cache 150%", "--block-cache ''",
                          "--block-tokens 48 --block-cache 1M", "--cache-policy lru"}) {
    SCOPED_TRACE(bad);
    const CliRun b =
        pqkv(std::string("bench --model tiny --layers 1 --context 256 --steps 1 ") + bad);
    EXPECT_NE(b.code, 0) << describe(b);
    EXPECT_EQ(b.out, "") << describe(b);
  }
  // A replayed graph never runs the host policy of blocks: the combination
  // is refused before any work, with or without a GPU (one-token blocks, whose
  // policy runs on the device, are not).
  for (const char* flags : {"--block-cache 5%", "--cache-policy pqcache"}) {
    SCOPED_TRACE(flags);
    const CliRun g =
        pqkv(std::string(
                 "bench --backend cuda --graph --model tiny --layers 1 --context 256 --steps 1 ") +
             flags);
    EXPECT_EQ(g.code, 2) << describe(g);
    EXPECT_NE(g.err.find("--graph combines with --block-cache only for --block-tokens 1"),
              std::string::npos)
        << describe(g);
  }
  const CliRun v = pqkv("bench --model tiny --layers 1 --context 256 --steps 1 --vary-queries");
  EXPECT_EQ(v.code, 2) << describe(v);
  EXPECT_NE(v.err.find("--vary-queries applies to --graph runs"), std::string::npos) << describe(v);
}

TEST(CliTest, BenchExplainsTheSsdTier) {
  TempDir dir;
  const std::string json = (dir.path() / "out.json").string();
  const std::string spill = (dir.path() / "store").string();
  const CliRun b = pqkv(
      "bench --model tiny --layers 1 --context 4096 --steps 2 --no-quality --quiet "
      "--ssd-fraction 0.8 --ssd-dir '" +
      spill + "' --explain --json '" + json + "'");
  ASSERT_EQ(b.code, 0) << describe(b);
  // The ssd tier's line: rows, bytes, hits, pages, predicted and measured time.
  const size_t line = b.out.find("\n  ssd ");
  ASSERT_NE(line, std::string::npos) << describe(b);
  EXPECT_NE(b.out.find("SSD at 0.20 GB/s"), std::string::npos) << describe(b);
  const std::string text = read_file(json);
  EXPECT_NE(text.find("\"tier\": \"ssd\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"pages\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"ssd_fraction\": 0.8"), std::string::npos) << text;

  const CliRun bad = pqkv("bench --model tiny --ssd-fraction 1");
  EXPECT_EQ(bad.code, 2) << describe(bad);
  EXPECT_NE(bad.err.find("--ssd-fraction"), std::string::npos) << describe(bad);
  // A step with rows on disk synchronises: it cannot be captured.
  const CliRun graph = pqkv("bench --model tiny --backend cuda --ssd-fraction 0.5 --graph");
  EXPECT_EQ(graph.code, 2) << describe(graph);
  EXPECT_NE(graph.err.find("--graph"), std::string::npos) << describe(graph);
}

TEST(CliTest, GenerateRefusesBadPromptsBeforeLoading) {
  TempDir dir;
  const fs::path empty = dir.path() / "empty.txt";
  std::ofstream(empty).close();
  for (const std::string& prompt :
       {std::string("--prompt-ids ''"), std::string("--prompt-ids '1,,2'"),
        std::string("--prompt-ids '1,2,'"), std::string("--prompt-ids 'x'"),
        std::string("'--prompt-ids=-1'"), std::string("--prompt-ids 256"),
        std::string("--prompt ''"), "--prompt-file '" + empty.string() + "'",
        "--prompt-file '" + (dir.path() / "missing.txt").string() + "'",
        "--prompt-file '" + dir.path().string() + "'"}) {
    SCOPED_TRACE(prompt);
    const CliRun g = pqkv("generate " + model_flag() + " " + prompt);
    EXPECT_EQ(g.code, 2) << describe(g);
    EXPECT_EQ(g.out, "") << describe(g);
    EXPECT_NE(g.err.find("pqkv generate: "), std::string::npos) << describe(g);
  }
}

TEST(CliTest, GenerateExitsWithOneWhenTheRunFails) {
  TempDir dir;  // a folder without config.json
  const CliRun g = pqkv("generate --model '" + dir.path().string() + "' --prompt-ids 1,2");
  EXPECT_EQ(g.code, 1) << describe(g);
  EXPECT_NE(g.err.find("config.json"), std::string::npos) << describe(g);
}

TEST(CliTest, GenerateWritesTextToStdoutAndStatisticsToStderr) {
  const CliRun g = pqkv("generate " + model_flag() + " --prompt 'Hello' --max-new 5 --ignore-eos");
  ASSERT_EQ(g.code, 0) << describe(g);
  EXPECT_EQ(g.out.rfind("Hello", 0), 0u) << describe(g);
  EXPECT_EQ(g.out.find("time to first token"), std::string::npos) << describe(g);
  EXPECT_NE(g.err.find("time to first token"), std::string::npos) << describe(g);
  // The default selection, int4 keys, named in the statistics.
  EXPECT_NE(g.err.find("int4"), std::string::npos) << describe(g);
  // With PQ: the m the run used (head_dim 16: m = 16 / 8 = 2), not a formula.
  const CliRun p = pqkv("generate " + model_flag() +
                        " --prompt 'Hello' --max-new 2 --ignore-eos --selection pq");
  ASSERT_EQ(p.code, 0) << describe(p);
  EXPECT_NE(p.err.find("m=2,b=8"), std::string::npos) << describe(p);
  EXPECT_EQ(p.err.find("m=d/8"), std::string::npos) << describe(p);
  // Piped, the text is passed through byte for byte: "Hello" and 5 bytes, then a newline.
  EXPECT_EQ(g.out.size(), 5u + 5u + 1u) << describe(g);

  // --json: the same figures in a file, the text still on stdout.
  TempDir dir;
  const fs::path json = dir.path() / "run.json";
  const CliRun js =
      pqkv("generate " + model_flag() + " --prompt 'Hello' --max-new 5 --ignore-eos --json '" +
           json.string() + "'");
  ASSERT_EQ(js.code, 0) << describe(js);
  EXPECT_EQ(js.out.rfind("Hello", 0), 0u) << describe(js);
  const nlohmann::json j = nlohmann::json::parse(read_file(json));
  EXPECT_EQ(j["prompt_tokens"], 6) << j.dump(2);  // BOS + 5 bytes
  EXPECT_EQ(j["generated_tokens"], 5) << j.dump(2);
  EXPECT_EQ(j["token_ids"].size(), 5u) << j.dump(2);
  EXPECT_GT(j["ttft_ms"].get<double>(), 0.0) << j.dump(2);
  EXPECT_TRUE(j["tpot_ms"].is_number()) << j.dump(2);
  EXPECT_NE(j["attention"].get<std::string>().find("int4"), std::string::npos) << j.dump(2);
  // Without a sequence, what only a store measures is null.
  const CliRun none =
      pqkv("generate " + model_flag() + " --prompt 'Hello' --max-new 1 --no-store --json '" +
           json.string() + "'");
  ASSERT_EQ(none.code, 0) << describe(none);
  const nlohmann::json n = nlohmann::json::parse(read_file(json));
  EXPECT_TRUE(n["tpot_ms"].is_null()) << n.dump(2);
  EXPECT_TRUE(n["finish_prefill_ms"].is_null()) << n.dump(2);
  // The path is checked before the model loads; stdout is the text's.
  EXPECT_EQ(pqkv("generate " + model_flag() + " --prompt 'Hello' --json -").code, 2);
  EXPECT_EQ(pqkv("generate " + model_flag() + " --prompt 'Hello' --json '" +
                 (dir.path() / "no" / "such.json").string() + "'")
                .code,
            2);
}

// --dram-prealloc: the rows are taken before the clock, reported apart, and
// the tokens are those of a run that takes them during the prefill; a bad
// value is a usage error before the model loads.
TEST(CliTest, GenerateDramPreallocationKeepsTheTokens) {
  const std::string run =
      "generate " + model_flag() + " --prompt 'Hello there' --max-new 6 --ignore-eos --show-ids";
  const CliRun none = pqkv(run + " --dram-prealloc 0");
  const CliRun autos = pqkv(run);
  const CliRun bytes = pqkv(run + " --dram-prealloc 1048576");
  for (const CliRun* r : {&none, &autos, &bytes}) {
    ASSERT_EQ(r->code, 0) << describe(*r);
    EXPECT_EQ(r->out, none.out) << describe(*r);
    EXPECT_NE(r->err.find("dram preallocation:"), std::string::npos) << describe(*r);
    EXPECT_NE(r->err.find("of which appends (host):"), std::string::npos) << describe(*r);
  }
  EXPECT_NE(none.err.find("(0 bytes)"), std::string::npos) << describe(none);
  EXPECT_EQ(autos.err.find("(0 bytes)"), std::string::npos) << describe(autos);
  EXPECT_NE(bytes.err.find("1.0 MiB (1048576 bytes)"), std::string::npos) << describe(bytes);
  for (const char* bad : {"x", "-1", "1.5", "12MB"}) {
    const CliRun g = pqkv(run + " '--dram-prealloc=" + bad + "'");
    EXPECT_EQ(g.code, 2) << describe(g);
    EXPECT_NE(g.err.find("--dram-prealloc"), std::string::npos) << describe(g);
  }
}

// Runs `pqkv ARGS` with stdout on a pseudo-terminal; returns what it printed.
std::string run_on_terminal(const std::vector<std::string>& args, int* code) {
  int master = -1;
  const pid_t pid = forkpty(&master, nullptr, nullptr, nullptr);
  if (pid == 0) {
    std::vector<char*> argv{const_cast<char*>(cli_path())};
    for (const auto& a : args)
      argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(cli_path(), argv.data());
    _exit(127);
  }
  std::string out;
  std::array<char, 4096> buf{};
  while (true) {
    const ssize_t n = read(master, buf.data(), buf.size());
    if (n <= 0) break;
    out.append(buf.data(), static_cast<size_t>(n));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  close(master);
  *code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return out;
}

TEST(CliTest, GenerateEscapesControlBytesOnATerminal) {
  // Prompt ids are bytes of the byte-level model: BEL, ESC, DEL, an invalid
  // UTF-8 byte, then "ok" and the two bytes of "é".
  const std::string ids = "7,27,91,50,74,127,255,111,107,195,169";
  int code = -1;
  const std::string tty = run_on_terminal(
      {"generate", "--model", tiny_model().string(), "--prompt-ids", ids, "--max-new", "1"}, &code);
  EXPECT_EQ(code, 0) << tty;
  EXPECT_NE(tty.find("\\x07\\x1b[2J\\x7f\\xffok\xc3\xa9"), std::string::npos) << tty;
  for (char c : tty) {
    const auto u = static_cast<unsigned char>(c);
    EXPECT_FALSE(u < 0x20 && c != '\n' && c != '\r' && c != '\t') << "raw control byte " << int(u);
  }
  // Piped, the same bytes pass unchanged.
  const CliRun piped = pqkv("generate " + model_flag() + " --prompt-ids " + ids + " --max-new 1");
  ASSERT_EQ(piped.code, 0) << describe(piped);
  EXPECT_EQ(piped.out.rfind("\x07\x1b[2J\x7f\xffok\xc3\xa9", 0), 0u);
}

TEST(CliTest, ProgressShowsOnATerminalUnlessQuiet) {
  const std::vector<std::string> bench = {"bench",     "--model", "tiny",    "--layers", "1",
                                          "--context", "128",     "--steps", "2"};
  int code = -1;
  const std::string shown = run_on_terminal(bench, &code);
  EXPECT_EQ(code, 0) << shown;
  EXPECT_NE(shown.find("decoding"), std::string::npos) << shown;
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{"--quiet"}, std::vector<std::string>{"--json", "-"}}) {
    std::vector<std::string> args = bench;
    args.insert(args.end(), extra.begin(), extra.end());
    SCOPED_TRACE(extra.front());
    const std::string quiet = run_on_terminal(args, &code);
    EXPECT_EQ(code, 0) << quiet;
    EXPECT_EQ(quiet.find("decoding"), std::string::npos) << quiet;
    EXPECT_EQ(quiet.find("building indexes"), std::string::npos) << quiet;
    EXPECT_EQ(quiet.find("generating workload"), std::string::npos) << quiet;
  }
  // generate and needle take --quiet too.
  const CliRun g =
      pqkv("generate " + model_flag() + " --prompt-ids 1,2,3 --max-new 2 --sink 1 --quiet");
  EXPECT_EQ(g.code, 0) << describe(g);
}

TEST(CliTest, NeedleRefusesBadDepthsAndPathsBeforeLoading) {
  TempDir dir;
  const fs::path hay = haystack_file(dir);
  const std::string base = "needle " + model_flag() + " --haystack '" + hay.string() + "' ";
  for (const char* depths : {"nan", "0.5,nan", "-0.1", "1.5", "inf"}) {
    SCOPED_TRACE(depths);
    const CliRun n = pqkv(base + "--lengths 200 '--depths=" + depths + "'");
    EXPECT_EQ(n.code, 2) << describe(n);
    EXPECT_NE(n.err.find("--depths"), std::string::npos) << describe(n);
    EXPECT_EQ(n.out, "") << describe(n);
  }
  const CliRun plot = pqkv(base + "--lengths 200 --depths 0.5 --plot '" +
                           (dir.path() / "missing" / "p.svg").string() + "'");
  EXPECT_EQ(plot.code, 2) << describe(plot);
  EXPECT_NE(plot.err.find("--plot"), std::string::npos) << describe(plot);
  EXPECT_EQ(plot.err.find("[1/1]"), std::string::npos) << "the run started: " << describe(plot);
  const fs::path empty = dir.path() / "empty.txt";
  std::ofstream(empty).close();
  const CliRun e = pqkv("needle " + model_flag() + " --haystack '" + empty.string() + "'");
  EXPECT_EQ(e.code, 2) << describe(e);
  const CliRun b = pqkv(base + "--lengths 200 --budget 1.0");
  EXPECT_EQ(b.code, 2) << describe(b);
}

TEST(CliTest, NeedlePromptsHaveTheRequestedLength) {
  TempDir dir;
  const fs::path hay = haystack_file(dir);
  const fs::path svg = dir.path() / "grid.svg";
  const fs::path json = dir.path() / "needle.json";
  const CliRun n = pqkv("needle " + model_flag() + " --haystack '" + hay.string() +
                        "' --lengths 300,1000 --depths 0,0.5,1 --max-new 2 --sink 4 --plot '" +
                        svg.string() + "' --json '" + json.string() + "'");
  ASSERT_EQ(n.code, 0) << describe(n);
  // --json: the grids [depth][length] and the recall [length][layer] as numbers.
  const nlohmann::json j = nlohmann::json::parse(read_file(json));
  EXPECT_EQ(j["cells"], 6) << j.dump(2);
  ASSERT_EQ(j["pqkv_accuracy"].size(), 3u) << j.dump(2);
  EXPECT_EQ(j["pqkv_accuracy"][0].size(), 2u) << j.dump(2);
  ASSERT_EQ(j["layer_recall"].size(), 2u) << j.dump(2);
  ASSERT_EQ(j["layer_recall"][1].size(), 2u) << j.dump(2);  // the tiny model's 2 layers
  for (const auto& per_length : j["layer_recall"]) {
    for (const auto& r : per_length) {
      EXPECT_GE(r.get<double>(), 0.0) << j.dump(2);
      EXPECT_LE(r.get<double>(), 1.0 + 1e-9) << j.dump(2);
    }
  }
  for (const char* length : {"300", "1000"}) {
    const std::regex cell(std::string("length ") + length + R"( \((\d+) tokens\))");
    int cells = 0;
    for (auto it = std::sregex_iterator(n.err.begin(), n.err.end(), cell);
         it != std::sregex_iterator(); ++it) {
      EXPECT_EQ((*it)[1].str(), length) << describe(n);
      ++cells;
    }
    EXPECT_EQ(cells, 3) << describe(n);
  }
  // The plot's title fits its width.
  const std::string doc = read_file(svg);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(doc, m, std::regex(R"svg(width="(\d+)")svg"))) << doc;
  const size_t title_at = doc.find("needle in a haystack: ");
  ASSERT_NE(title_at, std::string::npos) << doc;
  const size_t title_len = doc.find("</text>", title_at) - title_at;
  EXPECT_GE(std::stoi(m[1].str()), 70 + 8 * static_cast<int>(title_len)) << doc;
}

TEST(CliTest, MicroFailsWhenNothingWasMeasured) {
  const CliRun none = pqkv("micro --benchmark_filter=NoSuchBenchmarkAnywhere");
  EXPECT_EQ(none.code, 1) << describe(none);
  const CliRun list = pqkv("micro --benchmark_list_tests");
  EXPECT_EQ(list.code, 0) << describe(list);
  EXPECT_NE(list.out.find("BM_CpuIndexBuild"), std::string::npos) << describe(list);
  EXPECT_EQ(pqkv("micro --no-such-flag").code, 2);
#if PQKV_HAVE_CUDA
  // The GPU benchmarks are compiled in only with CUDA.
  EXPECT_NE(list.out.find("BM_GatherRows"), std::string::npos) << describe(list);
  if (cuda_device_count() == 0) {
    // Every GPU benchmark is skipped without a GPU: the run measured nothing.
    const CliRun gpu = pqkv("micro '--benchmark_filter=^BM_GatherRows/'");
    EXPECT_EQ(gpu.code, 1) << describe(gpu);
    EXPECT_NE(gpu.err.find("no benchmark was measured"), std::string::npos) << describe(gpu);
  }
#endif
}

}  // namespace
}  // namespace pqkv::tools

namespace pqkv::tools {
namespace {

TEST(CliTest, InspectListsSavedSequencesAndVerifiesThem) {
  TempDir dir;
  const fs::path store_dir = dir.path() / "store";
  {
    StoreOptions o;
    o.spec = ModelSpec::tiny();
    o.directory = store_dir.string();
    o.model_fingerprint = "tiny-1";
    auto store = Store::open(o);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    auto seq = (*store)->create_sequence("doc", SequenceOptions{});
    ASSERT_TRUE(seq.ok()) << seq.status().to_string();
    std::vector<float> k(77 * 2 * 32, 0.25f), v(k.size(), -0.5f);
    for (int i = 0; i < static_cast<int>(k.size()); ++i)
      k[i] = static_cast<float>((i * 37) % 101) / 50.0f - 1.0f;
    for (int l = 0; l < 2; ++l) {
      const Status s = (*seq)->append(l, host_view(k.data(), {77, 2, 32}),
                                      host_view(v.data(), {77, 2, 32}), Stream::host());
      ASSERT_TRUE(s.ok()) << s.to_string();
    }
    PQKV_ASSERT_OK((*seq)->finish_prefill());
    const Status saved = (*store)->save(**seq);
    ASSERT_TRUE(saved.ok()) << saved.to_string();
  }
  const CliRun h = pqkv("inspect --help");
  EXPECT_EQ(h.code, 0) << describe(h);
  EXPECT_NE(h.out.find("--verify"), std::string::npos) << describe(h);

  const CliRun j = pqkv("inspect '" + store_dir.string() + "' --json --verify");
  ASSERT_EQ(j.code, 0) << describe(j);
  EXPECT_TRUE(std::regex_search(j.out, std::regex(R"("name": "doc")"))) << describe(j);
  EXPECT_TRUE(std::regex_search(j.out, std::regex(R"("tokens": 77)"))) << describe(j);
  EXPECT_TRUE(std::regex_search(j.out, std::regex(R"("verified": true)"))) << describe(j);

  fs::path segment;
  for (const auto& e : fs::directory_iterator(store_dir))
    if (e.path().extension() == ".pqkv") segment = e.path();
  ASSERT_FALSE(segment.empty());
  {
    std::fstream io(segment, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(10);
    io.write("XYZ", 3);
  }
  const CliRun bad = pqkv("inspect '" + store_dir.string() + "' --verify");
  EXPECT_EQ(bad.code, 1) << describe(bad);
  EXPECT_NE(bad.out.find(segment.filename().string()), std::string::npos) << describe(bad);
  // The default int4 selection has no PQ shape to show.
  EXPECT_NE(bad.out.find("  selection int4, codes per layer: int4, int4"), std::string::npos)
      << describe(bad);

  // A directory without a store, and a path that is not there, each named as such
  // with where a store directory comes from.
  const CliRun empty = pqkv("inspect '" + dir.path().string() + "'");
  EXPECT_EQ(empty.code, 2) << describe(empty);
  EXPECT_NE(empty.err.find("is not a pqkv store directory"), std::string::npos) << describe(empty);
  const CliRun missing =
      pqkv("export-faiss '" + (dir.path() / "nowhere").string() +
           "' --sequence doc --layer 0 --head 0 --out '" + (dir.path() / "x.index").string() + "'");
  EXPECT_EQ(missing.code, 2) << describe(missing);
  EXPECT_NE(missing.err.find("nowhere does not exist"), std::string::npos) << describe(missing);
  EXPECT_NE(missing.err.find("pqkv bench --save DIR"), std::string::npos) << describe(missing);
  EXPECT_EQ(pqkv("inspect").code, 2);
}

// A code chunk changed in the catalog, every byte still a valid int4 code:
// before catalog values carried a CRC-32C, `inspect --verify` called it
// intact. It now names the entry, in text and JSON, with exit 1; the JSON
// says what each sequence is checked against and that the catalog's own
// files verify.
TEST(CliTest, InspectVerifyFindsACodeChunkThatStillDecodes) {
  TempDir dir;
  const fs::path store_dir = dir.path() / "store";
  {
    StoreOptions o;
    o.spec = ModelSpec::tiny();
    o.directory = store_dir.string();
    auto store = Store::open(o);
    PQKV_ASSERT_OK(store);
    auto seq = (*store)->create_sequence("doc", SequenceOptions{});
    PQKV_ASSERT_OK(seq);
    std::vector<float> k(77 * 2 * 32), v(k.size(), -0.5f);
    for (size_t i = 0; i < k.size(); ++i)
      k[i] = static_cast<float>((i * 37) % 101) / 50.0f - 1.0f;
    for (int l = 0; l < 2; ++l) {
      PQKV_ASSERT_OK((*seq)->append(l, host_view(k.data(), {77, 2, 32}),
                                    host_view(v.data(), {77, 2, 32}), Stream::host()));
    }
    PQKV_ASSERT_OK((*seq)->finish_prefill());
    PQKV_ASSERT_OK((*store)->save(**seq));
  }
  const CliRun good = pqkv("inspect '" + store_dir.string() + "' --json --verify");
  ASSERT_EQ(good.code, 0) << describe(good);
  const nlohmann::json g = nlohmann::json::parse(good.out);
  EXPECT_EQ(g["sequences"][0]["checksums"]["catalog"], "crc32c per value") << good.out;
  EXPECT_EQ(g["sequences"][0]["checksums"]["rows"], "xxh3-64 per 4 KiB page") << good.out;
  EXPECT_EQ(g["catalog"]["verified"], true) << good.out;

  const std::string key = "seq/646f63/codes/000001/0/000001/0000000000";  // "doc" in hex
  {
    auto catalog = storage::Catalog::open(store_dir.string(), /*create_if_missing=*/false);
    PQKV_ASSERT_OK(catalog);
    auto chunk = (*catalog)->get(key);
    PQKV_ASSERT_OK(chunk);
    std::string d = *chunk;
    d[3] = static_cast<char>(d[3] ^ 0x11);  // two int4 codes, each still in 0..15
    storage::Catalog::Batch b;
    b.put(key, d);
    PQKV_ASSERT_OK((*catalog)->commit(b));
  }
  const CliRun text = pqkv("inspect '" + store_dir.string() + "' --verify");
  EXPECT_EQ(text.code, 1) << describe(text);
  EXPECT_NE(text.out.find(key), std::string::npos) << describe(text);
  EXPECT_NE(text.out.find("CRC-32C"), std::string::npos) << describe(text);
  EXPECT_EQ(text.err.find('\n'), text.err.size() - 1) << describe(text);
  EXPECT_NE(text.err.find("restore it from a backup or drop it"), std::string::npos)
      << describe(text);
  const CliRun json = pqkv("inspect '" + store_dir.string() + "' --json --verify");
  EXPECT_EQ(json.code, 1) << describe(json);
  const nlohmann::json j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j["sequences"][0]["verified"], false) << json.out;
  EXPECT_NE(j["sequences"][0]["error"].get<std::string>().find(key), std::string::npos) << json.out;
  // The catalog's own files are intact: the change was a committed write.
  EXPECT_EQ(j["catalog"]["verified"], true) << json.out;
  // Without --verify the codes are not read: listed, exit 0.
  EXPECT_EQ(pqkv("inspect '" + store_dir.string() + "'").code, 0);
}

}  // namespace
}  // namespace pqkv::tools
