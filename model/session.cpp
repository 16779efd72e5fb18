#include "model/session.h"

#include <charconv>
#include <string>

namespace pqkv::model {

Result<ModelSession> open_model_session(const SessionOptions& options) {
  ModelSession s;
  PQKV_ASSIGN_OR_RETURN(s.model, LlamaModel::load(options.model_dir));
  PQKV_ASSIGN_OR_RETURN(s.backend, make_backend(*s.model, options.backend));
  StoreOptions so;
  so.spec = s.model->config().kv_spec(options.kv_dtype);
  so.device = options.store_device;
  so.num_threads = options.num_threads;
  PQKV_ASSIGN_OR_RETURN(s.store, Store::open(so));
  s.store_device = options.store_device;
  return s;
}

Result<BudgetPolicy> parse_budget(std::string_view budget, std::string_view sink) {
  BudgetPolicy policy;
  if (budget == "all") {
    policy = BudgetPolicy::everything();
  } else {
    PQKV_ASSIGN_OR_RETURN(const TokenCount total, parse_token_count("--budget", budget));
    // An odd token count gives the extra token to the window.
    policy.window = {total.tokens - total.tokens / 2, total.ratio / 2};
    policy.top_k = {total.tokens / 2, total.ratio / 2};
  }
  PQKV_ASSIGN_OR_RETURN(policy.sink, parse_token_count("--sink", sink));
  PQKV_RETURN_IF_ERROR(policy.validate());
  return policy;
}

Result<TokenCount> parse_token_count(std::string_view flag, std::string_view text) {
  Result<TokenCount> count = TokenCount::parse(text);
  if (!count.ok()) return count.status().with_context(std::string(flag));
  return count;
}

Result<std::vector<int32_t>> parse_token_ids(std::string_view text) {
  const auto bad = [&](std::string_view what) {
    return Status::invalid_argument(
        "cannot read token ids '" + std::string(text) + "': " + std::string(what) +
        "; give non-negative integers separated by commas or spaces, e.g. 1,319,459");
  };
  std::vector<int32_t> ids;
  size_t field_start = 0;
  while (true) {
    const size_t comma = text.find(',', field_start);
    const std::string_view field =
        text.substr(field_start,
                    comma == std::string_view::npos ? std::string_view::npos : comma - field_start);
    size_t in_field = 0;
    size_t pos = 0;
    while (pos < field.size()) {
      while (pos < field.size() && field[pos] == ' ')
        ++pos;
      if (pos == field.size()) break;
      size_t end = pos;
      while (end < field.size() && field[end] != ' ')
        ++end;
      int32_t id = 0;
      const auto [ptr, ec] = std::from_chars(field.data() + pos, field.data() + end, id);
      if (ec != std::errc() || ptr != field.data() + end || id < 0) {
        std::string what(field.substr(pos, end - pos));
        what.insert(0, 1, '\'');
        what += "' is not a token id";
        return bad(what);
      }
      ids.push_back(id);
      ++in_field;
      pos = end;
    }
    if (in_field == 0 && (comma != std::string_view::npos || field_start > 0)) {
      return bad("an empty id between commas");
    }
    if (comma == std::string_view::npos) break;
    field_start = comma + 1;
  }
  if (ids.empty()) return bad("no ids given");
  return ids;
}

Result<std::vector<int32_t>> encode_prompt(const LlamaModel& model, std::string_view text) {
  if (model.tokenizer() == nullptr) {
    return no_tokenizer_error(model.dir(), model.tokenizer_passed_over(),
                              "give token ids instead (--prompt-ids)");
  }
  std::vector<int32_t> ids;
  if (model.config().bos_token_id) ids.push_back(*model.config().bos_token_id);
  const auto body = model.tokenizer()->encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

}  // namespace pqkv::model
