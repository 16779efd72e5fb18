// A store directory's saved sequences: the catalog (storage/catalog.h) and
// one segment file of K/V rows per saved sequence (storage/segment_file.h).
// Layout and encodings: docs/formats.md.
//
// A save writes a new segment file and makes it durable, then switches the
// catalog to it in one synced write batch (the sequence's record, its
// segment manifest, every layer's codec state and codes), then deletes the
// previous segment. A crash at any point leaves the old sequence or the new
// one; a segment file that no catalog entry names is an orphan of such a
// crash and is deleted when the directory is next opened (or compacted).
//
// Thread safety: every method may be called from any thread; I/O is
// serialised by an internal mutex.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/sequence_impl.h"
#include "pqkv/status.h"
#include "storage/catalog.h"
#include "storage/io_ring.h"
#include "storage/segment_file.h"

namespace pqkv::engine {

// The points of a save where a test may stop it, as a crash there would.
enum class SaveStep : uint8_t {
  kSegmentWritten = 0,   // rows written, the file not yet durable
  kSegmentDurable = 1,   // the file synced, the catalog not yet switched
  kCatalogSwitched = 2,  // the catalog names the new file; the old one still exists
};
// Called at each SaveStep of every save; a non-OK Status stops the save
// there, leaving on disk what a crash at that point would (the unfinished
// file of kSegmentWritten is removed, as a torn file is never named).
// Tests only; null (the default) runs saves to the end.
using SaveFaultHook = std::function<Status(SaveStep)>;
void set_save_fault_hook(SaveFaultHook hook);

// What the catalog says of one saved sequence, without its rows or codes.
struct SavedSequenceInfo {
  std::string name;
  std::string model_fingerprint;
  ModelSpec spec;
  SequenceOptions options;
  bool prefilled = false;
  int64_t prefill_length = 0;
  std::vector<int64_t> lengths;  // [layer] tokens
  // Whether every catalog value of the sequence carries a CRC-32C
  // (storage/checksum.h), checked on each read: saves of this format on;
  // false for a sequence saved by an older pqkv (read without them).
  bool checksummed = false;
  std::string segment_file;   // file name inside the directory
  int64_t segment_bytes = 0;  // pages * 4 KiB
  int64_t code_bytes = 0;     // codes of every layer, stage and KV head
  // Per layer: the code of each stage (empty before finish_prefill).
  std::vector<std::vector<KeyCode>> layer_codes;
};

class SavedSequences {
 public:
  // How open() treats the directory.
  enum class Access {
    // Creates the catalog when missing and deletes orphan segment files.
    kReadWrite,
    // Writes nothing (tools that inspect): the catalog is opened read-only
    // (Catalog::open_read_only), so a store another process has open can be
    // read; NotFound where there is no catalog; save, drop and compact
    // answer FailedPrecondition.
    kReadOnly,
  };
  // Opens the catalog in `dir`. Errors of Catalog::open (or open_read_only)
  // and IoRing::create.
  static Result<std::unique_ptr<SavedSequences>> open(const std::string& dir,
                                                      Access access = Access::kReadWrite);
  ~SavedSequences();

  const std::string& dir() const { return dir_; }

  // Saves `seq` under its name, replacing an earlier save of that name.
  // `fingerprint` identifies the model. Nothing changes on failure.
  Status save(Sequence::Impl& seq, const std::string& fingerprint);

  // The catalog's record of `name`: NotFound when none is saved.
  Result<SavedSequenceInfo> info(const std::string& name) const;
  // Names of the saved sequences (a damaged record is still listed);
  // Corruption or IoError when the catalog cannot be scanned.
  Result<std::vector<std::string>> names() const;

  // Reads `name`'s rows and codes into `seq`, made empty from info(name)'s
  // spec and options: appends the rows layer by layer and restores each
  // layer's index, then its prefill state. Corruption or NotFound naming
  // the segment file when it is damaged, truncated or missing.
  Status load(const std::string& name, Sequence::Impl& seq) const;

  // Reads every page of `name`'s segment and checks its checksums, and that
  // every code chunk is present: OK, or the first problem found, naming it.
  Status verify(const std::string& name) const;

  // Checks the catalog's own files (Catalog::verify): every block's
  // checksum and each table file's CRC-32C. Corruption naming the file.
  Status verify_catalog() const { return catalog_->verify(); }

  // Removes `name` from the catalog, then its segment file. NotFound when
  // none is saved.
  Status drop(const std::string& name);

  // Deletes orphan segment files and compacts the catalog. Corruption naming
  // the entry when a sequence's segment manifest is damaged: drop it first.
  Status compact();

  // Reads `name`'s codes of one layer (for export): NotFound when absent.
  Result<index::IndexSnapshot> read_index(const std::string& name, int layer) const;

  // Reads `name`'s stored keys of `layer` from its segment file (checking
  // every page's checksum) as fp32 in host memory, [tokens][kv_heads][head_dim]
  // (tokens = info(name).lengths[layer]). InvalidArgument for a layer out of
  // range, ResourceExhausted when they do not fit in memory, and load's
  // errors for a damaged, truncated or missing file.
  Result<std::vector<float>> read_keys(const std::string& name, int layer) const;

 private:
  // Called with the rows of tokens [t0, t0 + n) of `layer`, packed
  // [token][KV head][keys, then values] in the row dtype; valid during the call.
  using RowChunkFn = std::function<Status(int layer, int64_t t0, int64_t n, const std::byte* rows)>;
  // Reads the rows of `layer` (every layer, in order, when it is -1) in
  // staging-sized chunks.
  Status read_rows(const std::string& name, const SavedSequenceInfo& info, int layer,
                   const RowChunkFn& fn) const;
  // The catalog value of `key`, checked against its CRC-32C when `sealed`
  // (the sequence's record is of a sealed version): Catalog::get's errors,
  // Corruption naming the key on a mismatch.
  Result<std::string> get_value(const std::string& key, bool sealed) const;
  // The segment manifest of `name`, read with get_value.
  Result<storage::SegmentManifest> read_manifest(const std::string& name, bool sealed) const;
  SavedSequences(std::string dir, std::unique_ptr<storage::Catalog> catalog,
                 std::unique_ptr<storage::IoRing> ring);
  // Deletes segment files no catalog entry names. When a manifest cannot be
  // decoded, keeps every file, or, when `strict`, answers its Corruption.
  // Unless `strict`, keeps every file too when the catalog was empty at open.
  Status remove_orphans(bool strict);
  std::string next_segment_name();

  std::string dir_;
  std::unique_ptr<storage::Catalog> catalog_;
  mutable std::mutex mutex_;  // guards ring_ and next_segment_
  std::unique_ptr<storage::IoRing> ring_;
  uint64_t next_segment_ = 0;
};

}  // namespace pqkv::engine
