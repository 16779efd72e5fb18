// Little-endian binary encoding of the catalog's records (docs/formats.md):
// a writer that appends fixed-size values and length-prefixed blobs to a
// string, and a reader that takes them back and reports a short or malformed
// record instead of reading past its end.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace pqkv {

class ByteWriter {
 public:
  explicit ByteWriter(std::string* out) : out_(out) {}

  template <class T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_->append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  // A u64 length, then the bytes.
  void put_bytes(std::string_view bytes) {
    put<uint64_t>(bytes.size());
    out_->append(bytes);
  }
  template <class T>
  void put_vector(const std::vector<T>& v) {
    put_bytes({reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)});
  }

 private:
  std::string* out_;
};

// Every getter returns false (and leaves the reader failed) when the record
// ends too early.
class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}

  template <class T>
  bool get(T* v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (failed_ || in_.size() < sizeof(T)) return fail();
    std::memcpy(v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return true;
  }
  bool get_bytes(std::string* out) {
    uint64_t n = 0;
    if (!get(&n) || in_.size() < n) return fail();
    out->assign(in_.substr(0, n));
    in_.remove_prefix(n);
    return true;
  }
  template <class T>
  bool get_vector(std::vector<T>* out) {
    uint64_t n = 0;
    if (!get(&n) || in_.size() < n || n % sizeof(T) != 0) return fail();
    out->resize(n / sizeof(T));
    // An empty vector's data() may be null, which memcpy may not take.
    if (n > 0) std::memcpy(out->data(), in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool failed() const { return failed_; }
  // True when every byte was read and nothing failed.
  bool done() const { return !failed_ && in_.empty(); }

 private:
  bool fail() {
    failed_ = true;
    return false;
  }
  std::string_view in_;
  bool failed_ = false;
};

}  // namespace pqkv
