#include <pqkv/store.h>

#include <cstdio>

int main() {
  pqkv::StoreOptions options;
  options.spec = pqkv::ModelSpec::tiny();
  auto store = pqkv::Store::open(options);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", store.status().to_string().c_str());
    return 1;
  }
  std::printf("opened a store for %s\n", options.spec.to_string().c_str());
  return 0;
}
