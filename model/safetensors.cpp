#include "model/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>

namespace pqkv::model {
namespace {

using nlohmann::json;

std::optional<DType> safetensors_dtype(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  return std::nullopt;
}

// Bytes per element of the safetensors dtypes pqkv does not read, so their
// offsets are still checked; 0 for a name this table does not know.
int other_dtype_size(const std::string& name) {
  if (name == "BOOL" || name == "U8" || name == "I8" || name == "F8_E4M3" || name == "F8_E5M2") {
    return 1;
  }
  if (name == "I16" || name == "U16") return 2;
  if (name == "I32" || name == "U32") return 4;
  if (name == "I64" || name == "U64" || name == "F64") return 8;
  return 0;
}

Result<json> read_json_file(const std::filesystem::path& path) {
  PQKV_ASSIGN_OR_RETURN(const std::string text, read_model_file(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::corruption(path.string() + " is not valid JSON");
  return j;
}

}  // namespace

int64_t WeightTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

std::string WeightTensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Result<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile st;
  PQKV_ASSIGN_OR_RETURN(st.file_, MappedFile::open(path));
  const std::string where = path.string();
  const size_t size = st.file_.size();
  if (size < 8) {
    return Status::corruption(where + " is truncated: " + std::to_string(size) +
                              " bytes, not even the 8-byte header length");
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, st.file_.data(), 8);  // little-endian on every supported host
  if (header_len > size - 8) {
    return Status::corruption(where + " is truncated: its header claims " +
                              std::to_string(header_len) + " bytes but the file has " +
                              std::to_string(size) + "");
  }
  const auto* header_begin = reinterpret_cast<const char*>(st.file_.data() + 8);
  // A name given twice would silently take its last entry: refused.
  std::set<std::string> names;
  std::string twice;
  const json::parser_callback_t no_repeats = [&](int depth, json::parse_event_t event,
                                                 json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && twice.empty() &&
        !names.insert(parsed.get<std::string>()).second) {
      twice = parsed.get<std::string>();
    }
    return true;
  };
  json header = json::parse(header_begin, header_begin + header_len, no_repeats,
                            /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return Status::corruption(where + ": the safetensors header is not a JSON object");
  }
  if (!twice.empty()) {
    return Status::corruption(where + ": the safetensors header names tensor '" + twice +
                              "' twice");
  }
  struct Extent {
    uint64_t begin;
    uint64_t end;
    std::string name;
  };
  std::vector<Extent> extents;
  const uint8_t* data_begin = st.file_.data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (const auto& item : header.items()) {
    // Named copies, not structured bindings: the lambda below captures them.
    const std::string& name = item.key();
    const json& entry = item.value();
    if (name == "__metadata__") continue;
    const auto bad = [&](const std::string& what) {
      return Status::corruption(where + ": tensor '" + name + "': " + what);
    };
    if (!entry.is_object() || !entry.contains("dtype") || !entry["dtype"].is_string() ||
        !entry.contains("shape") || !entry["shape"].is_array() || !entry.contains("data_offsets") ||
        !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2) {
      return bad("needs dtype, shape and data_offsets [begin, end]");
    }
    WeightTensor t;
    t.name = name;
    t.file = path.filename().string();
    t.file_dtype = entry["dtype"].get<std::string>();
    const std::optional<DType> dtype = safetensors_dtype(t.file_dtype);
    t.supported = dtype.has_value();
    t.dtype = dtype.value_or(DType::kF32);
    const int elem_size = t.supported ? dtype_size(t.dtype) : other_dtype_size(t.file_dtype);
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_unsigned()) return bad("shape must hold non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      // Checked so that the byte count below cannot wrap around.
      if (dim > (uint64_t{1} << 62) || __builtin_mul_overflow(numel, dim, &numel) ||
          numel > (uint64_t{1} << 60)) {
        return bad("shape " + entry["shape"].dump() + " has more elements than a file can hold");
      }
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = entry["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return bad("data_offsets must be non-negative integers");
    }
    const uint64_t begin = off[0].get<uint64_t>();
    const uint64_t end = off[1].get<uint64_t>();
    if (begin > end) return bad("data_offsets begin after they end");
    if (end > data_size) {
      return Status::corruption(where + " is truncated: tensor '" + name + "' ends at byte " +
                                std::to_string(end) + " of the data section, which has only " +
                                std::to_string(data_size));
    }
    const uint64_t want = numel * static_cast<uint64_t>(elem_size);
    if (elem_size > 0 && end - begin != want) {
      return bad("holds " + std::to_string(end - begin) + " bytes but " + t.shape_string() + " " +
                 t.file_dtype + " needs " + std::to_string(want));
    }
    if (end > begin) extents.push_back({begin, end, name});
    t.data = data_begin + begin;
    // The file decides the offset; typed loads need it aligned to the element size.
    if (t.supported && reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) != 0) {
      auto copy =
          std::make_unique_for_overwrite<float[]>((want + sizeof(float) - 1) / sizeof(float));
      std::memcpy(copy.get(), t.data, want);
      t.data = copy.get();
      st.aligned_copies_.push_back(std::move(copy));
    }
    st.tensors_.emplace(name, std::move(t));
  }
  // Tensors sharing bytes would load each other's weights.
  std::sort(extents.begin(), extents.end(),
            [](const Extent& x, const Extent& y) { return x.begin < y.begin; });
  for (size_t i = 1; i < extents.size(); ++i) {
    const Extent& a = extents[i - 1];
    const Extent& b = extents[i];
    if (b.begin < a.end) {
      return Status::corruption(where + ": tensors '" + a.name + "' (bytes " +
                                std::to_string(a.begin) + ".." + std::to_string(a.end) + ") and '" +
                                b.name + "' (bytes " + std::to_string(b.begin) + ".." +
                                std::to_string(b.end) + " of the data section) overlap");
    }
  }
  return st;
}

Result<WeightFiles> WeightFiles::open_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return Status::not_found("model folder " + dir.string() + " does not exist");
  }
  std::vector<std::filesystem::path> paths;
  const auto index_path = dir / "model.safetensors.index.json";
  if (std::filesystem::exists(index_path, ec)) {
    PQKV_ASSIGN_OR_RETURN(json index, read_json_file(index_path));
    if (!index.contains("weight_map") || !index["weight_map"].is_object()) {
      return Status::corruption(index_path.string() + " has no weight_map object");
    }
    std::set<std::string> shards;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) {
        return Status::corruption(index_path.string() + ": weight_map['" + name +
                                  "'] is not a file name");
      }
      const std::filesystem::path shard(file.get<std::string>());
      // Shards live in the model folder: refuse names that would reach outside it.
      if (shard.empty() || shard.is_absolute() || shard.has_parent_path() ||
          shard.filename() == "." || shard.filename() == "..") {
        return Status::corruption(index_path.string() + ": weight_map['" + name + "'] names '" +
                                  shard.string() + "', not a file of the model folder");
      }
      shards.insert(shard.string());
    }
    for (const auto& s : shards)
      paths.push_back(dir / s);
  } else {
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".safetensors") paths.push_back(e.path());
    }
    std::sort(paths.begin(), paths.end());
  }
  if (paths.empty()) {
    return Status::not_found("no .safetensors file in " + dir.string() +
                             " (pqkv reads Hugging Face safetensors checkpoints)");
  }
  WeightFiles wf;
  for (const auto& p : paths) {
    auto file = SafetensorsFile::open(p);
    if (!file.ok()) return file.status();
    wf.files_.push_back(std::make_unique<SafetensorsFile>(std::move(file).value()));
    for (const auto& [name, t] : wf.files_.back()->tensors()) {
      if (!wf.index_.emplace(name, &t).second) {
        return Status::corruption("tensor '" + name + "' appears in two files of " + dir.string());
      }
    }
  }
  return wf;
}

const WeightTensor* WeightFiles::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

namespace {

// Index of the first NaN or Inf among the n elements of `data` (F32, BF16 or
// F16 bits: an exponent of all ones), -1 when there is none. Blocks of
// elements are tested branch-free, so the scan runs at memory speed.
template <class Bits>
int64_t first_non_finite(const void* data, int64_t n, Bits exponent) {
  const auto* v = static_cast<const Bits*>(data);
  constexpr int64_t kBlock = 4096;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    bool any = false;
    for (int64_t i = b; i < e; ++i)
      any |= (v[i] & exponent) == exponent;
    if (!any) continue;
    for (int64_t i = b; i < e; ++i) {
      if ((v[i] & exponent) == exponent) return i;
    }
  }
  return -1;
}

int64_t first_non_finite(const WeightTensor& t) {
  switch (t.dtype) {
    case DType::kF32:
      return first_non_finite<uint32_t>(t.data, t.numel(), 0x7f800000u);
    case DType::kBF16:
      return first_non_finite<uint16_t>(t.data, t.numel(), uint16_t{0x7f80});
    case DType::kF16:
      return first_non_finite<uint16_t>(t.data, t.numel(), uint16_t{0x7c00});
  }
  return -1;
}

}  // namespace

Result<const WeightTensor*> WeightFiles::get(std::string_view name,
                                             std::initializer_list<int64_t> shape) const {
  const WeightTensor* t = find(name);
  if (t == nullptr) {
    return Status::not_found("the checkpoint has no tensor '" + std::string(name) + "'");
  }
  if (!t->supported) {
    return Status::unimplemented("tensor '" + t->name + "' in " + t->file + " has dtype " +
                                 t->file_dtype + "; pqkv reads F32, BF16 and F16 weights");
  }
  if (!std::equal(t->shape.begin(), t->shape.end(), shape.begin(), shape.end())) {
    std::string want = "[";
    for (int64_t d : shape)
      want += (want.size() > 1 ? ", " : "") + std::to_string(d);
    return Status::invalid_argument("tensor '" + t->name + "' in " + t->file + " has shape " +
                                    t->shape_string() + ", but config.json implies " + want + "]");
  }
  // A NaN or Inf weight spreads through every activation after it, and was
  // reported far away, as a non-finite key appended to the KV store.
  if (const int64_t bad = first_non_finite(*t); bad >= 0) {
    return Status::corruption("tensor '" + t->name + "' in " + t->file +
                              " holds a NaN or Inf at element " + std::to_string(bad) +
                              ": the checkpoint is damaged (or misaligned), or was saved from a "
                              "run that diverged");
  }
  return t;
}

Status write_safetensors(const std::filesystem::path& path,
                         const std::vector<SafetensorsEntry>& entries, DType dtype,
                         const std::function<std::vector<float>(size_t)>& values) {
  const char* type = dtype == DType::kF32 ? "F32" : dtype == DType::kBF16 ? "BF16" : "F16";
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& e : entries) {
    uint64_t n = 1;
    for (int64_t d : e.shape)
      n *= static_cast<uint64_t>(d);
    const uint64_t bytes = n * dtype_size(dtype);
    header[e.name] = {
        {"dtype", type}, {"shape", e.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0)
    text += ' ';  // the data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary);
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::vector<uint8_t> buf;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::vector<float> v = values(i);
    buf.resize(v.size() * dtype_size(dtype));
    convert_from_float(v.data(), static_cast<int64_t>(v.size()), buf.data(), dtype);
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  }
  if (!out) return Status::io_error("cannot write " + path.string());
  return ok_status();
}

}  // namespace pqkv::model
