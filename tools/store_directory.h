// The check `pqkv inspect` and `pqkv export-faiss` make of their DIR before
// opening it read-only.
#pragma once

#include <filesystem>
#include <string>

#include "pqkv/status.h"

namespace pqkv::tools {

// OK when `dir` holds a store's catalog; else InvalidArgument saying whether
// the path is missing or holds no store, and where a store directory comes from.
inline Status check_store_directory(const std::string& dir) {
  std::error_code ec;
  if (std::filesystem::is_directory(std::filesystem::path(dir) / "catalog", ec)) return ok_status();
  const std::string what = std::filesystem::exists(dir, ec)
                               ? " is not a pqkv store directory (no catalog in it)"
                               : " does not exist";
  return Status::invalid_argument(
      dir + what +
      ": give the directory of a store that saved sequences (StoreOptions::directory, "
      "Store::save; `pqkv bench --save DIR` makes one)");
}

}  // namespace pqkv::tools
