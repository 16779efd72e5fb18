"""pqkv.hf: a tiny random Llama generates through pqkv as it does with DynamicCache."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pqkv  # noqa: E402
import pqkv.hf  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

PROMPT, NEW = 80, 12


@pytest.fixture(autouse=True)
def generate_without_fsdp_probe(monkeypatch):
    """Debian's torch 1.13 cannot import torch.distributed.fsdp on Python 3.11
    (a dataclass with a mutable default), and transformers' generate() imports
    it to ask whether the model is FSDP-wrapped. Answer "no" there only."""
    try:
        import torch.distributed.fsdp  # noqa: F401
    except Exception:
        import transformers.generation.utils as gen

        if hasattr(gen, "is_fsdp_managed_module"):
            monkeypatch.setattr(gen, "is_fsdp_managed_module", lambda module: False)


def tiny_llama(seed):
    print(f"seed={seed}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.08,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, PROMPT))
    return model, ids


def generate(model, ids, cache):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out.sequences[0, ids.shape[1] :], torch.stack(out.scores)


def set_eager(model):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def test_full_budget_generates_as_dynamic_cache():
    model, ids = tiny_llama(7)
    set_eager(model)
    want_tokens, want_scores = generate(model, ids, DynamicCache())
    pqkv.hf.enable(model)
    cache = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions.everything(pq_bits=4))
    tokens, scores = generate(model, ids, cache)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    # Every decode step of every layer went through pqkv; the first new token
    # comes from the prompt's forward pass.
    assert cache.decode_calls == model.config.num_hidden_layers * (NEW - 1)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    assert cache.sequences[0].length(0) == PROMPT + NEW - 1
    cache.close()


def test_small_budget_runs_and_differs_from_exact():
    model, ids = tiny_llama(11)
    pqkv.hf.enable(model)
    exact = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions.everything(pq_bits=4))
    _, exact_scores = generate(model, ids, exact)
    small = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions(sink=4, window=8, top_k=8, pq_bits=4))
    tokens, scores = generate(model, ids, small)
    assert tokens.shape == (NEW,) and bool(((tokens >= 0) & (tokens < 256)).all())
    assert torch.isfinite(scores[..., 3:]).all()  # ids 0..2: pad, bos, eos (masked by min_new_tokens)
    assert small.decode_calls == model.config.num_hidden_layers * (NEW - 1)
    # 21 of ~85 tokens attended: the logits move, which shows the budget is applied.
    assert not torch.allclose(scores[1:], exact_scores[1:], atol=1e-3)
    if pqkv.has_function("pqkv_sequence_max_selected"):
        assert small.sequences[0].max_selected(0) <= 4 + 8 + 8 + 1


def test_batch_of_two_rows():
    model, ids = tiny_llama(3)
    set_eager(model)
    batch = torch.cat([ids, torch.flip(ids, dims=[1])])
    want = [generate(model, batch[i : i + 1], DynamicCache())[0].tolist() for i in range(2)]
    pqkv.hf.enable(model)
    cache = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions.everything(pq_bits=4))
    with torch.no_grad():
        out = model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            past_key_values=cache,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
        )
    assert out[:, PROMPT:].tolist() == want
    assert len(cache.sequences) == 2


def test_cache_without_pqkv_attention_is_refused():
    model, ids = tiny_llama(5)
    set_eager(model)
    cache = pqkv.hf.PqkvCache(model.config)
    with pytest.raises(pqkv.FailedPreconditionError, match="attn_implementation"):
        generate(model, ids, cache)


def test_pqkv_attention_without_pqkv_cache_is_exact():
    model, ids = tiny_llama(9)
    set_eager(model)
    want, _ = generate(model, ids, DynamicCache())
    pqkv.hf.enable(model)
    got, _ = generate(model, ids, DynamicCache())
    assert got.tolist() == want.tolist()


def test_storage_dtype_choice():
    model, ids = tiny_llama(13)
    pqkv.hf.enable(model)
    default = pqkv.hf.PqkvCache(model.config, pqkv.SequenceOptions.everything(pq_bits=4))
    generate(model, ids[:, :40], default)
    assert default.store.spec.dtype == pqkv.DType.F32  # the model's dtype
    bf16 = pqkv.hf.PqkvCache(
        model.config, pqkv.SequenceOptions.everything(pq_bits=4), dtype=pqkv.DType.BF16
    )
    tokens, _ = generate(model, ids[:, :40], bf16)
    assert bf16.store.spec.dtype == pqkv.DType.BF16 and tokens.shape == (NEW,)
    bf16.reset()
    assert bf16.get_seq_length() == 0 and not bf16.sequences
    generate(model, ids[:, :40], bf16)  # the same cache serves a new prompt after reset
    assert bf16.get_seq_length() == 40 + NEW - 1
