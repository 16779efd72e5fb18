// `pqkv bench --save DIR`: the benchmark's sequences land in a store
// directory that `pqkv inspect` and `pqkv export-faiss` read.
#include <faiss/Index.h>
#include <faiss/index_io.h>
#include <gtest/gtest.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "tools/cli_run.h"

namespace pqkv::tools {
namespace {

TEST(BenchSaveTest, InspectAndExportFaissReadWhatBenchSaved) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  const CliRun b = pqkv(
      "bench --model tiny --context 600 --steps 3 --selection int4 --selection pq --pq m=4,b=6 "
      "--selection int8 --save '" +
      store.string() + "' --json -");
  ASSERT_EQ(b.code, 0) << describe(b);
  const auto bench = nlohmann::json::parse(b.out);
  EXPECT_EQ(bench["save_dir"], store.string());
  std::set<std::string> saved;
  for (const auto& row : bench["rows"]) {
    ASSERT_TRUE(row.contains("saved_as")) << row.dump();
    EXPECT_GT(row["save_ms"].get<double>(), 0.0);
    EXPECT_GT(row["reopen_ms"].get<double>(), 0.0);
    saved.insert(row["saved_as"].get<std::string>());
  }
  EXPECT_EQ(saved, (std::set<std::string>{"int4", "pq_m=4,b=6", "int8"}));

  const CliRun i = pqkv("inspect '" + store.string() + "' --json --verify");
  ASSERT_EQ(i.code, 0) << describe(i);
  const auto inspected = nlohmann::json::parse(i.out);
  std::set<std::string> listed;
  for (const auto& s : inspected["sequences"]) {
    listed.insert(s["name"].get<std::string>());
    EXPECT_EQ(s["tokens"], 603) << s.dump();  // prompt + decode steps
    EXPECT_EQ(s["verified"], true) << s.dump();
    EXPECT_EQ(s["model_fingerprint"], bench["model_fingerprint"]) << s.dump();
  }
  EXPECT_EQ(listed, saved);

  for (const std::string& name : saved) {
    SCOPED_TRACE(name);
    const fs::path out = dir.path() / (name + ".faiss");
    const CliRun e = pqkv("export-faiss '" + store.string() + "' --sequence '" + name +
                          "' --layer 1 --head 1 --out '" + out.string() + "'");
    ASSERT_EQ(e.code, 0) << describe(e);
    std::unique_ptr<faiss::Index> index(faiss::read_index(out.string().c_str()));
    EXPECT_EQ(index->ntotal, 603);
  }
}

TEST(BenchSaveTest, BatchSavesEverySequenceAndGraphRefusesSave) {
  TempDir dir;
  const fs::path store = dir.path() / "store";
  const CliRun b =
      pqkv("bench --model tiny --context 400 --steps 2 --batch 2 --save '" + store.string() + "'");
  ASSERT_EQ(b.code, 0) << describe(b);
  EXPECT_NE(b.out.find("batch_s0"), std::string::npos) << describe(b);
  EXPECT_NE(b.out.find("batch_s1"), std::string::npos) << describe(b);
  const CliRun i = pqkv("inspect '" + store.string() + "' --json");
  ASSERT_EQ(i.code, 0) << describe(i);
  EXPECT_EQ(nlohmann::json::parse(i.out)["sequences"].size(), 2u) << describe(i);

  const CliRun g = pqkv("bench --model tiny --graph --save '" + store.string() + "'");
  EXPECT_EQ(g.code, 2) << describe(g);
  const fs::path file = dir.path() / "file";
  { std::ofstream(file) << "x"; }
  const CliRun f = pqkv("bench --model tiny --save '" + file.string() + "'");
  EXPECT_EQ(f.code, 2) << describe(f);
  EXPECT_NE(f.err.find("not a directory"), std::string::npos) << describe(f);
}

}  // namespace
}  // namespace pqkv::tools
