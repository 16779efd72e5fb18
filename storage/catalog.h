// The catalog: a store directory's metadata (sequences, codec state, codes,
// segment manifests) in RocksDB. Every change is one WriteBatch written with
// sync, so a crash leaves the catalog as it was before the change or after
// it, never between. Key layout and value encodings: docs/formats.md.
//
// Thread safety: all methods may be called from any thread (RocksDB's DB is
// thread-safe); a Batch is built by one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pqkv/status.h"

namespace pqkv::storage {

class Catalog {
 public:
  // The on-disk format this build reads and writes.
  static constexpr uint32_t kFormatVersion = 1;

  // Opens the catalog in `dir`/catalog, creating both when `create_if_missing`.
  // NotFound when there is none and it may not create one; FailedPrecondition
  // when the catalog has another format version or is open already (by
  // another Catalog of this process or another process); IoError or Corruption with
  // RocksDB's message otherwise.
  static Result<std::unique_ptr<Catalog>> open(const std::string& dir, bool create_if_missing);
  // Opens the catalog in `dir`/catalog for reading only: nothing in `dir` is
  // written (no RocksDB log, lock or manifest), and a catalog another
  // process has open can be read, as it was when this call opened it.
  // commit() and compact() then answer FailedPrecondition. NotFound when
  // there is no catalog, and the errors of open() otherwise.
  static Result<std::unique_ptr<Catalog>> open_read_only(const std::string& dir);
  ~Catalog();
  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;

  const std::string& dir() const { return dir_; }

  // A set of puts and deletes applied together by commit().
  class Batch {
   public:
    void put(std::string key, std::string value) {
      ops_.push_back({std::move(key), std::move(value), false});
    }
    void remove(std::string key) { ops_.push_back({std::move(key), {}, true}); }
    bool empty() const { return ops_.empty(); }

   private:
    friend class Catalog;
    struct Op {
      std::string key;
      std::string value;
      bool remove = false;
    };
    std::vector<Op> ops_;
  };

  // Applies `batch` atomically and durably (synced to disk before it returns).
  Status commit(const Batch& batch);
  // The value of `key`; NotFound when absent.
  Result<std::string> get(std::string_view key) const;
  // Every key under `prefix` with its value, in key order.
  Result<std::vector<std::pair<std::string, std::string>>> scan(std::string_view prefix) const;
  // Reads every table file of the catalog and checks the checksum of each
  // block and the CRC-32C of each whole file (recorded when it was written;
  // files of stores written before it have only their blocks' checksums):
  // Corruption naming the file when one fails. Works on a read-only catalog.
  Status verify() const;
  // Rewrites the catalog's files so deleted entries stop taking disk space.
  Status compact();
  // Whether open() found the catalog empty and wrote its format version: a
  // new store, or one whose catalog lost everything (an emptied log).
  bool formatted_now() const { return formatted_now_; }
  // FailedPrecondition naming `what` when the catalog was opened read-only
  // (open_read_only), so callers refuse a change before writing anything.
  Status check_writable(const std::string& what) const;

 private:
  struct Db;
  Catalog(std::string dir, std::unique_ptr<Db> db, bool read_only);
  // FailedPrecondition unless the catalog holds kFormatVersion; an empty
  // catalog opened for writing gets it.
  Status check_format();
  std::string dir_;
  std::unique_ptr<Db> db_;
  bool read_only_ = false;
  bool formatted_now_ = false;
};

}  // namespace pqkv::storage
