#include "storage/catalog.h"

#include <rocksdb/db.h>
#include <rocksdb/file_checksum.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <filesystem>

namespace pqkv::storage {
namespace {

constexpr char kFormatKey[] = "meta/format";
// Every commit is synced, so only the log's last record can be torn (a crash
// while writing it): that one is dropped. Damage anywhere else is Corruption.
// RocksDB's default, point-in-time recovery, stopped replaying at the first
// bad record and opened the catalog without the entries after it, silently:
// a flipped byte in the log made every sequence vanish, and the next open
// for writing took their segment files for orphans and deleted them.
constexpr rocksdb::WALRecoveryMode kWalRecovery =
    rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;

Status from_rocksdb(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return ok_status();
  const std::string m = what + ": " + s.ToString();
  if (s.IsNotFound()) return Status::not_found(m);
  if (s.IsCorruption()) return Status::corruption(m);
  if (s.IsInvalidArgument()) return Status::invalid_argument(m);
  return Status::io_error(m);
}

}  // namespace

struct Catalog::Db {
  std::unique_ptr<rocksdb::DB> db;
};

Catalog::Catalog(std::string dir, std::unique_ptr<Db> db, bool read_only)
    : dir_(std::move(dir)), db_(std::move(db)), read_only_(read_only) {}
Catalog::~Catalog() = default;

Result<std::unique_ptr<Catalog>> Catalog::open(const std::string& dir, bool create_if_missing) {
  namespace fs = std::filesystem;
  const std::string path = dir + "/catalog";
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    if (!create_if_missing) {
      return Status::not_found("no pqkv store in " + dir + " (no catalog); create one first");
    }
    fs::create_directories(dir, ec);
    if (ec) return Status::io_error("cannot create store directory " + dir + ": " + ec.message());
  }
  rocksdb::Options options;
  options.create_if_missing = create_if_missing;
  options.paranoid_checks = true;
  options.wal_recovery_mode = kWalRecovery;
  // A CRC-32C of each whole table file, kept in RocksDB's manifest and
  // checked by verify() (besides the checksum of every block RocksDB keeps).
  options.file_checksum_gen_factory = rocksdb::GetFileChecksumGenCrc32cFactory();
  rocksdb::DB* raw = nullptr;
  const rocksdb::Status opened = rocksdb::DB::Open(options, path, &raw);
  // RocksDB's own words ("lock hold by current process", "While lock file:
  // ... Resource temporarily unavailable") do not say what to do.
  if (opened.IsIOError() && opened.ToString().find("lock") != std::string::npos) {
    return Status::failed_precondition(
        "the store in " + dir +
        " is open already, in this process or another: close that Store first (read it "
        "meanwhile with `pqkv inspect`, which opens it read-only). RocksDB: " +
        opened.ToString());
  }
  PQKV_RETURN_IF_ERROR(from_rocksdb(opened, "opening the catalog in " + path));
  auto db = std::make_unique<Db>();
  db->db.reset(raw);
  std::unique_ptr<Catalog> catalog(new Catalog(dir, std::move(db), /*read_only=*/false));
  PQKV_RETURN_IF_ERROR(catalog->check_format());
  return catalog;
}

Result<std::unique_ptr<Catalog>> Catalog::open_read_only(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string path = dir + "/catalog";
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    return Status::not_found("no pqkv store in " + dir + " (no catalog folder)");
  }
  rocksdb::Options options;
  options.paranoid_checks = true;
  options.wal_recovery_mode = kWalRecovery;
  // Read-only too: verify() checks the files' CRC-32C with it.
  options.file_checksum_gen_factory = rocksdb::GetFileChecksumGenCrc32cFactory();
  rocksdb::DB* raw = nullptr;
  PQKV_RETURN_IF_ERROR(from_rocksdb(rocksdb::DB::OpenForReadOnly(options, path, &raw),
                                    "opening the catalog in " + path + " to read"));
  auto db = std::make_unique<Db>();
  db->db.reset(raw);
  std::unique_ptr<Catalog> catalog(new Catalog(dir, std::move(db), /*read_only=*/true));
  PQKV_RETURN_IF_ERROR(catalog->check_format());
  return catalog;
}

Status Catalog::check_writable(const std::string& what) const {
  if (!read_only_) return ok_status();
  return Status::failed_precondition(what + ": the catalog in " + dir_ +
                                     " was opened read-only; open the store to change it");
}

Status Catalog::check_format() {
  std::string version;
  const rocksdb::Status s = db_->db->Get(rocksdb::ReadOptions(), kFormatKey, &version);
  if (s.IsNotFound() && !read_only_) {
    Batch b;
    b.put(kFormatKey, std::to_string(kFormatVersion));
    formatted_now_ = true;
    return commit(b);
  }
  if (s.IsNotFound()) {
    return Status::corruption("the catalog in " + dir_ + " has no format version (" + kFormatKey +
                              "): it was not written by pqkv, or its first commit was lost");
  }
  PQKV_RETURN_IF_ERROR(from_rocksdb(s, "reading the catalog's format version"));
  if (version != std::to_string(kFormatVersion)) {
    return Status::failed_precondition("the store in " + dir_ + " has catalog format " + version +
                                       "; this pqkv reads format " +
                                       std::to_string(kFormatVersion));
  }
  return ok_status();
}

Status Catalog::commit(const Batch& batch) {
  PQKV_RETURN_IF_ERROR(check_writable("commit"));
  rocksdb::WriteBatch wb;
  for (const Batch::Op& op : batch.ops_) {
    const rocksdb::Status s = op.remove ? wb.Delete(op.key) : wb.Put(op.key, op.value);
    PQKV_RETURN_IF_ERROR(from_rocksdb(s, "building a catalog batch"));
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return from_rocksdb(db_->db->Write(wo, &wb), "writing the catalog in " + dir_);
}

Result<std::string> Catalog::get(std::string_view key) const {
  std::string value;
  const rocksdb::Status s =
      db_->db->Get(rocksdb::ReadOptions(), rocksdb::Slice(key.data(), key.size()), &value);
  if (s.IsNotFound()) {
    return Status::not_found("no catalog entry '" + std::string(key) + "' in " + dir_);
  }
  PQKV_RETURN_IF_ERROR(from_rocksdb(s, "reading catalog entry '" + std::string(key) + "'"));
  return value;
}

Result<std::vector<std::pair<std::string, std::string>>> Catalog::scan(
    std::string_view prefix) const {
  std::vector<std::pair<std::string, std::string>> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(rocksdb::Slice(prefix.data(), prefix.size()));
       it->Valid() && it->key().starts_with(rocksdb::Slice(prefix.data(), prefix.size()));
       it->Next()) {
    out.emplace_back(it->key().ToString(), it->value().ToString());
  }
  PQKV_RETURN_IF_ERROR(from_rocksdb(it->status(), "scanning the catalog in " + dir_));
  return out;
}

Status Catalog::verify() const {
  const std::string what = "verifying the catalog in " + dir_ + "/catalog";
  PQKV_RETURN_IF_ERROR(from_rocksdb(db_->db->VerifyChecksum(), what));
  return from_rocksdb(db_->db->VerifyFileChecksums(rocksdb::ReadOptions()), what);
}

Status Catalog::compact() {
  PQKV_RETURN_IF_ERROR(check_writable("compact"));
  return from_rocksdb(db_->db->CompactRange(rocksdb::CompactRangeOptions(), nullptr, nullptr),
                      "compacting the catalog in " + dir_);
}

}  // namespace pqkv::storage
