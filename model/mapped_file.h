// A read-only memory map of a whole file, unmapped when the object dies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "pqkv/status.h"

namespace pqkv::model {

// `path` (symlinks followed) is a regular file: NotFound when nothing is
// there, InvalidArgument naming what is there instead (a folder, a device, a
// pipe or a socket: reading /dev/zero or a FIFO never ends). Every file of a
// model folder is checked so before it is read or mapped.
Status check_model_file(const std::filesystem::path& path);

// The whole of the model file `path` (config.json, a tokenizer, a shard
// index): check_model_file's errors, IoError when it cannot be read.
Result<std::string> read_model_file(const std::filesystem::path& path);

class MappedFile {
 public:
  // Maps `path` read-only. An empty file maps to a zero-length view;
  // anything but a regular file is check_model_file's InvalidArgument.
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
