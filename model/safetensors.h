// Safetensors checkpoints, memory-mapped: one file, or the shards that a
// model.safetensors.index.json names. Tensors are read in place; nothing is
// copied on load.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model/mapped_file.h"
#include "pqkv/dtype.h"
#include "pqkv/status.h"

namespace pqkv::model {

// One tensor of a checkpoint: host memory inside a mapped file, or an aligned
// copy when the file places it at an address its dtype cannot be loaded from.
struct WeightTensor {
  std::string name;
  DType dtype = DType::kF32;  // meaningful only when `supported`
  std::vector<int64_t> shape;
  const void* data = nullptr;  // aligned to the dtype's size
  std::string file;            // the file it lives in, for messages
  // The dtype as the file names it ("BF16", "I64"). A tensor of a dtype pqkv
  // does not read (I64, F64, BOOL, ...) loads with supported = false and
  // fails only when the model asks for it (WeightFiles::get).
  std::string file_dtype;
  bool supported = true;

  int64_t numel() const;
  std::string shape_string() const;  // "[512, 64]"
  // Reads element i as float.
  float at(int64_t i) const { return load_as_float(data, dtype, i); }
};

// The tensors of one .safetensors file.
class SafetensorsFile {
 public:
  // Corruption for a malformed header or offsets past the end of the file;
  // tensors of dtypes pqkv does not read load as unsupported.
  static Result<SafetensorsFile> open(const std::filesystem::path& path);

  const std::map<std::string, WeightTensor>& tensors() const { return tensors_; }
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  std::map<std::string, WeightTensor> tensors_;
  // Aligned copies of the tensors the file stores at misaligned offsets.
  std::vector<std::unique_ptr<float[]>> aligned_copies_;
};

// All tensors of a checkpoint folder.
class WeightFiles {
 public:
  // Opens model.safetensors.index.json's shards when it exists, otherwise every
  // *.safetensors file in `dir`.
  static Result<WeightFiles> open_dir(const std::filesystem::path& dir);

  // Null when absent.
  const WeightTensor* find(std::string_view name) const;
  // The tensor, checked to have exactly `shape` and a dtype pqkv reads;
  // NotFound, InvalidArgument (shape) or Unimplemented (dtype) otherwise.
  Result<const WeightTensor*> get(std::string_view name,
                                  std::initializer_list<int64_t> shape) const;
  size_t size() const { return index_.size(); }

 private:
  // Files stay at fixed addresses (tensors point into their maps).
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const WeightTensor*, std::less<>> index_;
};

// One tensor to write: its name and shape.
struct SafetensorsEntry {
  std::string name;
  std::vector<int64_t> shape;
};

// Writes `entries` as one safetensors file with every tensor in `dtype`;
// values(i) returns tensor i's elements as fp32, asked for one tensor at a
// time so a large file needs one tensor's memory.
Status write_safetensors(const std::filesystem::path& path,
                         const std::vector<SafetensorsEntry>& entries, DType dtype,
                         const std::function<std::vector<float>(size_t)>& values);

}  // namespace pqkv::model
