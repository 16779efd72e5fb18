#include "model/llama_model.h"

#include <string>

namespace pqkv::model {

Result<LlamaWeights> bind_llama_weights(const WeightFiles& files, const LlamaConfig& c) {
  const int64_t hidden = c.hidden_size;
  const int64_t q_dim = static_cast<int64_t>(c.num_q_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t inter = c.intermediate_size;
  LlamaWeights w;
  PQKV_ASSIGN_OR_RETURN(w.embed, files.get("model.embed_tokens.weight", {c.vocab_size, hidden}));
  PQKV_ASSIGN_OR_RETURN(w.final_norm, files.get("model.norm.weight", {hidden}));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    auto head = files.get("lm_head.weight", {c.vocab_size, hidden});
    if (!head.ok()) {
      return head.status().with_context(
          "config.json leaves the embeddings untied (tie_word_embeddings false, or absent: its "
          "default is false)");
    }
    w.lm_head = *head;
  }
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    PQKV_ASSIGN_OR_RETURN(lw.input_norm, files.get(p + "input_layernorm.weight", {hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.q_proj, files.get(p + "self_attn.q_proj.weight", {q_dim, hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.k_proj, files.get(p + "self_attn.k_proj.weight", {kv_dim, hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.v_proj, files.get(p + "self_attn.v_proj.weight", {kv_dim, hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.o_proj, files.get(p + "self_attn.o_proj.weight", {hidden, q_dim}));
    if (c.attention_bias) {
      PQKV_ASSIGN_OR_RETURN(lw.q_bias, files.get(p + "self_attn.q_proj.bias", {q_dim}));
      PQKV_ASSIGN_OR_RETURN(lw.k_bias, files.get(p + "self_attn.k_proj.bias", {kv_dim}));
      PQKV_ASSIGN_OR_RETURN(lw.v_bias, files.get(p + "self_attn.v_proj.bias", {kv_dim}));
    }
    if (c.o_proj_bias) {
      PQKV_ASSIGN_OR_RETURN(lw.o_bias, files.get(p + "self_attn.o_proj.bias", {hidden}));
    }
    PQKV_ASSIGN_OR_RETURN(lw.post_norm, files.get(p + "post_attention_layernorm.weight", {hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.gate_proj, files.get(p + "mlp.gate_proj.weight", {inter, hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.up_proj, files.get(p + "mlp.up_proj.weight", {inter, hidden}));
    PQKV_ASSIGN_OR_RETURN(lw.down_proj, files.get(p + "mlp.down_proj.weight", {hidden, inter}));
    if (c.mlp_bias) {
      PQKV_ASSIGN_OR_RETURN(lw.gate_bias, files.get(p + "mlp.gate_proj.bias", {inter}));
      PQKV_ASSIGN_OR_RETURN(lw.up_bias, files.get(p + "mlp.up_proj.bias", {inter}));
      PQKV_ASSIGN_OR_RETURN(lw.down_bias, files.get(p + "mlp.down_proj.bias", {hidden}));
    }
    w.layers.push_back(lw);
  }
  return w;
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::load(const std::filesystem::path& dir) {
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel());
  model->dir_ = dir;
  PQKV_ASSIGN_OR_RETURN(model->config_, LlamaConfig::load(dir));
  PQKV_ASSIGN_OR_RETURN(model->files_, WeightFiles::open_dir(dir));
  auto weights = bind_llama_weights(model->files_, model->config_);
  if (!weights.ok()) return weights.status().with_context(dir.string());
  model->weights_ = std::move(weights).value();
  PQKV_ASSIGN_OR_RETURN(model->tokenizer_,
                        load_tokenizer(dir, model->config_, &model->tokenizer_passed_over_));
  return model;
}

}  // namespace pqkv::model
