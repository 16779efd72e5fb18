#include "tools/model_flags.h"

#include <fmt/format.h>

#include "tools/cli_checks.h"

namespace pqkv::tools {

std::string pq_label(const PqConfig& pq, int head_dim) {
  return fmt::format("m={},b={}", pq.resolved_m(head_dim), pq.bits);
}

void add_model_flags(CLI::App* cmd, ModelFlags* flags) {
  cmd->add_option("--budget", flags->budget,
                  std::string("Tokens a decode step attends to besides the sink, split evenly "
                              "between the recent window and the top-K, or 'all' for every "
                              "token: ") +
                      kTokenCountGrammar)
      ->capture_default_str();
  cmd->add_option("--sink", flags->sink,
                  "First tokens always attended, in --budget's grammar (32, 1%, 16+1%)")
      ->capture_default_str();
  cmd->add_option("--pq", flags->pq,
                  "The PQ code, used when --selection is 'pq' or a two-stage selection with "
                  "a pq stage: 'default' (8 dims per sub-space: m=head_dim/8, b=8), 'pqcache' "
                  "(m=2,b=6) or m=M,b=B (M sub-spaces: divides head_dim, at most head_dim/2; "
                  "B bits per code: 1..8)")
      ->capture_default_str();
  cmd->add_option(
         "--selection", flags->selection,
         "How each decode step picks its top-K tokens: 'int4' (the default) or 'int8' "
         "(keys scalar-quantized per channel), 'pq' (with --pq), 'oracle' (exact "
         "scores from the full keys: what the approximations lose), or FIRST+RERANK:C "
         "for two stages (e.g. pq+int8:4: PQ picks 4 x top-K candidates, int8 keys keep the "
         "top-K; C is 1 to 1024)")
      ->capture_default_str();
  cmd->add_option("--backend", flags->backend, "Where the forward pass runs: cpu or cuda[:N]")
      ->capture_default_str();
  cmd->add_option("--store-device", flags->store_device,
                  "Where the pqkv store searches and attends: cpu or cuda[:N]")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", flags->kv_dtype,
                  "How the store keeps keys and values: bf16, f16, f32")
      ->capture_default_str();
  cmd->add_option("--prefill-chunk", flags->prefill_chunk,
                  "Prompt tokens per prefill pass (bounds activation memory); 0 = one pass")
      ->capture_default_str()
      ->check(finite_at_least(0))
      ->check(whole_number(true));
  cmd->add_option("--threads", flags->threads, "CPU threads; 0 = one per core")
      ->capture_default_str()
      ->check(finite_at_least(0))
      ->check(whole_in(0, StoreOptions::kMaxThreads));
  cmd->add_flag("--quiet", flags->quiet,
                "No progress output on stderr (the index build's progress line, shown on a "
                "terminal for builds over a second, and per-run progress); results and errors "
                "are still printed");
}

Status resolve_model_flags(const ModelFlags& flags, model::SessionOptions* session,
                           SequenceOptions* sequence) {
  PQKV_ASSIGN_OR_RETURN(session->backend, parse_device(flags.backend));
  PQKV_ASSIGN_OR_RETURN(session->store_device, parse_device(flags.store_device));
  PQKV_ASSIGN_OR_RETURN(session->kv_dtype, parse_dtype(flags.kv_dtype));
  session->num_threads = flags.threads;
  PQKV_ASSIGN_OR_RETURN(sequence->budget, model::parse_budget(flags.budget, flags.sink));
  PQKV_ASSIGN_OR_RETURN(sequence->pq, PqConfig::parse(flags.pq));
  PQKV_ASSIGN_OR_RETURN(sequence->selection, SelectionConfig::parse(flags.selection));
  return ok_status();
}

std::string selection_description(const SequenceOptions& sequence, int head_dim) {
  const SelectionConfig& s = sequence.selection;
  const bool pq = s.code == KeyCode::kPq || (s.two_stage() && s.rerank == KeyCode::kPq);
  return s.to_string() + (pq ? " " + pq_label(sequence.pq, head_dim) : "");
}

}  // namespace pqkv::tools
