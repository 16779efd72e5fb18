// Checkpoints as real files lay them out: tensors of dtypes the model never
// reads, and tensors at offsets that are not aligned to their element size.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <limits>

#include "model/llama_model.h"
#include "model/needle.h"
#include "model/safetensors.h"
#include "model_test_util.h"
#include "test_util.h"

namespace pqkv::model {
namespace {

using testing::TempDir;
using testing::TinyShape;

struct RawTensor {
  std::string name;
  std::string dtype;  // safetensors name: "F32", "I64", ...
  std::vector<int64_t> shape;
  std::string bytes;
};

RawTensor f32_tensor(const testing::TensorData& t) {
  std::string bytes(t.values.size() * 4, '\0');
  std::memcpy(bytes.data(), t.values.data(), bytes.size());
  return {t.name, "F32", t.shape, bytes};
}

// Writes `tensors` in order, `gap` zero bytes before each one and the header
// padded so that the data section starts `data_shift` bytes past a multiple of 8.
void write_raw_safetensors(const std::filesystem::path& path, const std::vector<RawTensor>& tensors,
                           size_t gap, size_t data_shift) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& t : tensors) {
    data += std::string(gap, '\0');
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != data_shift % 8)
    text += ' ';
  const uint64_t len = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  std::ofstream(path, std::ios::binary) << out << text << data;
}

std::vector<RawTensor> tiny_model_tensors(const TinyShape& s) {
  std::vector<RawTensor> out;
  for (const auto& t : testing::tiny_tensors(s))
    out.push_back(f32_tensor(t));
  return out;
}

TEST(CheckpointDtypeTest, UnusedTensorsOfOtherDtypesLoad) {
  TempDir dir;
  TinyShape s;
  std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
  auto tensors = tiny_model_tensors(s);
  tensors.push_back({"extra.position_ids", "I64", {3}, std::string(24, '\1')});
  tensors.push_back({"extra.scale", "F64", {2}, std::string(16, '\0')});
  tensors.push_back({"extra.mask", "BOOL", {5}, std::string(5, '\1')});
  tensors.push_back({"extra.future", "F4_WHATEVER", {7}, std::string(3, '\0')});
  write_raw_safetensors(dir.path() / "model.safetensors", tensors, 0, 0);
  auto m = LlamaModel::load(dir.path());
  PQKV_ASSERT_OK(m);
  EXPECT_EQ((*m)->weights().layers.size(), static_cast<size_t>(s.layers));

  auto files = WeightFiles::open_dir(dir.path());
  PQKV_ASSERT_OK(files);
  const WeightTensor* mask = files->find("extra.mask");
  ASSERT_NE(mask, nullptr);
  EXPECT_FALSE(mask->supported);
  EXPECT_EQ(mask->file_dtype, "BOOL");
  const auto got = files->get("extra.position_ids", {3});
  EXPECT_EQ(got.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(got.status().message().find("I64"), std::string::npos) << got.status().to_string();
}

TEST(CheckpointDtypeTest, ATensorTheModelReadsMustHaveASupportedDtype) {
  TempDir dir;
  TinyShape s;
  std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
  auto tensors = tiny_model_tensors(s);
  for (auto& t : tensors) {
    if (t.name == "model.norm.weight") {
      t.dtype = "F64";
      t.bytes += t.bytes;
    }
  }
  write_raw_safetensors(dir.path() / "model.safetensors", tensors, 0, 0);
  auto m = LlamaModel::load(dir.path());
  EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(m.status().message().find("model.norm.weight"), std::string::npos)
      << m.status().to_string();
  EXPECT_NE(m.status().message().find("F64"), std::string::npos) << m.status().to_string();
}

TEST(CheckpointDtypeTest, KnownOtherDtypesStillHaveTheirSizesChecked) {
  TempDir dir;
  write_raw_safetensors(dir.path() / "model.safetensors",
                        {{"ids", "I64", {3}, std::string(20, '\0')}}, 0, 0);
  EXPECT_EQ(SafetensorsFile::open(dir.path() / "model.safetensors").status().code(),
            StatusCode::kCorruption);
}

TEST(CheckpointAlignmentTest, MisalignedTensorsAreReadAlignedWithTheirValues) {
  for (size_t shift : {1, 2, 3, 5}) {
    SCOPED_TRACE(::testing::Message() << "data section shifted by " << shift);
    TempDir dir;
    TinyShape s;
    std::ofstream(dir.path() / "config.json") << testing::tiny_config(s).dump();
    const auto expected = testing::tiny_tensors(s);
    std::vector<RawTensor> tensors;
    for (const auto& t : expected)
      tensors.push_back(f32_tensor(t));
    // A one-byte gap before every tensor: offsets at every residue mod 4.
    write_raw_safetensors(dir.path() / "model.safetensors", tensors, 1, shift);
    auto m = LlamaModel::load(dir.path());
    PQKV_ASSERT_OK(m);
    auto files = WeightFiles::open_dir(dir.path());
    PQKV_ASSERT_OK(files);
    for (const auto& t : expected) {
      const WeightTensor* w = files->find(t.name);
      ASSERT_NE(w, nullptr) << t.name;
      ASSERT_EQ(reinterpret_cast<uintptr_t>(w->data) % alignof(float), 0u) << t.name;
      for (size_t i = 0; i < t.values.size(); ++i)
        ASSERT_EQ(w->at(static_cast<int64_t>(i)), t.values[i]) << t.name << "[" << i << "]";
    }
  }
}

TEST(CheckpointIndexTest, ShardNamesOutsideTheFolderAreRefused) {
  for (const char* shard : {"../model.safetensors", "/etc/hostname", "sub/model.safetensors", ""}) {
    TempDir dir;
    nlohmann::json index = {{"weight_map", {{"w", shard}}}};
    std::ofstream(dir.path() / "model.safetensors.index.json") << index.dump();
    const auto files = WeightFiles::open_dir(dir.path());
    EXPECT_EQ(files.status().code(), StatusCode::kCorruption) << shard;
    EXPECT_NE(files.status().message().find("not a file of the model folder"), std::string::npos)
        << files.status().to_string();
  }
}

TEST(ConfigIntegerTest, FloatsAndOutOfRangeNumbersInIntegerFieldsAreRefused) {
  for (const nlohmann::json& bad :
       {nlohmann::json(1.1e31), nlohmann::json(64.5), nlohmann::json(uint64_t{1} << 40),
        nlohmann::json(-(int64_t{1} << 40))}) {
    nlohmann::json j = testing::tiny_config({});
    j["hidden_size"] = bad;
    const auto c = LlamaConfig::parse(j.dump());
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << bad.dump();
    EXPECT_NE(c.status().message().find("hidden_size"), std::string::npos)
        << c.status().to_string();
  }
  PQKV_EXPECT_OK(LlamaConfig::parse(testing::tiny_config({}).dump()));
}

TEST(NeedleDepthTest, NaNInfAndOutOfRangeDepthsAreRefused) {
  PQKV_EXPECT_OK(check_needle_depth(0.0));
  PQKV_EXPECT_OK(check_needle_depth(1.0));
  const double inf = std::numeric_limits<double>::infinity();
  for (double bad : {std::nan(""), inf, -inf, -0.1, 1.1}) {
    const Status s = check_needle_depth(bad);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace pqkv::model
