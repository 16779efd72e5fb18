#include "engine/saved_sequences.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <set>
#include <string_view>
#include <vector>

#include "core/byte_io.h"
#include "storage/checksum.h"
#include "storage/page_buffer.h"
#include "storage/segment_file.h"

namespace pqkv::engine {
namespace {

// Version 2 appended resident_sink_window, refit_threshold and
// refit_min_tokens; version 1 records read with their defaults. Version 3
// seals every catalog value of the sequence (record, manifest, index
// records, code chunks) with a CRC-32C (storage/checksum.h); those of
// versions 1 and 2 are read without one.
constexpr uint32_t kRecordVersion = 3;
constexpr uint32_t kIndexVersion = 1;
constexpr int kQueueDepth = 32;
// Codes are stored in catalog values of at most this many bytes.
constexpr int64_t kCodeChunkBytes = int64_t{1} << 20;
// Rows move between memory and a segment in batches of this many bytes.
constexpr int64_t kStagingBytes = int64_t{4} << 20;
constexpr char kSegmentPrefix[] = "seg-";
// The most tokens a saved layer may hold (2^40): past any real context, and
// low enough that byte counts of a damaged record cannot overflow.
constexpr int64_t kMaxSavedTokens = int64_t{1} << 40;
// The largest code of one token and KV head in bytes: exact keys of the
// largest head_dim (512) in fp32, with room to spare.
constexpr int32_t kMaxCodeSize = 1 << 16;
constexpr char kSegmentSuffix[] = ".pqkv";

std::mutex g_hook_mutex;
SaveFaultHook g_hook;

Status fault_at(SaveStep step) {
  std::lock_guard lock(g_hook_mutex);
  return g_hook ? g_hook(step) : ok_status();
}

// Names are any bytes; keys hold them hex-encoded so that no name is a prefix
// of another's keys.
std::string hex(const std::string& name) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : name) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

// The name hex() encoded; nothing when `h` is not such an encoding.
std::optional<std::string> unhex(std::string_view h) {
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (h.size() % 2 != 0) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < h.size(); i += 2) {
    const int hi = digit(h[i]), lo = digit(h[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
  }
  return out;
}

std::string pad(int64_t v, int width) {
  std::string s = std::to_string(v);
  return std::string(static_cast<size_t>(std::max<int>(0, width - static_cast<int>(s.size()))),
                     '0') +
         s;
}

std::string seq_prefix(const std::string& name) {
  return "seq/" + hex(name) + "/";
}
std::string record_key(const std::string& name) {
  return seq_prefix(name) + "record";
}
std::string segment_key(const std::string& name) {
  return seq_prefix(name) + "segment";
}
std::string index_key(const std::string& name, int layer) {
  return seq_prefix(name) + "index/" + pad(layer, 6);
}
std::string codes_key(const std::string& name, int layer, int stage, int head, int64_t chunk) {
  return seq_prefix(name) + "codes/" + pad(layer, 6) + "/" + std::to_string(stage) + "/" +
         pad(head, 6) + "/" + pad(chunk, 10);
}

void put_count(ByteWriter& w, const TokenCount& c) {
  w.put<int64_t>(c.tokens);
  w.put<double>(c.ratio);
}
bool get_count(ByteReader& r, TokenCount* c) {
  return r.get(&c->tokens) && r.get(&c->ratio);
}

std::string encode_record(const SavedSequenceInfo& info) {
  std::string out;
  ByteWriter w(&out);
  w.put(kRecordVersion);
  w.put_bytes(info.name);
  w.put_bytes(info.model_fingerprint);
  const ModelSpec& s = info.spec;
  w.put_bytes(s.name);
  for (int32_t v : {s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim})
    w.put(v);
  w.put(static_cast<uint8_t>(s.dtype));
  const SequenceOptions& o = info.options;
  for (int32_t v : {o.pq.m, o.pq.bits, o.pq.kmeans_iters, o.pq.max_train_points_per_centroid})
    w.put(v);
  w.put<uint64_t>(o.pq.seed);
  w.put(static_cast<uint8_t>(o.selection.code));
  w.put<int32_t>(o.selection.candidates);
  w.put(static_cast<uint8_t>(o.selection.rerank));
  put_count(w, o.budget.sink);
  put_count(w, o.budget.window);
  put_count(w, o.budget.top_k);
  w.put<uint8_t>(o.budget.fixed_at_prefill ? 1 : 0);
  w.put(static_cast<uint8_t>(o.aggregation));
  w.put<uint8_t>(info.prefilled ? 1 : 0);
  w.put<int64_t>(info.prefill_length);
  w.put_vector(info.lengths);
  w.put<int64_t>(info.code_bytes);
  w.put<uint8_t>(o.resident_sink_window ? 1 : 0);
  w.put<double>(o.refit_threshold);
  w.put<int64_t>(o.refit_min_tokens);
  return out;
}

// The record version at the start of a record's bytes; 0 when too short.
uint32_t record_version(std::string_view bytes) {
  uint32_t version = 0;
  if (bytes.size() >= sizeof(version)) std::memcpy(&version, bytes.data(), sizeof(version));
  return version;
}

// Whether a record of `version` and the other values of its sequence are
// sealed: all but the versions before sums, so that a damaged version number
// fails the record's CRC-32C instead of reading as an unknown format.
bool sealed_version(uint32_t version) {
  return version != 1 && version != 2;
}

Result<SavedSequenceInfo> decode_record(std::string_view bytes, const std::string& key) {
  SavedSequenceInfo info;
  const auto bad = [&](const std::string& why) {
    return Status::corruption("catalog entry " + key + ": " + why);
  };
  const uint32_t version = record_version(bytes);
  if (bytes.size() < sizeof(version)) return bad("truncated");
  info.checksummed = sealed_version(version);
  if (info.checksummed) {
    PQKV_ASSIGN_OR_RETURN(bytes, storage::unseal_value(key, bytes));
  }
  if (version < 1 || version > kRecordVersion) {
    return bad("record version " + std::to_string(version) + " is not one of the supported 1.." +
               std::to_string(kRecordVersion) + "; use the pqkv that saved it");
  }
  ByteReader r(bytes);
  uint32_t ignored_version = 0;
  r.get(&ignored_version);
  ModelSpec& s = info.spec;
  SequenceOptions& o = info.options;
  uint8_t dtype = 0, code = 0, rerank = 0, fixed = 0, aggregation = 0, prefilled = 0;
  int32_t candidates = 0;
  r.get_bytes(&info.name);
  r.get_bytes(&info.model_fingerprint);
  r.get_bytes(&s.name);
  r.get(&s.num_layers), r.get(&s.num_q_heads), r.get(&s.num_kv_heads), r.get(&s.head_dim);
  r.get(&dtype);
  r.get(&o.pq.m), r.get(&o.pq.bits), r.get(&o.pq.kmeans_iters);
  r.get(&o.pq.max_train_points_per_centroid), r.get(&o.pq.seed);
  r.get(&code), r.get(&candidates), r.get(&rerank);
  get_count(r, &o.budget.sink), get_count(r, &o.budget.window), get_count(r, &o.budget.top_k);
  r.get(&fixed), r.get(&aggregation), r.get(&prefilled), r.get(&info.prefill_length);
  r.get_vector(&info.lengths);
  r.get(&info.code_bytes);
  uint8_t resident = 1;
  if (version >= 2) r.get(&resident), r.get(&o.refit_threshold), r.get(&o.refit_min_tokens);
  if (!r.done()) return bad("truncated or too long");
  o.resident_sink_window = resident != 0;
  if (dtype > 2 || code > 3 || rerank > 3 || aggregation > 1) return bad("an unknown enum value");
  s.dtype = static_cast<DType>(dtype);
  o.selection.code = static_cast<KeyCode>(code);
  o.selection.candidates = candidates;
  o.selection.rerank = static_cast<KeyCode>(rerank);
  o.budget.fixed_at_prefill = fixed != 0;
  o.aggregation = static_cast<GqaAggregation>(aggregation);
  info.prefilled = prefilled != 0;
  if (Status v = s.validate(); !v.ok()) return bad("its model geometry is invalid: " + v.message());
  if (static_cast<int64_t>(info.lengths.size()) != s.num_layers) {
    return bad("it names " + std::to_string(info.lengths.size()) + " layer lengths for " +
               std::to_string(s.num_layers) + " layers");
  }
  // A record is found by its key: one that holds another name would open
  // (or be dropped as) another sequence.
  if (record_key(info.name) != key) return bad("it holds the record of another sequence name");
  int64_t longest = 0;
  for (int64_t n : info.lengths) {
    // The segment check (rows_fit) bounds them by the file's size; this keeps
    // the byte counts below from overflowing first.
    if (n < 0 || n > kMaxSavedTokens) {
      return bad("a layer length of " + std::to_string(n) + " tokens is outside 0.." +
                 std::to_string(kMaxSavedTokens));
    }
    longest = std::max(longest, n);
  }
  if (info.prefill_length < 0 || info.prefill_length > longest) {
    return bad("its prompt length " + std::to_string(info.prefill_length) + " is outside 0.." +
               std::to_string(longest) + " (its longest layer)");
  }
  if (info.code_bytes < 0) return bad("a negative code byte count");
  if (Status v = o.validate(s); !v.ok())
    return bad("its sequence options are invalid: " + v.message());
  return info;
}

// Corruption unless the rows of `info` fit in its segment of `pages` pages.
Status rows_fit(const SavedSequenceInfo& info, int64_t pages, const std::string& key) {
  const ModelSpec& s = info.spec;
  // Lengths are at most kMaxSavedTokens, so the sum fits int64 in long double.
  long double bytes = 0;
  for (int64_t n : info.lengths)
    bytes += static_cast<long double>(n) * s.num_kv_heads * s.row_bytes();
  if (bytes > static_cast<long double>(pages) * storage::kPageBytes) {
    return Status::corruption("catalog entry " + key + ": its rows need " +
                              std::to_string(static_cast<double>(bytes)) +
                              " bytes but its segment " + info.segment_file + " holds " +
                              std::to_string(pages) + " pages");
  }
  return ok_status();
}

struct IndexRecord {
  int64_t num_tokens = 0;
  struct Stage {
    KeyCode code = KeyCode::kPq;
    int32_t code_size = 0;
    std::string codec_state;
    int64_t chunks_per_head = 0;
  };
  std::vector<Stage> stages;
};

std::string encode_index(const IndexRecord& rec) {
  std::string out;
  ByteWriter w(&out);
  w.put(kIndexVersion);
  w.put<int64_t>(rec.num_tokens);
  w.put<uint32_t>(static_cast<uint32_t>(rec.stages.size()));
  for (const auto& s : rec.stages) {
    w.put(static_cast<uint8_t>(s.code));
    w.put<int32_t>(s.code_size);
    w.put_bytes(s.codec_state);
    w.put<int64_t>(s.chunks_per_head);
  }
  return out;
}

Result<IndexRecord> decode_index(std::string_view bytes, const std::string& key) {
  ByteReader r(bytes);
  IndexRecord rec;
  uint32_t version = 0, stages = 0;
  if (!r.get(&version) || version != kIndexVersion || !r.get(&rec.num_tokens) || !r.get(&stages) ||
      stages > 2) {
    return Status::corruption("catalog entry " + key + " is not an index record of version " +
                              std::to_string(kIndexVersion));
  }
  const auto bad = [&](const std::string& why) {
    return Status::corruption("catalog entry " + key + ": " + why);
  };
  if (rec.num_tokens < 0 || rec.num_tokens > kMaxSavedTokens) {
    return bad("a token count of " + std::to_string(rec.num_tokens) + " is outside 0.." +
               std::to_string(kMaxSavedTokens));
  }
  for (uint32_t i = 0; i < stages; ++i) {
    IndexRecord::Stage s;
    uint8_t code = 0;
    r.get(&code), r.get(&s.code_size), r.get_bytes(&s.codec_state), r.get(&s.chunks_per_head);
    if (code > 3) return bad("unknown key code");
    if (s.code_size < 1 || s.code_size > kMaxCodeSize) {
      return bad("a code size of " + std::to_string(s.code_size) + " bytes is outside 1.." +
                 std::to_string(kMaxCodeSize));
    }
    const int64_t bytes = rec.num_tokens * s.code_size;  // < 2^56: no overflow
    if (s.chunks_per_head != (bytes + kCodeChunkBytes - 1) / kCodeChunkBytes) {
      return bad(std::to_string(s.chunks_per_head) + " code chunks per head where " +
                 std::to_string(bytes) + " code bytes take " +
                 std::to_string((bytes + kCodeChunkBytes - 1) / kCodeChunkBytes));
    }
    s.code = static_cast<KeyCode>(code);
    rec.stages.push_back(std::move(s));
  }
  if (!r.done()) return Status::corruption("catalog entry " + key + " is truncated or too long");
  return rec;
}

// Whether the entries of sequence `name` (a scan of its keys) are sealed, as
// its record's version says.
bool sealed_entries(const std::vector<std::pair<std::string, std::string>>& entries,
                    const std::string& name) {
  for (const auto& [key, value] : entries) {
    if (key == record_key(name)) return sealed_version(record_version(value));
  }
  return false;
}

// The payload of a catalog value: itself when not `sealed`, else checked
// against its CRC-32C.
Result<std::string_view> unseal(std::string_view key, std::string_view value, bool sealed) {
  if (!sealed) return value;
  return storage::unseal_value(key, value);
}

int64_t layer_begin_row(const std::vector<int64_t>& lengths, int layer, int kv_heads) {
  int64_t rows = 0;
  for (int l = 0; l < layer; ++l)
    rows += lengths[l] * kv_heads;
  return rows;
}

Status sync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::io_error("cannot open directory " + dir + ": " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Status::io_error("cannot sync directory " + dir + ": " + std::strerror(err));
  return ok_status();
}

bool is_segment_name(const std::string& f) {
  const size_t p = std::strlen(kSegmentPrefix), s = std::strlen(kSegmentSuffix);
  return f.size() > p + s && f.compare(0, p, kSegmentPrefix) == 0 &&
         f.compare(f.size() - s, s, kSegmentSuffix) == 0;
}

}  // namespace

void set_save_fault_hook(SaveFaultHook hook) {
  std::lock_guard lock(g_hook_mutex);
  g_hook = std::move(hook);
}

SavedSequences::SavedSequences(std::string dir, std::unique_ptr<storage::Catalog> catalog,
                               std::unique_ptr<storage::IoRing> ring)
    : dir_(std::move(dir)), catalog_(std::move(catalog)), ring_(std::move(ring)) {}
SavedSequences::~SavedSequences() = default;

Result<std::unique_ptr<SavedSequences>> SavedSequences::open(const std::string& dir,
                                                             Access access) {
  const bool read_only = access == Access::kReadOnly;
  PQKV_ASSIGN_OR_RETURN(auto catalog,
                        read_only ? storage::Catalog::open_read_only(dir)
                                  : storage::Catalog::open(dir, /*create_if_missing=*/true));
  PQKV_ASSIGN_OR_RETURN(auto ring, storage::IoRing::create(kQueueDepth));
  std::unique_ptr<SavedSequences> saved(
      new SavedSequences(dir, std::move(catalog), std::move(ring)));
  if (!read_only) PQKV_RETURN_IF_ERROR(saved->remove_orphans(/*strict=*/false));
  return saved;
}

std::string SavedSequences::next_segment_name() {
  return kSegmentPrefix + pad(static_cast<int64_t>(next_segment_++), 12) + kSegmentSuffix;
}

Status SavedSequences::remove_orphans(bool strict) {
  namespace fs = std::filesystem;
  std::set<std::string> named;
  PQKV_ASSIGN_OR_RETURN(auto entries, catalog_->scan("seq/"));
  // A damaged manifest may name any file: then none is an orphan for sure.
  // Opening keeps them all (the other sequences stay usable); compacting
  // refuses until the damaged sequence is dropped.
  bool keep_all = false;
  std::set<std::string> sealed;  // prefixes of the sequences whose record seals their values
  for (const auto& [key, value] : entries) {
    constexpr std::string_view kRecord = "/record";
    if (key.size() > kRecord.size() &&
        key.compare(key.size() - kRecord.size(), kRecord.size(), kRecord) == 0 &&
        sealed_version(record_version(value))) {
      sealed.insert(key.substr(0, key.size() - kRecord.size()));
    }
  }
  for (const auto& [key, value] : entries) {
    if (key.size() < 8 || key.compare(key.size() - 8, 8, "/segment") != 0) continue;
    Result<std::string_view> payload =
        unseal(key, value, sealed.count(key.substr(0, key.size() - 8)) > 0);
    Result<storage::SegmentManifest> manifest =
        payload.ok() ? storage::SegmentManifest::decode(*payload) : payload.status();
    if (!manifest.ok()) {
      if (strict) {
        return manifest.status().with_context("catalog entry " + key +
                                              " (drop its sequence, then compact again)");
      }
      keep_all = true;
      continue;
    }
    named.insert(manifest->file);
  }
  // Segment files beside a catalog that was empty at this open are not
  // orphans of a save (a save needs the catalog made first): the catalog lost
  // its entries (an emptied log), and the files are the only copy of those
  // sequences' rows. Opening keeps them.
  if (!strict && catalog_->formatted_now()) keep_all = true;
  std::error_code ec;
  std::lock_guard lock(mutex_);
  for (const auto& entry : fs::directory_iterator(dir_, ec)) {
    const std::string f = entry.path().filename().string();
    if (!is_segment_name(f)) continue;
    const std::string number =
        f.substr(std::strlen(kSegmentPrefix),
                 f.size() - std::strlen(kSegmentPrefix) - std::strlen(kSegmentSuffix));
    next_segment_ =
        std::max<uint64_t>(next_segment_, std::strtoull(number.c_str(), nullptr, 10) + 1);
    if (!keep_all && named.count(f) == 0) fs::remove(entry.path(), ec);
  }
  if (ec) return Status::io_error("cannot list store directory " + dir_ + ": " + ec.message());
  return ok_status();
}

Status SavedSequences::save(Sequence::Impl& seq, const std::string& fingerprint) {
  PQKV_RETURN_IF_ERROR(catalog_->check_writable("saving sequence '" + seq.name() + "'"));
  // Device appends must have landed in the host rows before they are read.
  PQKV_RETURN_IF_ERROR(seq.check_health());
  const ModelSpec& spec = seq.spec();
  const storage::KvRowStore& rows = seq.state().rows();
  SavedSequenceInfo info;
  info.name = seq.name();
  info.model_fingerprint = fingerprint;
  info.spec = spec;
  info.options = seq.options();
  info.prefilled = seq.prefilled();
  info.prefill_length = seq.prefill_length();
  for (int l = 0; l < spec.num_layers; ++l)
    info.lengths.push_back(rows.length(l));

  storage::Catalog::Batch batch;
  // The previous save's entries go first; the new ones replace them.
  PQKV_ASSIGN_OR_RETURN(auto old_entries, catalog_->scan(seq_prefix(info.name)));
  std::string old_segment;
  const bool old_sealed = sealed_entries(old_entries, info.name);
  for (const auto& [key, value] : old_entries) {
    if (key == segment_key(info.name)) {
      PQKV_ASSIGN_OR_RETURN(std::string_view payload, unseal(key, value, old_sealed));
      PQKV_ASSIGN_OR_RETURN(auto m, storage::SegmentManifest::decode(payload));
      old_segment = m.file;
    }
    batch.remove(key);
  }

  // Codec state and codes of every layer, through each codec's own encoding.
  for (int l = 0; l < spec.num_layers; ++l) {
    const index::LayerIndex* index = seq.layer_index(l);
    if (index == nullptr) continue;
    PQKV_ASSIGN_OR_RETURN(index::IndexSnapshot snap, index->snapshot());
    IndexRecord rec;
    rec.num_tokens = snap.num_tokens;
    for (size_t st = 0; st < snap.stages.size(); ++st) {
      const auto& stage = snap.stages[st];
      const int64_t bytes = snap.num_tokens * stage.code_size;
      const int64_t chunks = (bytes + kCodeChunkBytes - 1) / kCodeChunkBytes;
      rec.stages.push_back({stage.code, stage.code_size, stage.codec_state, chunks});
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t begin = c * kCodeChunkBytes;
          const int64_t n = std::min(kCodeChunkBytes, bytes - begin);
          const std::string key = codes_key(info.name, l, static_cast<int>(st), h, c);
          batch.put(key, storage::seal_value(
                             key, {reinterpret_cast<const char*>(stage.codes[h].data()) + begin,
                                   static_cast<size_t>(n)}));
        }
        info.code_bytes += bytes;
      }
    }
    const std::string key = index_key(info.name, l);
    batch.put(key, storage::seal_value(key, encode_index(rec)));
  }

  std::lock_guard lock(mutex_);
  // Rows, [layer][token][KV head], packed, the last page zero-padded.
  const std::string file = next_segment_name();
  PQKV_ASSIGN_OR_RETURN(auto writer, storage::SegmentWriter::create(dir_, file, ring_.get()));
  const int64_t row_bytes = spec.row_bytes();
  PQKV_ASSIGN_OR_RETURN(storage::PageBuffer staging,
                        storage::PageBuffer::allocate(kStagingBytes / storage::kPageBytes));
  int64_t fill = 0;
  const auto flush = [&](bool last) -> Status {
    const int64_t pages =
        last ? (fill + storage::kPageBytes - 1) / storage::kPageBytes : fill / storage::kPageBytes;
    if (pages == 0) return ok_status();
    if (last) std::memset(staging.data() + fill, 0, pages * storage::kPageBytes - fill);
    PQKV_RETURN_IF_ERROR(
        writer->append({staging.data(), static_cast<size_t>(pages) * storage::kPageBytes}));
    const int64_t moved = pages * storage::kPageBytes;
    const int64_t rest = std::max<int64_t>(0, fill - moved);
    std::memmove(staging.data(), staging.data() + moved, static_cast<size_t>(rest));
    fill = rest;
    return ok_status();
  };
  // Rows of blocks spilled to disk are read back a whole layer block (every
  // KV head) at a time, as the loop reaches it.
  using storage::KvRowStore;
  std::vector<std::vector<std::byte>> spilled(static_cast<size_t>(spec.num_kv_heads));
  int spilled_layer = -1;
  int64_t spilled_block = -1;
  const auto row_of = [&](int l, int h, int64_t t) -> Result<const std::byte*> {
    if (const std::byte* r = rows.row(l, h, t)) return r;
    const int64_t block = t >> KvRowStore::kBlockShift;
    if (l != spilled_layer || block != spilled_block) {
      for (int k = 0; k < spec.num_kv_heads; ++k) {
        if (rows.row(l, k, block << KvRowStore::kBlockShift) != nullptr) continue;
        spilled[k].resize(static_cast<size_t>(KvRowStore::kTokensPerBlock * row_bytes));
        PQKV_RETURN_IF_ERROR(
            rows.spilled()->read_block(l, block * spec.num_kv_heads + k, spilled[k].data()));
      }
      spilled_layer = l;
      spilled_block = block;
    }
    return spilled[h].data() + (t & (KvRowStore::kTokensPerBlock - 1)) * row_bytes;
  };
  for (int l = 0; l < spec.num_layers; ++l) {
    for (int64_t t = 0; t < rows.length(l); ++t) {
      for (int h = 0; h < spec.num_kv_heads; ++h) {
        if (fill + row_bytes > staging.bytes()) PQKV_RETURN_IF_ERROR(flush(false));
        PQKV_ASSIGN_OR_RETURN(const std::byte* row, row_of(l, h, t));
        std::memcpy(staging.data() + fill, row, static_cast<size_t>(row_bytes));
        fill += row_bytes;
      }
    }
  }
  PQKV_RETURN_IF_ERROR(flush(true));
  PQKV_RETURN_IF_ERROR(fault_at(SaveStep::kSegmentWritten));
  PQKV_ASSIGN_OR_RETURN(storage::SegmentManifest manifest, writer->finish());
  PQKV_RETURN_IF_ERROR(sync_dir(dir_));
  PQKV_RETURN_IF_ERROR(fault_at(SaveStep::kSegmentDurable));

  info.segment_file = file;
  batch.put(segment_key(info.name), storage::seal_value(segment_key(info.name), manifest.encode()));
  batch.put(record_key(info.name), storage::seal_value(record_key(info.name), encode_record(info)));
  Status committed = catalog_->commit(batch);
  if (!committed.ok()) {
    ::unlink((dir_ + "/" + file).c_str());
    return committed.with_context("saving sequence '" + info.name + "'");
  }
  PQKV_RETURN_IF_ERROR(fault_at(SaveStep::kCatalogSwitched));
  if (!old_segment.empty()) ::unlink((dir_ + "/" + old_segment).c_str());
  return ok_status();
}

Result<SavedSequenceInfo> SavedSequences::info(const std::string& name) const {
  Result<std::string> rec = catalog_->get(record_key(name));
  if (!rec.ok()) {
    if (rec.status().code() == StatusCode::kNotFound) {
      return Status::not_found("no saved sequence named '" + name + "' in " + dir_);
    }
    return rec.status();
  }
  PQKV_ASSIGN_OR_RETURN(SavedSequenceInfo info, decode_record(*rec, record_key(name)));
  PQKV_ASSIGN_OR_RETURN(auto manifest, read_manifest(name, info.checksummed));
  info.segment_file = manifest.file;
  info.segment_bytes = manifest.pages * storage::kPageBytes;
  PQKV_RETURN_IF_ERROR(rows_fit(info, manifest.pages, segment_key(name)));
  info.layer_codes.resize(static_cast<size_t>(info.spec.num_layers));
  for (int l = 0; l < info.spec.num_layers; ++l) {
    const std::string key = index_key(name, l);
    Result<std::string> idx = get_value(key, info.checksummed);
    if (!idx.ok()) {
      if (idx.status().code() != StatusCode::kNotFound) return idx.status();
      // Every layer of a prefilled sequence has its index.
      if (info.prefilled) {
        return Status::corruption("catalog entry " + key + " is missing, but sequence '" + name +
                                  "' was saved after finish_prefill");
      }
      continue;
    }
    PQKV_ASSIGN_OR_RETURN(IndexRecord r, decode_index(*idx, key));
    if (r.num_tokens > info.lengths[l]) {
      return Status::corruption("catalog entry " + key + " codes " + std::to_string(r.num_tokens) +
                                " tokens, but layer " + std::to_string(l) + " holds " +
                                std::to_string(info.lengths[l]));
    }
    for (const auto& s : r.stages)
      info.layer_codes[l].push_back(s.code);
  }
  return info;
}

Result<std::string> SavedSequences::get_value(const std::string& key, bool sealed) const {
  PQKV_ASSIGN_OR_RETURN(std::string value, catalog_->get(key));
  if (!sealed) return value;
  PQKV_ASSIGN_OR_RETURN(std::string_view payload, storage::unseal_value(key, value));
  return std::string(payload);
}

Result<storage::SegmentManifest> SavedSequences::read_manifest(const std::string& name,
                                                               bool sealed) const {
  PQKV_ASSIGN_OR_RETURN(std::string seg, get_value(segment_key(name), sealed));
  return storage::SegmentManifest::decode(seg);
}

Result<std::vector<std::string>> SavedSequences::names() const {
  std::vector<std::string> out;
  PQKV_ASSIGN_OR_RETURN(auto entries, catalog_->scan("seq/"));
  // Names come from the keys, so that a sequence whose record is damaged is
  // still listed (and info() names the damage).
  for (const auto& [key, value] : entries) {
    constexpr std::string_view kSuffix = "/record";
    if (key.size() < 4 + kSuffix.size() ||
        key.compare(key.size() - kSuffix.size(), kSuffix.size(), kSuffix) != 0) {
      continue;
    }
    std::optional<std::string> name = unhex(key.substr(4, key.size() - 4 - kSuffix.size()));
    if (name) out.push_back(std::move(*name));
  }
  return out;
}

Result<index::IndexSnapshot> SavedSequences::read_index(const std::string& name, int layer) const {
  const std::string key = index_key(name, layer);
  PQKV_ASSIGN_OR_RETURN(std::string record, catalog_->get(record_key(name)));
  PQKV_ASSIGN_OR_RETURN(SavedSequenceInfo info, decode_record(record, record_key(name)));
  Result<std::string> bytes = get_value(key, info.checksummed);
  if (!bytes.ok()) {
    if (bytes.status().code() != StatusCode::kNotFound) return bytes.status();
    return Status::not_found("sequence '" + name + "' has no saved index for layer " +
                             std::to_string(layer) + " (saved before finish_prefill?)");
  }
  PQKV_ASSIGN_OR_RETURN(IndexRecord rec, decode_index(*bytes, key));
  if (layer < 0 || layer >= info.spec.num_layers) {
    return Status::invalid_argument("sequence '" + name + "' has layers 0.." +
                                    std::to_string(info.spec.num_layers - 1) + ", not " +
                                    std::to_string(layer));
  }
  if (rec.num_tokens > info.lengths[layer]) {
    return Status::corruption("catalog entry " + key + " codes " + std::to_string(rec.num_tokens) +
                              " tokens, but its layer holds " +
                              std::to_string(info.lengths[layer]));
  }
  index::IndexSnapshot snap;
  snap.num_tokens = rec.num_tokens;
  for (size_t st = 0; st < rec.stages.size(); ++st) {
    const auto& s = rec.stages[st];
    index::IndexSnapshot::Stage out;
    out.code = s.code;
    out.code_size = s.code_size;
    out.codec_state = s.codec_state;
    const int64_t bytes = rec.num_tokens * s.code_size;
    for (int h = 0; h < info.spec.num_kv_heads; ++h) {
      std::vector<uint8_t> codes;
      codes.reserve(static_cast<size_t>(bytes));
      for (int64_t c = 0; c < s.chunks_per_head; ++c) {
        const std::string ck = codes_key(name, layer, static_cast<int>(st), h, c);
        Result<std::string> chunk = get_value(ck, info.checksummed);
        if (!chunk.ok()) {
          if (chunk.status().code() != StatusCode::kNotFound) return chunk.status();
          return Status::corruption("catalog entry " + ck + " is missing");
        }
        codes.insert(codes.end(), chunk->begin(), chunk->end());
      }
      if (static_cast<int64_t>(codes.size()) != bytes) {
        return Status::corruption("the codes of sequence '" + name + "' layer " +
                                  std::to_string(layer) + " head " + std::to_string(h) + " hold " +
                                  std::to_string(codes.size()) + " bytes, not " +
                                  std::to_string(bytes));
      }
      out.codes.push_back(std::move(codes));
    }
    snap.stages.push_back(std::move(out));
  }
  return snap;
}

Status SavedSequences::read_rows(const std::string& name, const SavedSequenceInfo& info, int layer,
                                 const RowChunkFn& fn) const {
  PQKV_ASSIGN_OR_RETURN(auto manifest, read_manifest(name, info.checksummed));
  const ModelSpec& spec = info.spec;
  const int64_t row_bytes = spec.row_bytes();
  const int64_t token_bytes = row_bytes * spec.num_kv_heads;
  std::lock_guard lock(mutex_);
  PQKV_ASSIGN_OR_RETURN(auto reader, storage::SegmentReader::open(dir_, manifest, ring_.get()));
  const int64_t needed =
      layer_begin_row(info.lengths, spec.num_layers, spec.num_kv_heads) * row_bytes;
  if (needed > manifest.pages * storage::kPageBytes) {
    return Status::corruption("segment file " + dir_ + "/" + manifest.file + " holds " +
                              std::to_string(manifest.pages) + " pages, too few for the " +
                              std::to_string(needed) + " bytes of rows its sequence names");
  }
  const int64_t chunk_tokens = std::max<int64_t>(1, kStagingBytes / token_bytes);
  PQKV_ASSIGN_OR_RETURN(
      storage::PageBuffer staging,
      storage::PageBuffer::allocate(
          storage::round_up_to_pages(chunk_tokens * token_bytes) / storage::kPageBytes + 1));
  std::vector<storage::SegmentReader::PageRead> reads;
  const int first = layer < 0 ? 0 : layer;
  const int last = layer < 0 ? spec.num_layers : layer + 1;
  for (int l = first; l < last; ++l) {
    const int64_t base = layer_begin_row(info.lengths, l, spec.num_kv_heads) * row_bytes;
    for (int64_t t0 = 0; t0 < info.lengths[l]; t0 += chunk_tokens) {
      const int64_t n = std::min(chunk_tokens, info.lengths[l] - t0);
      const int64_t begin = base + t0 * token_bytes;
      const int64_t end = begin + n * token_bytes;
      const int64_t first_page = begin / storage::kPageBytes;
      const int64_t last_page = (end + storage::kPageBytes - 1) / storage::kPageBytes;
      reads.clear();
      for (int64_t p = first_page; p < last_page; ++p)
        reads.push_back({p, staging.data() + (p - first_page) * storage::kPageBytes});
      PQKV_RETURN_IF_ERROR(reader->read(reads));
      PQKV_RETURN_IF_ERROR(
          fn(l, t0, n, staging.data() + (begin - first_page * storage::kPageBytes)));
    }
  }
  return ok_status();
}

Status SavedSequences::load(const std::string& name, Sequence::Impl& seq) const {
  PQKV_ASSIGN_OR_RETURN(SavedSequenceInfo info, this->info(name));
  const ModelSpec& spec = info.spec;
  const int64_t row_bytes = spec.row_bytes();
  const int64_t half = row_bytes / 2;
  std::vector<std::byte> keys, values;
  PQKV_RETURN_IF_ERROR(read_rows(
      name, info, /*layer=*/-1,
      [&](int l, int64_t /*t0*/, int64_t n, const std::byte* src) -> Status {
        const size_t bytes = static_cast<size_t>(n * spec.num_kv_heads * half);
        if (keys.size() < bytes) keys.resize(bytes), values.resize(bytes);
        for (int64_t r = 0; r < n * spec.num_kv_heads; ++r) {
          std::memcpy(keys.data() + r * half, src + r * row_bytes, static_cast<size_t>(half));
          std::memcpy(values.data() + r * half, src + r * row_bytes + half,
                      static_cast<size_t>(half));
        }
        const TensorView k(keys.data(), spec.dtype, Device::cpu(),
                           {n, spec.num_kv_heads, spec.head_dim});
        const TensorView v(values.data(), spec.dtype, Device::cpu(),
                           {n, spec.num_kv_heads, spec.head_dim});
        return seq.state().append(l, k, v, Stream::host());
      }));
  for (int l = 0; l < spec.num_layers; ++l) {
    if (info.layer_codes[l].empty()) continue;
    PQKV_ASSIGN_OR_RETURN(index::IndexSnapshot snap, read_index(name, l));
    Status s = seq.state().restore_index(l, snap, Stream::host());
    if (!s.ok()) return s.with_context("restoring the index of layer " + std::to_string(l));
  }
  if (info.prefilled) seq.restore_prefill(info.prefill_length);
  return seq.check_health();
}

Result<std::vector<float>> SavedSequences::read_keys(const std::string& name, int layer) const {
  PQKV_ASSIGN_OR_RETURN(SavedSequenceInfo info, this->info(name));
  const ModelSpec& spec = info.spec;
  if (layer < 0 || layer >= spec.num_layers) {
    return Status::invalid_argument("sequence '" + name + "' has layers 0.." +
                                    std::to_string(spec.num_layers - 1) + ", not " +
                                    std::to_string(layer));
  }
  const int64_t row_bytes = spec.row_bytes();
  const int64_t d = spec.head_dim;
  std::vector<float> keys;
  try {
    keys.resize(static_cast<size_t>(info.lengths[layer] * spec.num_kv_heads * d));
  } catch (const std::bad_alloc&) {
    return Status::resource_exhausted("no memory for the fp32 keys of sequence '" + name +
                                      "' layer " + std::to_string(layer));
  }
  PQKV_RETURN_IF_ERROR(
      read_rows(name, info, layer, [&](int, int64_t t0, int64_t n, const std::byte* src) -> Status {
        float* dst = keys.data() + t0 * spec.num_kv_heads * d;
        for (int64_t r = 0; r < n * spec.num_kv_heads; ++r)
          convert_to_float(src + r * row_bytes, spec.dtype, d, dst + r * d);
        return ok_status();
      }));
  return keys;
}

Status SavedSequences::verify(const std::string& name) const {
  PQKV_ASSIGN_OR_RETURN(SavedSequenceInfo info, this->info(name));
  PQKV_ASSIGN_OR_RETURN(auto manifest, read_manifest(name, info.checksummed));
  {
    std::lock_guard lock(mutex_);
    PQKV_ASSIGN_OR_RETURN(auto reader, storage::SegmentReader::open(dir_, manifest, ring_.get()));
    constexpr int64_t kBatch = 256;
    PQKV_ASSIGN_OR_RETURN(storage::PageBuffer buf, storage::PageBuffer::allocate(kBatch));
    std::vector<storage::SegmentReader::PageRead> reads;
    for (int64_t p0 = 0; p0 < manifest.pages; p0 += kBatch) {
      reads.clear();
      for (int64_t p = p0; p < std::min(manifest.pages, p0 + kBatch); ++p)
        reads.push_back({p, buf.data() + (p - p0) * storage::kPageBytes});
      PQKV_RETURN_IF_ERROR(reader->read(reads));
    }
  }
  for (int l = 0; l < info.spec.num_layers; ++l) {
    if (info.layer_codes[l].empty()) continue;
    PQKV_RETURN_IF_ERROR(read_index(name, l).status());
  }
  return ok_status();
}

Status SavedSequences::drop(const std::string& name) {
  PQKV_RETURN_IF_ERROR(catalog_->check_writable("dropping sequence '" + name + "'"));
  PQKV_ASSIGN_OR_RETURN(auto entries, catalog_->scan(seq_prefix(name)));
  if (entries.empty()) return Status::not_found("no saved sequence named '" + name + "'");
  storage::Catalog::Batch batch;
  std::string segment;
  const bool sealed = sealed_entries(entries, name);
  for (const auto& [key, value] : entries) {
    // A damaged manifest names no file for sure: its file is left for
    // compact(), once this drop removed the manifest.
    Result<std::string_view> payload = unseal(key, value, sealed);
    if (key == segment_key(name) && payload.ok()) {
      Result<storage::SegmentManifest> m = storage::SegmentManifest::decode(*payload);
      if (m.ok()) segment = m->file;
    }
    batch.remove(key);
  }
  PQKV_RETURN_IF_ERROR(catalog_->commit(batch));
  if (!segment.empty()) ::unlink((dir_ + "/" + segment).c_str());
  return ok_status();
}

Status SavedSequences::compact() {
  PQKV_RETURN_IF_ERROR(catalog_->check_writable("compacting"));
  PQKV_RETURN_IF_ERROR(remove_orphans(/*strict=*/true));
  return catalog_->compact();
}

}  // namespace pqkv::engine
