// The `pqkv` command on inputs a careless or hostile user gives it: sizes past
// memory, flags out of range, damaged model files, paths that are not UTF-8,
// failures under --json. Every run must end with its documented exit status
// and one line on stderr, never an abort, and --json output must parse.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "model/random_checkpoint.h"
#include "test_util.h"
#include "tools/cli_run.h"

namespace pqkv::tools {
namespace {

namespace fs = std::filesystem;

// `pqkv bench --save STORE` of the smallest run: one int4 sequence, "int4".
CliRun save_tiny_store(const fs::path& store) {
  return pqkv("bench --model tiny --layers 1 --context 64 --steps 1 --quiet --save '" +
              store.string() + "'");
}

// stdout parsed as JSON; a test failure (and null) when it is not JSON.
nlohmann::json parsed(const CliRun& r) {
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "stdout is not JSON: " << describe(r);
  return j.is_discarded() ? nlohmann::json() : j;
}

// A one-layer random model of 64 tokens' vocabulary.
model::RandomCheckpoint small_checkpoint() {
  model::RandomCheckpoint c;
  c.vocab = 64;
  c.hidden = 64;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.layers = 1;
  return c;
}

// One line on stderr that starts with the command's name: the error format.
void expect_one_line_error(const CliRun& r, const std::string& command) {
  EXPECT_EQ(r.err.rfind("pqkv " + command + ": ", 0), 0u) << describe(r);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << describe(r);
  EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << describe(r);
}

TEST(CliBadInputTest, BenchRefusesSizesPastMemoryAndBadStoreFlagsAsUsageErrors) {
  // Once a bad_alloc abort (exit 134) and exit 1 ("the run failed").
  for (const std::string flags :
       {"--context 99999999999999 --steps 1", "--context 64 --steps 2000000000",
        "--context 0 --steps 1", "--context 64 --steps 0", "--context 64 --steps 1 --threads -1",
        "--context 64 --steps 1 --block-tokens 17", "--context 64 --steps 1 --hbm-gbps inf"}) {
    SCOPED_TRACE(flags);
    const CliRun b = pqkv("bench --model tiny --layers 1 " + flags);
    EXPECT_EQ(b.code, 2) << describe(b);
    expect_one_line_error(b, "bench");
    EXPECT_EQ(b.out, "") << describe(b);
  }
  const CliRun huge = pqkv("bench --model tiny --layers 1 --steps 1 --context 99999999999999");
  EXPECT_NE(huge.err.find("lower --context"), std::string::npos) << describe(huge);
}

TEST(CliBadInputTest, NumericFlagsRefuseNanAndInfAndNameTheirBound) {
  // NaN passed CLI11's range checks (--temperature nan sampled garbage), and
  // their messages printed the bound as 1.797...e308 written out.
  TempDir dir;
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(hay) << "text";
  const std::string model = "--model '" + dir.path().string() + "' ";
  for (const std::string& args :
       {"generate " + model + "--prompt-ids 1 --temperature nan",
        "generate " + model + "--prompt-ids 1 --temperature inf",
        "generate " + model + "--prompt-ids 1 --temperature -1",
        "generate " + model + "--prompt-ids 1 --max-new 0",
        "generate " + model + "--prompt-ids 1 --threads -2",
        std::string("random-model --out x --hidden nan"), std::string("bench --batch -1"),
        "needle " + model + "--haystack '" + hay.string() + "' --depths ''"}) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    // "must be a finite number >= 1" for a value below the bound, "must be a
    // finite decimal number" for nan and inf, "must be a whole ..." for an
    // integer flag: each names the flag.
    EXPECT_NE(r.err.find(": must be a "), std::string::npos) << describe(r);
    EXPECT_EQ(r.err.find("17976931348623157"), std::string::npos) << describe(r);
  }
}

TEST(CliBadInputTest, UsageErrorsOfTheParserAreOneLineNamingTheCommand) {
  // CLI11's own format was two lines ("Run with --help for more information.").
  const std::pair<std::string, std::string> cases[] = {
      {"", "pqkv"},
      {"no-such-command", "pqkv"},
      {"bench --no-such-flag", "pqkv bench"},
      {"bench --layers x", "pqkv bench"},
      {"export-faiss DIR --layer 99999999999", "pqkv export-faiss"},
      {"generate --prompt-ids 1", "pqkv generate"}};  // --model missing
  for (const auto& [args, command] : cases) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    EXPECT_EQ(r.err.rfind(command + ": ", 0), 0u) << describe(r);
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << describe(r);
    EXPECT_NE(r.err.find("see `" + command + " --help`"), std::string::npos) << describe(r);
  }
  EXPECT_EQ(pqkv("bench --help").code, 0);
  EXPECT_EQ(pqkv("--version").code, 0);
}

TEST(CliBadInputTest, IntegerFlagsPastTheirTypeAreRefusedNotClamped) {
  // CLI11 kept what strtoll/strtoull gave: --drift-min-tokens
  // 99999999999999999999 ran as 2^63 - 1, --seed -1 as 2^64 - 1, --seed 2^64
  // as 2^64 - 1; each exited 0.
  TempDir dir;
  const std::string model = "--model '" + dir.path().string() + "' ";
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(hay) << "text";
  for (const std::string& args :
       {std::string("bench --model tiny --seed -1"),
        std::string("bench --model tiny --seed 18446744073709551616"),
        std::string("bench --model tiny --context 99999999999999999999"),
        std::string("bench --model tiny --drift 64 --drift-min-tokens 99999999999999999999"),
        std::string("bench --model tiny --drift 99999999999999999999"),
        std::string("bench --model tiny --block-tokens 0x40"),
        "generate " + model + "--prompt-ids 1 --seed -1",
        "generate " + model + "--prompt-ids 1 --prefill-chunk 99999999999999999999",
        "needle " + model + "--haystack '" + hay.string() + "' --seed -1",
        std::string("random-model --out x --seed -1")}) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    // 0x40 is refused as not decimal, the others as out of range.
    EXPECT_NE(r.err.find("must be a whole "), std::string::npos) << describe(r);
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << describe(r);
  }
}

TEST(CliBadInputTest, BenchDriftFlagsAreUsageErrorsWithJsonUnderJson) {
  // Under --json - these printed nothing on stdout; --drift 99999999999 ran
  // out of memory (exit 1); an infinite or huge drift was refused by the
  // append, naming a key and no flag.
  const std::pair<std::string, std::string> cases[] = {
      {"--drift 64 --drift-threshold nan", "--drift-threshold: must be a finite decimal number"},
      {"--drift 64 --drift-threshold inf", "--drift-threshold: must be a finite decimal number"},
      {"--drift 64 --drift-threshold 1", "--drift-threshold must be a finite error ratio"},
      {"--drift 64 --drift-min-tokens 0", "refit_min_tokens must be >= 1"},
      {"--drift 64 --drift-min-tokens -3", "refit_min_tokens must be >= 1"},
      {"--drift 99999999999", "lower --context, --drift or --layers"},
      {"--drift 64 --drift-scale 1e38", "drift_scale must be in 0..1000"},
      {"--drift 64 --drift-outliers 2000", "drift_outlier_growth must be in 0..1000"},
      {"--drift 64 --drift-offset inf", "--drift-offset: must be a finite decimal number"},
      {"--drift -1", "must be a finite number >= 0"},
      {"--drift 64 --layers x", "--layers"}};
  for (const auto& [flags, message] : cases) {
    SCOPED_TRACE(flags);
    const CliRun b = pqkv("bench --model tiny --layers 1 --context 128 --json - " + flags);
    EXPECT_EQ(b.code, 2) << describe(b);
    expect_one_line_error(b, "bench");
    EXPECT_NE(b.err.find(message), std::string::npos) << describe(b);
    EXPECT_EQ(parsed(b)["error"]["code"], "InvalidArgument") << describe(b);
    EXPECT_EQ(b.err.find("17976931348623157"), std::string::npos) << describe(b);
  }
}

TEST(CliBadInputTest, GenerateRefusesADramPreallocPastMemoryBeforeLoadingTheModel) {
  // 2^63 - 1 bytes was taken as asked: refused only after the model loaded
  // (exit 1), and a count under 2^63 but past memory took seconds of
  // allocating until the system refused.
  TempDir dir;  // no model in it: the flag is refused before the model is read
  const std::string model = "--model '" + dir.path().string() + "' --prompt-ids 1 ";
  const std::pair<std::string, std::string> cases[] = {
      {"--dram-prealloc 9223372036854775807", "lower --dram-prealloc"},
      {"--dram-prealloc 1125899906842624", "lower --dram-prealloc"},
      {"--dram-prealloc 9223372036854775808", "must be 'auto', 0 or a byte count"},
      {"--dram-prealloc -1", "must be 'auto', 0 or a byte count"},
      {"--dram-prealloc 1e9", "must be 'auto', 0 or a byte count"},
      {"--dram-prealloc ''", "must be 'auto', 0 or a byte count"}};
  for (const auto& [flags, message] : cases) {
    SCOPED_TRACE(flags);
    const CliRun g = pqkv("generate " + model + flags);
    EXPECT_EQ(g.code, 2) << describe(g);
    expect_one_line_error(g, "generate");
    EXPECT_NE(g.err.find(message), std::string::npos) << describe(g);
  }
}

TEST(CliBadInputTest, GenerateAutoPreallocOfAMaxNewPastMemoryRunsWithoutIt) {
  // --max-new 2000000000 under the default --dram-prealloc auto failed
  // (exit 1) asking for rows the generation, ending at EOS, never needed.
  TempDir dir;
  const model::RandomCheckpoint c = small_checkpoint();
  PQKV_ASSERT_OK(model::write_random_checkpoint(dir.path(), c));
  // Every token is an EOS: the generation stops after one.
  const fs::path config = dir.path() / "config.json";
  nlohmann::json j = nlohmann::json::parse(std::ifstream(config));
  j["eos_token_id"] = nlohmann::json::array();
  for (int id = 0; id < c.vocab; ++id)
    j["eos_token_id"].push_back(id);
  std::ofstream(config) << j.dump();
  const CliRun g = pqkv("generate --model '" + dir.path().string() +
                        "' --prompt-ids 1,2 --show-ids --max-new 2000000000");
  EXPECT_EQ(g.code, 0) << describe(g);
  EXPECT_NE(g.err.find("warning: --dram-prealloc auto took nothing"), std::string::npos)
      << describe(g);
  EXPECT_EQ(g.err.find("terminate called"), std::string::npos) << describe(g);
}

TEST(CliBadInputTest, ParserErrorsAreJsonUnderJson) {
  // The parser's own errors printed nothing on stdout under --json.
  TempDir dir;
  const fs::path store = dir.path() / "store";
  ASSERT_EQ(save_tiny_store(store).code, 0);
  for (const std::string& args :
       {"inspect --json '" + store.string() + "' --recall --queries 99999999999",
        "inspect '" + store.string() + "' --json --no-such-flag",
        std::string("bench --json - --layers x"), std::string("bench --json=- --steps 1.5")}) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    EXPECT_EQ(parsed(r)["error"]["code"], "InvalidArgument") << describe(r);
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << describe(r);
  }
  // --json to a file keeps stdout for the table: nothing there on an error.
  const CliRun f = pqkv("bench --json '" + (dir.path() / "out.json").string() + "' --layers x");
  EXPECT_EQ(f.code, 2) << describe(f);
  EXPECT_EQ(f.out, "") << describe(f);
}

TEST(CliBadInputTest, NeedleRefusesPromptsPastMemoryBeforeBuildingThem) {
  // Once a hang: the haystack tokenized and repeated to 2^31 tokens.
  TempDir dir;
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(hay) << "Some text to hide a needle in. ";
  model::RandomCheckpoint c;
  c.vocab = 256;
  c.hidden = 64;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.layers = 2;
  PQKV_ASSERT_OK(model::write_random_checkpoint(dir.path(), c));
  const CliRun n = pqkv("needle --model '" + dir.path().string() + "' --haystack '" + hay.string() +
                        "' --lengths 100,9000000000000 --depths 0.5");
  EXPECT_EQ(n.code, 2) << describe(n);
  EXPECT_NE(n.err.find("lower --lengths"), std::string::npos) << describe(n);
  EXPECT_EQ(n.out, "") << describe(n);
}

// A length too short for one cell's needle once failed after the cells
// before it had run, and the minimum it named changed with the seed.
TEST(CliBadInputTest, NeedleChecksEveryLengthBeforeTheFirstCell) {
  TempDir dir;
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(hay) << "Some text to hide a needle in. ";
  model::RandomCheckpoint c = small_checkpoint();
  c.vocab = 256;
  const fs::path m = dir.path() / "m";
  PQKV_ASSERT_OK(model::write_random_checkpoint(m, c));
  const fs::path json = dir.path() / "n.json";
  const CliRun n = pqkv("needle --model '" + m.string() + "' --haystack '" + hay.string() +
                        "' --lengths 400,10 --depths 0,1 --trials 2 --json '" + json.string() + "'");
  EXPECT_EQ(n.code, 2) << describe(n);
  EXPECT_NE(n.err.find("--lengths 10: this run's needle prompts"), std::string::npos)
      << describe(n);
  EXPECT_EQ(n.err.find("[1/"), std::string::npos) << describe(n);  // no cell ran
  EXPECT_FALSE(fs::exists(json));
}

TEST(CliBadInputTest, JsonOnStdoutStaysJsonWhenTheCommandFails) {
  TempDir dir;
  const CliRun b = pqkv("bench --model tiny --json - --context 0");
  EXPECT_EQ(b.code, 2) << describe(b);
  EXPECT_EQ(parsed(b)["error"]["code"], "InvalidArgument") << describe(b);
  expect_one_line_error(b, "bench");

  const CliRun i = pqkv("inspect --json '" + dir.path().string() + "'");
  EXPECT_EQ(i.code, 2) << describe(i);
  EXPECT_NE(parsed(i)["error"]["message"].get<std::string>().find("not a pqkv store"),
            std::string::npos)
      << describe(i);
  expect_one_line_error(i, "inspect");

  const CliRun e =
      pqkv("export-faiss --json '" + dir.path().string() +
           "' --sequence s --layer 0 --head 0 --out '" + (dir.path() / "out.index").string() + "'");
  EXPECT_EQ(e.code, 2) << describe(e);
  EXPECT_TRUE(parsed(e).contains("error")) << describe(e);
  expect_one_line_error(e, "export-faiss");
}

TEST(CliBadInputTest, ExportFaissChecksItsOutputBeforeReadingTheStore) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  const CliRun saved = save_tiny_store(store);
  ASSERT_EQ(saved.code, 0) << describe(saved);
  // A missing folder and a folder as the output: usage errors naming --out,
  // not Faiss's exception text after the read (exit 1).
  for (const fs::path& out : {dir.path() / "no" / "such" / "x.index", dir.path()}) {
    const CliRun e = pqkv("export-faiss '" + store.string() +
                          "' --sequence int4 --layer 0 --head 0 --out '" + out.string() + "'");
    EXPECT_EQ(e.code, 2) << describe(e);
    EXPECT_NE(e.err.find("--out"), std::string::npos) << describe(e);
    EXPECT_EQ(e.err.find("faiss::"), std::string::npos) << describe(e);
    expect_one_line_error(e, "export-faiss");
  }
}

TEST(CliBadInputTest, JsonOfPathsThatAreNotUtf8) {
  TempDir dir;
  // A directory name with a byte that is not UTF-8: once an uncaught
  // nlohmann type_error (an abort) in every --json listing.
  const fs::path store = dir.path() / "store\xff";
  const CliRun saved = save_tiny_store(store);
  ASSERT_EQ(saved.code, 0) << describe(saved);
  const CliRun i = pqkv("inspect --json --verify '" + store.string() + "'");
  EXPECT_EQ(i.code, 0) << describe(i);
  const nlohmann::json j = parsed(i);
  EXPECT_EQ(j["sequences"].size(), 1u) << describe(i);
  EXPECT_NE(j["directory"].get<std::string>().find("\xef\xbf\xbd"), std::string::npos)
      << describe(i);  // U+FFFD where the byte was

  const CliRun e = pqkv("export-faiss --json '" + store.string() +
                        "' --sequence int4 --layer 0 --head 0 --out '" +
                        (dir.path() / "x\xfe.index").string() + "'");
  EXPECT_EQ(e.code, 0) << describe(e);
  EXPECT_EQ(parsed(e)["vectors"], 65) << describe(e);
}

TEST(CliBadInputTest, InspectOfADamagedStoreSaysSoOnStderrUnderJsonToo) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  ASSERT_EQ(save_tiny_store(store).code, 0);
  for (const auto& e : fs::directory_iterator(store)) {
    if (e.path().extension() == ".pqkv") fs::resize_file(e.path(), 100);
  }
  const CliRun i = pqkv("inspect --json --verify '" + store.string() + "'");
  EXPECT_EQ(i.code, 1) << describe(i);
  EXPECT_TRUE(parsed(i)["sequences"][0].contains("error")) << describe(i);
  expect_one_line_error(i, "inspect");
  EXPECT_NE(i.err.find("int4"), std::string::npos) << describe(i);
}

// A tiny model folder with a byte-level BPE tokenizer.json whose ids are bad.
class BadTokenizerJsonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model::RandomCheckpoint c;
    c.vocab = 300;
    c.hidden = 32;
    c.q_heads = 2;
    c.kv_heads = 1;
    c.head_dim = 16;
    c.layers = 1;
    PQKV_ASSERT_OK(model::write_random_checkpoint(dir_.path(), c));
  }
  // Writes tokenizer.json with the vocabulary {"a": 0, "b": 1, "ab": `ab_id`}
  // and an added token of id `added_id`.
  void write_tokenizer(const nlohmann::json& ab_id, const nlohmann::json& added_id) {
    const nlohmann::json t = {
        {"model",
         {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", ab_id}}}, {"merges", {"a b"}}}},
        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
        {"added_tokens", {{{"id", added_id}, {"content", "<s>"}, {"special", true}}}}};
    std::ofstream(dir_.path() / "tokenizer.json") << t.dump();
  }
  CliRun tokenize() { return pqkv("tokenize --model '" + dir_.path().string() + "' --text abab"); }
  TempDir dir_;
};

TEST_F(BadTokenizerJsonTest, GoodIdsEncode) {
  write_tokenizer(2, 3);
  const CliRun t = tokenize();
  EXPECT_EQ(t.code, 0) << describe(t);
  EXPECT_EQ(t.out, "2,2\n") << describe(t);
}

TEST_F(BadTokenizerJsonTest, IdsOutsideTheVocabularyAreCorruptionNotACrash) {
  // Once a write before the piece table (a segfault or heap corruption), a
  // table of 2^31 pieces (std::length_error), or a silent wrap to id 0.
  const nlohmann::json bad[] = {-5, 2147483647, 300, 3.5, int64_t{1} << 40, "2"};
  for (const nlohmann::json& id : bad) {
    SCOPED_TRACE(id.dump());
    write_tokenizer(id, 3);
    CliRun t = tokenize();
    EXPECT_EQ(t.code, 1) << describe(t);
    expect_one_line_error(t, "tokenize");
    EXPECT_NE(t.err.find("vocabulary piece 'ab'"), std::string::npos) << describe(t);
    EXPECT_NE(t.err.find("0..299"), std::string::npos) << describe(t);  // config's vocab_size

    write_tokenizer(2, id);
    t = tokenize();
    EXPECT_EQ(t.code, 1) << describe(t);
    EXPECT_NE(t.err.find("added token '<s>'"), std::string::npos) << describe(t);
  }
}

TEST_F(BadTokenizerJsonTest, ATokenizerJsonPassedOverSaysWhy) {
  // Once only "has no tokenizer pqkv reads", hiding what was wrong with it.
  std::ofstream(dir_.path() / "tokenizer.json")
      << R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})";
  const CliRun t = tokenize();
  EXPECT_EQ(t.code, 2) << describe(t);
  expect_one_line_error(t, "tokenize");
  EXPECT_NE(t.err.find("passed over: "), std::string::npos) << describe(t);
  EXPECT_NE(t.err.find("'WordPiece' is not read"), std::string::npos) << describe(t);
  const CliRun g = pqkv("generate --model '" + dir_.path().string() + "' --prompt hi");
  EXPECT_EQ(g.code, 2) << describe(g);  // a text prompt for a model without a tokenizer
  EXPECT_NE(g.err.find("'WordPiece' is not read"), std::string::npos) << describe(g);
  EXPECT_NE(g.err.find("--prompt-ids"), std::string::npos) << describe(g);
}

// Folders a command writes into are checked before any work: random-model
// --out wrote "writing 1 layers to /dev/null ..." and then failed with exit
// 1; bench --ssd-dir set up the store before failing, and was ignored
// without --ssd-fraction.
TEST(CliOutputFolderTest, AFolderFlagThatIsAFileOrEmptyIsAUsageError) {
  TempDir dir;
  const std::string file = (dir.path() / "file").string();
  std::ofstream(file) << "x";
  const std::string small = " --layers 1 --hidden 64 --heads 2 --kv-heads 1 --intermediate 128";
  for (const std::string& out :
       {std::string("''"), "'" + file + "'", std::string("/dev/null"), "'" + file + "/sub'"}) {
    const CliRun r = pqkv("random-model --out " + out + small);
    EXPECT_EQ(r.code, 2) << describe(r);
    expect_one_line_error(r, "random-model");
    EXPECT_NE(r.err.find("--out"), std::string::npos) << describe(r);
  }
  const std::string bench = "bench --model tiny --layers 1 --context 2048 --steps 1 ";
  for (const std::string& flags :
       {"--ssd-fraction 0.5 --ssd-dir '" + file + "'", "--save '" + file + "'",
        "--ssd-dir '" + (dir.path() / "spill").string() + "'"}) {
    const CliRun r = pqkv(bench + flags);
    EXPECT_EQ(r.code, 2) << describe(r);
    expect_one_line_error(r, "bench");
  }
  const CliRun made =
      pqkv("random-model --out '" + (dir.path() / "a" / "b").string() + "'" + small);
  EXPECT_EQ(made.code, 0) << describe(made);
}

// export-faiss writes FILE.tmp and renames it over --out: given a device or
// a pipe it replaced it with a regular file (as root, `--out /dev/null` left
// /dev/null a plain file for every later process). Refused before any work,
// the pipe left as it was.
TEST(CliOutputFolderTest, AnOutputReplacedWholeIsNeverADeviceOrAPipe) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  ASSERT_EQ(save_tiny_store(store).code, 0);
  const fs::path fifo = dir.path() / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const CliRun names = pqkv("inspect '" + store.string() + "' --json");
  const std::string name = nlohmann::json::parse(names.out)["sequences"][0]["name"];
  const CliRun r = pqkv("export-faiss '" + store.string() + "' --sequence '" + name +
                        "' --layer 0 --head 0 --out '" + fifo.string() + "'");
  EXPECT_EQ(r.code, 2) << describe(r);
  expect_one_line_error(r, "export-faiss");
  EXPECT_NE(r.err.find("not a regular file"), std::string::npos) << describe(r);
  EXPECT_TRUE(fs::is_fifo(fifo));
  const CliRun ok = pqkv("export-faiss '" + store.string() + "' --sequence '" + name +
                         "' --layer 0 --head 0 --out '" + (dir.path() / "x.index").string() + "'");
  EXPECT_EQ(ok.code, 0) << describe(ok);
}

// Outputs never overwrite what a command reads nor each other, and a failed
// write leaves what was there: a --json or --plot on the prompt, the
// haystack or a model file, an export into the store it reads, a second
// save of one name, and a random model that does not fit. Each was written
// over with exit 0 (or a broken half-written model) before.
TEST(CliBadInputTest, OutputsNeverOverwriteInputsOrEarlierResults) {
  TempDir dir;
  const fs::path m = dir.path() / "m";
  const std::string model = "--model '" + m.string() + "' ";
  const model::RandomCheckpoint c = small_checkpoint();
  PQKV_ASSERT_OK(model::write_random_checkpoint(m, c));
  const fs::path prompt = dir.path() / "prompt.txt";
  const fs::path hay = dir.path() / "hay.txt";
  std::ofstream(prompt) << "a prompt";
  std::ofstream(hay) << "a haystack of words. " << std::string(2000, 'x');
  const std::string before_config = read_file(m / "config.json");
  const std::string before_model = read_file(m / "model.safetensors");
  const auto q = [](const fs::path& p) { return std::string(1, '\'').append(p.string()) + "'"; };
  for (const std::string& args :
       {"generate " + model + "--prompt-file " + q(prompt) + " --json " + q(prompt),
        "generate " + model + "--prompt-file " + q(prompt) + " --json " + q(m / "config.json"),
        "needle " + model + "--haystack " + q(hay) + " --plot " + q(hay),
        "needle " + model + "--haystack " + q(hay) + " --json " + q(dir.path() / "o") + " --plot " +
            q(dir.path() / "o"),
        "bench --model tiny --layers 1 --json " + q(dir.path() / "s" / "x.json") + " --save " +
            q(dir.path() / "s")}) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    expect_one_line_error(r, args.substr(0, args.find(' ')));
  }
  EXPECT_EQ(read_file(prompt), "a prompt");
  EXPECT_EQ(read_file(m / "config.json"), before_config);

  const fs::path store = dir.path() / "store";
  ASSERT_EQ(save_tiny_store(store).code, 0);
  const std::string current = read_file(store / "catalog" / "CURRENT");
  const CliRun into =
      pqkv("export-faiss " + q(store) + " --sequence int4 --layer 0 --head 0 --out " +
           q(store / "catalog" / "CURRENT"));
  EXPECT_EQ(into.code, 2) << describe(into);
  EXPECT_EQ(read_file(store / "catalog" / "CURRENT"), current);
  const CliRun again = save_tiny_store(store);
  EXPECT_EQ(again.code, 1) << describe(again);
  EXPECT_NE(again.err.find("already holds a saved sequence 'int4'"), std::string::npos)
      << describe(again);

  // Weights past this machine's memory: refused before a file is touched.
  const CliRun big =
      pqkv("random-model --out " + q(m) +
           " --layers 1 --hidden 64 --heads 4 --kv-heads 2 --intermediate 2147483647");
  EXPECT_EQ(big.code, 1) << describe(big);
  EXPECT_NE(big.err.find("lower --hidden, --intermediate or --layers"), std::string::npos)
      << describe(big);
  EXPECT_EQ(read_file(m / "config.json"), before_config);
  EXPECT_EQ(read_file(m / "model.safetensors"), before_model);
}

// Sizes and names that ran into the machine's limits or meant something
// else: a thread count TBB could not make (a crash), a batch or trial count
// that ran for hours, an empty path taken as no flag, a PQ setting with m=0
// (silently the default) or a key given twice, a float flag past float's
// range (infinity), a selection given twice (two rows, one save), a context
// too short for the workload (exit 1 with internal names).
TEST(CliBadInputTest, RefusesSizesAndNamesThatMeanSomethingElse) {
  const std::string bench = "bench --model tiny --layers 1 --steps 1 ";
  for (const auto& [args, says] : std::vector<std::pair<std::string, std::string>>{
           {bench + "--threads 2147483647", "--threads: must be a whole number in 0..1024"},
           {bench + "--batch 100000", "--batch: must be a whole number in 0..1024"},
           {bench + "--json ''", "--json: is empty"},
           {bench + "--json /proc/pqkv.json", "--json /proc/pqkv.json: cannot be written"},
           {bench + "--save ''", "--save: is empty"},
           {bench + "--pq m=0,b=8 --selection pq", "m must be at least 1"},
           {bench + "--pq m=2,b=4,b=5 --selection pq", "gives b= twice"},
           {bench + "--drift 16 --drift-scale 1e300", "--drift-scale: must be at most"},
           {bench + "--selection int4 --selection int4", "--selection int4 is given twice"},
           {bench + "--context 5", "--context 5 is too short for the synthetic workload"},
           {bench + "--budget -1", "--budget: cannot read token count '-1'"},
           {bench + "--window x", "--window: cannot read token count 'x'"},
           {"needle --model . --haystack /proc/version --trials 1000000",
            "--trials: must be a whole number"},
           {"generate --model . --prompt-ids 1 --temperature 1e308", "must be at most"},
           {"inspect x --sequence ''", "--sequence: is empty"}}) {
    SCOPED_TRACE(args);
    const CliRun r = pqkv(args);
    EXPECT_EQ(r.code, 2) << describe(r);
    EXPECT_NE(r.err.find(says), std::string::npos) << describe(r);
  }
}

// A budget the bench sets from a flag is named by that flag, not by the
// StoreOptions field a command-line user cannot set.
TEST(CliBadInputTest, BudgetErrorsNameTheBenchFlagThatSetTheBudget) {
  const CliRun r =
      pqkv("bench --model tiny --layers 1 --steps 1 --context 4096 --ssd-fraction 0.99");
  EXPECT_EQ(r.code, 1) << describe(r);
  EXPECT_NE(r.err.find("lower --ssd-fraction"), std::string::npos) << describe(r);
  expect_one_line_error(r, "bench");
}

// A segment file replaced by a FIFO hung inspect (the open waited for a
// writer); a directory in its place was reported as truncated.
TEST(CliBadInputTest, InspectNamesASegmentThatIsNotAFile) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  ASSERT_EQ(save_tiny_store(store).code, 0);
  fs::path segment;
  for (const auto& e : fs::directory_iterator(store)) {
    if (e.path().extension() == ".pqkv") segment = e.path();
  }
  ASSERT_FALSE(segment.empty());
  for (const bool fifo : {true, false}) {
    fs::remove_all(segment);
    if (fifo) {
      ASSERT_EQ(::mkfifo(segment.c_str(), 0644), 0);
    } else {
      fs::create_directory(segment);
    }
    const CliRun r = pqkv("inspect '" + store.string() + "' --verify");
    EXPECT_EQ(r.code, 1) << describe(r);
    EXPECT_NE(r.err.find("is not a regular file"), std::string::npos) << describe(r);
  }
}

// Every option's --help label says what it takes. A whole-number check
// labelled itself "INT", shown as "INT:INT" (--cache-admit, --context) or
// "UINT:INT" (--seed); the int-overflow guard of flags whose range a later
// check names showed "in -2147483648..2147483647" (--layer, --queries).
TEST(CliHelpTest, EveryLabelSaysWhatTheOptionTakes) {
  for (const char* command :
       {"bench", "export-faiss", "generate", "inspect", "needle", "random-model", "tokenize"}) {
    const CliRun h = pqkv(std::string(command) + " --help");
    EXPECT_EQ(h.code, 0) << describe(h);
    std::istringstream lines(h.out);
    for (std::string line; std::getline(lines, line);) {
      EXPECT_EQ(line.find("INT:INT"), std::string::npos) << command << ": " << line;
      EXPECT_EQ(line.find("-2147483648"), std::string::npos) << command << ": " << line;
    }
  }
  const CliRun bench = pqkv("bench --help");
  const size_t at = bench.out.find("--cache-admit");
  ASSERT_NE(at, std::string::npos) << describe(bench);
  const std::string line = bench.out.substr(at, bench.out.find('\n', at) - at);
  EXPECT_NE(line.find("INT:in 1..2147483647"), std::string::npos) << line;
  const CliRun zero = pqkv("bench --model tiny --cache-admit 0");
  EXPECT_EQ(zero.code, 2) << describe(zero);
  EXPECT_NE(zero.err.find("--cache-admit: must be a whole number in 1..2147483647, got 0"),
            std::string::npos)
      << describe(zero);
}

}  // namespace
}  // namespace pqkv::tools
