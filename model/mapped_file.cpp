#include "model/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>

namespace pqkv::model {

Status check_model_file(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return Status::not_found("cannot read " + path.string() + ": no such file");
  if (fs::is_regular_file(st)) return ok_status();
  const char* what = fs::is_directory(st)                                 ? "a folder"
                     : fs::is_fifo(st)                                    ? "a pipe"
                     : fs::is_socket(st)                                  ? "a socket"
                     : fs::is_character_file(st) || fs::is_block_file(st) ? "a device"
                                                                          : "not a file";
  return Status::invalid_argument(path.string() + " is " + what +
                                  ", not a regular file: put the model's own file there");
}

Result<std::string> read_model_file(const std::filesystem::path& path) {
  PQKV_RETURN_IF_ERROR(check_model_file(path));
  std::ifstream in(path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in || in.bad()) return Status::io_error("cannot read " + path.string());
  return buf.str();
}

Result<MappedFile> MappedFile::open(const std::filesystem::path& path) {
  // Before open(2): opening a FIFO for reading waits for a writer.
  PQKV_RETURN_IF_ERROR(check_model_file(path));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string why = std::strerror(err);
    if (err == ENOENT) return Status::not_found("cannot open " + path.string() + ": " + why);
    return Status::io_error("cannot open " + path.string() + ": " + why);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    return Status::io_error("cannot stat " + path.string() + ": " + why);
  }

  MappedFile file;
  file.path_ = path;
  file.size_ = static_cast<size_t>(st.st_size);
  if (file.size_ > 0) {
    void* p = ::mmap(nullptr, file.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      return Status::io_error("cannot mmap " + path.string() + ": " + why);
    }
    file.data_ = static_cast<const uint8_t*>(p);
  }
  // The mapping keeps the file alive; the descriptor is no longer needed.
  ::close(fd);
  return file;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      path_(std::move(other.path_)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    path_ = std::move(other.path_);
  }
  return *this;
}

MappedFile::~MappedFile() {
  reset();
}

void MappedFile::reset() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace pqkv::model
