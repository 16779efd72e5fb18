// A read-only memory map of a whole file, unmapped when the object dies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

#include "pqkv/status.h"

namespace pqkv::model {

class MappedFile {
 public:
  // Maps `path` read-only. An empty file maps to a zero-length view.
  static Result<MappedFile> open(const std::filesystem::path& path);

  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void reset();

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::filesystem::path path_;
};

}  // namespace pqkv::model
