// Checkpoint loading: config.json variants, safetensors dtypes and shards,
// and a clear Status for every kind of bad input.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <fstream>

#include "model/llama_config.h"
#include "model/llama_model.h"
#include "model/mapped_file.h"
#include "model/rope.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "model_test_util.h"

namespace pqkv::model {
namespace {

using testing::TempDir;
using testing::TinyShape;

std::string read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_all(const std::filesystem::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

TEST(LlamaConfigTest, ParsesLlama3RopeScalingAndEosList) {
  auto c = LlamaConfig::parse(R"({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 100, "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": [2, 3],
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})");
  PQKV_ASSERT_OK(c);
  EXPECT_EQ(c->head_dim, 8);  // hidden / heads
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_TRUE(c->is_eos(3));
  EXPECT_FALSE(c->tie_word_embeddings);
  const ModelSpec spec = c->kv_spec(DType::kBF16);
  EXPECT_EQ(spec.num_kv_heads, 2);
  EXPECT_EQ(spec.group_size(), 4);
}

TEST(LlamaConfigTest, Llama3ScalingKeepsHighAndSlowsLowFrequencies) {
  LlamaConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000.0;
  const auto plain = rope_inv_freq(c);
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  const auto scaled = rope_inv_freq(c);
  EXPECT_DOUBLE_EQ(scaled[0], plain[0]);          // wavelength 2*pi: kept
  EXPECT_DOUBLE_EQ(scaled[63], plain[63] / 8.0);  // longest wavelength: slowed
  bool blended = false;
  for (size_t i = 0; i < plain.size(); ++i) {
    blended |= scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0;
  }
  EXPECT_TRUE(blended);
}

TEST(LlamaConfigTest, QwenHasQkvBiasOnly) {
  auto c = LlamaConfig::parse(testing::tiny_config({.architecture = "Qwen2ForCausalLM"}).dump());
  PQKV_ASSERT_OK(c);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->o_proj_bias);
}

TEST(LlamaConfigTest, RefusesWhatItCannotRun) {
  auto j = testing::tiny_config({});
  j["architectures"] = {"GPT2LMHeadModel"};
  auto c = LlamaConfig::parse(j.dump());
  EXPECT_EQ(c.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(c.status().message().find("GPT2LMHeadModel"), std::string::npos);

  j = testing::tiny_config({});
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_EQ(LlamaConfig::parse(j.dump()).status().code(), StatusCode::kUnimplemented);

  j = testing::tiny_config({});
  j["num_key_value_heads"] = 3;
  EXPECT_EQ(LlamaConfig::parse(j.dump()).status().code(), StatusCode::kInvalidArgument);

  j = testing::tiny_config({});
  j.erase("hidden_size");
  c = LlamaConfig::parse(j.dump());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("hidden_size"), std::string::npos);

  j = testing::tiny_config({});
  j["hidden_size"] = "big";
  EXPECT_FALSE(LlamaConfig::parse(j.dump()).ok());
  EXPECT_FALSE(LlamaConfig::parse("{not json").ok());
}

// Values JSON holds but fp32 does not (1e300 is Inf there, 1e-300 zero) gave
// NaN activations and a run that printed <unk>; sizes name their key.
TEST(LlamaConfigTest, RealsOutsideFp32AndBadSizesNameTheirKey) {
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"rms_norm_eps", 1e300},        {"rms_norm_eps", 0.0}, {"rope_theta", 5e-324},
      {"rope_theta", 1e-300},         {"vocab_size", -1},    {"num_key_value_heads", 0},
      {"max_position_embeddings", -1}};
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key + " " + value.dump());
    auto j = testing::tiny_config({});
    j[key] = value;
    const auto c = LlamaConfig::parse(j.dump());
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find(key), std::string::npos) << c.status().to_string();
  }
  for (double factor : {1e-300, 1e300}) {
    auto j = testing::tiny_config({});
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", factor}};
    const auto c = LlamaConfig::parse(j.dump());
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << factor;
    EXPECT_NE(c.status().message().find("rope_scaling.factor"), std::string::npos)
        << c.status().to_string();
  }
  auto j = testing::tiny_config({});
  j["rms_norm_eps"] = 1e-30;  // tiny but a normal float: runs
  PQKV_EXPECT_OK(LlamaConfig::parse(j.dump()));
}

TEST(LlamaConfigTest, SlidingWindowIsReadWhereTheModelUsesIt) {
  auto j = testing::tiny_config({});
  j["sliding_window"] = 4;
  auto c = LlamaConfig::parse(j.dump());
  PQKV_ASSERT_OK(c);
  EXPECT_EQ(c->sliding_window, 0);  // Llama has none
  j["architectures"] = {"MistralForCausalLM"};
  c = LlamaConfig::parse(j.dump());
  PQKV_ASSERT_OK(c);
  EXPECT_EQ(c->sliding_window, 4);
  j["sliding_window"] = nullptr;  // Mistral v0.2 and later
  c = LlamaConfig::parse(j.dump());
  PQKV_ASSERT_OK(c);
  EXPECT_EQ(c->sliding_window, 0);
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["sliding_window"] = 4;
  j["use_sliding_window"] = false;
  c = LlamaConfig::parse(j.dump());
  PQKV_ASSERT_OK(c);
  EXPECT_EQ(c->sliding_window, 0);
}

TEST(LlamaConfigTest, SaysWhereTextStopsBeingJson) {
  // NaN is what Python's json.dump writes for float('nan'): not JSON.
  // 1e400 overflows double: the parser throws out_of_range, not parse_error.
  for (const char* text : {"{\"hidden_size\": NaN}", "", "{\"a\": 1", "{\"hidden_size\": 1e400}"}) {
    SCOPED_TRACE(text);
    const auto c = LlamaConfig::parse(text);
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find("not valid JSON"), std::string::npos)
        << c.status().to_string();
  }
  EXPECT_NE(LlamaConfig::parse("[1]").status().message().find("not a JSON object"),
            std::string::npos);
}

TEST(LlamaConfigTest, TokenIdsThatDoNotFitAreRefusedNotWrapped) {
  // 2^32 + 2 once wrapped to 2, a valid EOS; 2.5 was truncated.
  for (const nlohmann::json& eos :
       {nlohmann::json(int64_t{4294967298}), nlohmann::json::array({2, int64_t{1} << 40}),
        nlohmann::json::array({2.5})}) {
    SCOPED_TRACE(eos.dump());
    auto j = testing::tiny_config({});
    j["eos_token_id"] = eos;
    EXPECT_EQ(LlamaConfig::parse(j.dump()).status().code(), StatusCode::kInvalidArgument);
  }
  auto j = testing::tiny_config({});
  j["bos_token_id"] = 2.0;
  EXPECT_EQ(LlamaConfig::parse(j.dump()).status().code(), StatusCode::kInvalidArgument);
}

TEST(LlamaConfigTest, Llama3ScalingNeedsPositiveFactors) {
  for (const char* field : {"low_freq_factor", "original_max_position_embeddings"}) {
    SCOPED_TRACE(field);
    auto j = testing::tiny_config({});
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
    j["rope_scaling"][field] = 0;
    const auto c = LlamaConfig::parse(j.dump());
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status().to_string();
  }
}

TEST(LoaderTest, LoadsEveryDtypeAndShardedCheckpoints) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int shards : {1, 3}) {
      TempDir dir;
      testing::write_tiny_model(dir.path(), {.dtype = dt, .shards = shards});
      auto m = LlamaModel::load(dir.path());
      ASSERT_TRUE(m.ok()) << dtype_name(dt) << " " << shards << ": " << m.status().to_string();
      EXPECT_EQ((*m)->weights().layers.size(), 2u);
      EXPECT_EQ((*m)->weights().embed->dtype, dt);
      EXPECT_NE((*m)->weights().lm_head, (*m)->weights().embed);
      EXPECT_EQ((*m)->tokenizer(), nullptr);  // vocab 64, no tokenizer.bin: ids only
    }
  }
}

TEST(LoaderTest, MissingFolderConfigAndWeights) {
  TempDir dir;
  EXPECT_EQ(LlamaModel::load(dir.path() / "nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(LlamaModel::load(dir.path()).status().code(), StatusCode::kNotFound);  // no config
  std::ofstream(dir.path() / "config.json") << testing::tiny_config({}).dump();
  auto m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find(".safetensors"), std::string::npos);
}

// A model folder whose files are folders, devices or pipes: once a hang
// (config.json as a FIFO or a link to /dev/zero, a safetensors FIFO), an
// uncaught std::ios_base::failure (tokenizer.json as a folder) or misleading
// messages ("not valid JSON", "truncated at token 0").
TEST(LoaderTest, ModelFilesThatAreNotRegularFiles) {
  TempDir dir;
  const auto expect_refused = [](const Status& s, const char* what) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
    EXPECT_NE(s.message().find(std::string("is ") + what + ", not a regular file"),
              std::string::npos)
        << s.to_string();
  };
  const auto config = dir.path() / "config.json";
  std::filesystem::create_directory(config);
  expect_refused(LlamaConfig::load(dir.path()).status(), "a folder");
  std::filesystem::remove(config);
  std::filesystem::create_symlink("/dev/zero", config);
  expect_refused(LlamaConfig::load(dir.path()).status(), "a device");
  std::filesystem::remove(config);
  ASSERT_EQ(::mkfifo(config.c_str(), 0600), 0);
  expect_refused(LlamaConfig::load(dir.path()).status(), "a pipe");
  std::filesystem::remove(config);

  const auto weights = dir.path() / "model.safetensors";
  ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
  expect_refused(MappedFile::open(weights).status(), "a pipe");
  expect_refused(SafetensorsFile::open(weights).status(), "a pipe");

  LlamaConfig c;
  c.vocab_size = 300;
  for (const char* name : {"tokenizer.json", "tokenizer.bin"}) {
    SCOPED_TRACE(name);
    const auto tokenizer = dir.path() / name;
    std::filesystem::create_directory(tokenizer);
    expect_refused(load_tokenizer(dir.path(), c).status(), "a folder");
    std::filesystem::remove(tokenizer);
  }
  EXPECT_EQ(check_model_file(dir.path() / "none").code(), StatusCode::kNotFound);
}

TEST(LoaderTest, MissingTensorAndWrongShape) {
  TempDir dir;
  TinyShape s;
  std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
  auto tensors = testing::tiny_tensors(s);
  auto without = tensors;
  std::erase_if(without,
                [](const auto& t) { return t.name == "model.layers.1.mlp.up_proj.weight"; });
  testing::write_safetensors(dir.path() / "model.safetensors", without, DType::kF32);
  auto m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("model.layers.1.mlp.up_proj.weight"), std::string::npos);

  for (auto& t : tensors) {
    if (t.name == "model.layers.0.self_attn.k_proj.weight") {
      t.shape = {t.shape[0] * 2, t.shape[1]};
      t.values.resize(t.values.size() * 2);
    }
  }
  testing::write_safetensors(dir.path() / "model.safetensors", tensors, DType::kF32);
  m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("k_proj"), std::string::npos) << m.status().to_string();
}

// One NaN or Inf weight gave NaN keys that the store refused later, named
// as a bad append of the next layer.
TEST(LoaderTest, NonFiniteWeightsAreCorruptionNamingTheTensor) {
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (float bad : {std::nanf(""), -INFINITY}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + std::to_string(bad));
      TempDir dir;
      TinyShape s;
      std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
      auto tensors = testing::tiny_tensors(s);
      for (auto& t : tensors) {
        if (t.name == "model.layers.0.self_attn.q_proj.weight")
          t.values[5000 % t.values.size()] = bad;
      }
      testing::write_safetensors(dir.path() / "model.safetensors", tensors, dtype);
      const auto m = LlamaModel::load(dir.path());
      EXPECT_EQ(m.status().code(), StatusCode::kCorruption);
      EXPECT_NE(m.status().message().find("'model.layers.0.self_attn.q_proj.weight'"),
                std::string::npos)
          << m.status().to_string();
    }
  }
}

TEST(LoaderTest, UntiedModelWithoutLmHead) {
  TempDir dir;
  TinyShape s;
  std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
  auto tensors = testing::tiny_tensors(s);
  std::erase_if(tensors, [](const auto& t) { return t.name == "lm_head.weight"; });
  testing::write_safetensors(dir.path() / "model.safetensors", tensors, DType::kF32);
  auto m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("tie_word_embeddings"), std::string::npos);
}

TEST(SafetensorsTest, TruncatedAndMalformedFiles) {
  TempDir dir;
  const auto path = dir.path() / "model.safetensors";
  testing::write_safetensors(path, testing::tiny_tensors({}), DType::kF32);
  const std::string good = read_all(path);
  PQKV_ASSERT_OK(SafetensorsFile::open(path));

  write_all(path, good.substr(0, good.size() - 10));  // data cut short
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.status().code(), StatusCode::kCorruption);
  EXPECT_NE(f.status().message().find("truncated"), std::string::npos) << f.status().to_string();

  write_all(path, good.substr(0, 100));  // header cut short
  EXPECT_EQ(SafetensorsFile::open(path).status().code(), StatusCode::kCorruption);
  write_all(path, good.substr(0, 5));  // not even the length
  EXPECT_EQ(SafetensorsFile::open(path).status().code(), StatusCode::kCorruption);

  std::string bad_json = good;
  bad_json[8] = '[';
  write_all(path, bad_json);
  EXPECT_EQ(SafetensorsFile::open(path).status().code(), StatusCode::kCorruption);

  std::string i64(8, '\0');
  const std::string wrong_size = R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})";
  const uint64_t len2 = wrong_size.size();
  std::memcpy(i64.data(), &len2, 8);
  write_all(path, i64 + wrong_size + std::string(8, '\0'));
  EXPECT_EQ(SafetensorsFile::open(path).status().code(), StatusCode::kCorruption);
}

// Headers that parse but would load wrong weights: a name given twice (the
// last entry won) and tensors sharing bytes.
TEST(SafetensorsTest, RepeatedNamesAndOverlappingTensorsAreCorruption) {
  TempDir dir;
  const auto path = dir.path() / "model.safetensors";
  const auto write = [&](const std::string& header, size_t data_bytes) {
    std::string len(8, '\0');
    const uint64_t n = header.size();
    std::memcpy(len.data(), &n, 8);
    write_all(path, len + header + std::string(data_bytes, '\0'));
  };
  write(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
        16);
  PQKV_ASSERT_OK(SafetensorsFile::open(path));

  write(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
        R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
        16);
  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.status().code(), StatusCode::kCorruption);
  EXPECT_NE(f.status().message().find("names tensor 'a' twice"), std::string::npos)
      << f.status().to_string();

  write(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},)"
        R"("c":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})",
        20);
  f = SafetensorsFile::open(path);
  EXPECT_EQ(f.status().code(), StatusCode::kCorruption);
  EXPECT_NE(f.status().message().find("'a' (bytes 0..16) and 'b' (bytes 8..12"), std::string::npos)
      << f.status().to_string();

  // Empty tensors take no bytes, and nested keys may repeat across tensors.
  write(R"({"__metadata__":{"format":"pt"},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
        R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
        8);
  PQKV_ASSERT_OK(SafetensorsFile::open(path));
}

TEST(SafetensorsTest, ShardIndexNamingAMissingFile) {
  TempDir dir;
  testing::write_tiny_model(dir.path(), {.shards = 2});
  std::filesystem::remove(dir.path() / "model-00002-of-00002.safetensors");
  auto m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("model-00002-of-00002"), std::string::npos);
}

TEST(TokenizerTest, ByteLevelRoundTrip) {
  ByteTokenizer t;
  const std::string text = "Hello, \xc3\xa9!";
  const auto ids = t.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  std::string back;
  for (size_t i = 0; i < ids.size(); ++i)
    back += t.decode(ids[i], i ? ids[i - 1] : -1);
  EXPECT_EQ(back, text);
}

// A hand-made llama2.c vocabulary: merges happen best score first.
TEST(TokenizerTest, Llama2cMergesByScoreWithByteFallback) {
  TempDir dir;
  std::vector<std::pair<std::string, float>> vocab = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
    vocab.emplace_back(buf, 0.0f);
  }
  for (const char* p : {" ", "a", "b", "c"})
    vocab.emplace_back(p, -10.0f);
  vocab.emplace_back("ab", -1.0f);
  vocab.emplace_back("bc", -2.0f);
  vocab.emplace_back(" ab", -0.5f);
  const auto path = dir.path() / "tokenizer.bin";
  {
    std::ofstream out(path, std::ios::binary);
    const int32_t max_len = 8;
    out.write(reinterpret_cast<const char*>(&max_len), 4);
    for (const auto& [s, score] : vocab) {
      const int32_t len = static_cast<int32_t>(s.size());
      out.write(reinterpret_cast<const char*>(&score), 4);
      out.write(reinterpret_cast<const char*>(&len), 4);
      out.write(s.data(), len);
    }
  }
  const int n = static_cast<int>(vocab.size());
  auto tok = Llama2cTokenizer::load(path, n, 1);
  PQKV_ASSERT_OK(tok);
  const auto id = [&](const std::string& s) {
    for (int i = 0; i < n; ++i) {
      if (vocab[i].first == s) return i;
    }
    return -1;
  };
  // " abc": "ab" (-1) beats "bc" (-2), then " ab" (-0.5); "c" stays.
  EXPECT_EQ((*tok)->encode("abc"), (std::vector<int32_t>{id(" ab"), id("c")}));
  // '~' is not in the vocabulary: its byte piece.
  EXPECT_EQ((*tok)->encode("c~"), (std::vector<int32_t>{id(" "), id("c"), 3 + '~'}));
  EXPECT_EQ((*tok)->decode(id(" ab"), 1), "ab");  // leading space dropped after BOS
  EXPECT_EQ((*tok)->decode(id(" ab"), id("c")), " ab");
  EXPECT_EQ((*tok)->decode(3 + '~', id("c")), "~");

  auto truncated = Llama2cTokenizer::load(path, n + 5, 1);
  EXPECT_EQ(truncated.status().code(), StatusCode::kCorruption);
}

}  // namespace
}  // namespace pqkv::model
