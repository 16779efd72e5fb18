"""The bindings with torch tensors on a GPU (skipped without one)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pqkv  # noqa: E402
from support import keys_values, need  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@pytest.fixture
def bf16_spec():
    # The CUDA decode path serves head_dim 64 and 128.
    s = pqkv.ModelSpec.preset("tiny")
    s.head_dim = 64
    s.dtype = pqkv.DType.BF16
    return s


def device_pointers_supported():
    # Device pointers in the C ABI came with the batched calls.
    need("pqkv_select_batch")


def fill(seq, spec, data, device):
    for layer, (k, v) in enumerate(data):
        seq.append(layer, torch.from_numpy(k).to(device), torch.from_numpy(v).to(device))


def test_cuda_store_matches_cpu_store(bf16_spec, rng):
    device_pointers_supported()
    spec = bf16_spec
    prompt = [keys_values(rng, 300, spec) for _ in range(spec.num_layers)]
    step = [keys_values(rng, 1, spec) for _ in range(spec.num_layers)]
    # Each backend trains its own codebooks (GPU and CPU k-means), so at a
    # small budget they may pick different tokens; a top-K that covers the
    # middle makes both attend every token through the decode path.
    opts = pqkv.SequenceOptions(sink=8, window=16, top_k=400)
    q = torch.randn(spec.num_q_heads, spec.head_dim, generator=torch.Generator().manual_seed(3))
    outs = {}
    for device in ("cpu", "cuda"):
        with pqkv.Store.open(spec, device=device) as store:
            seq = store.create_sequence("s", opts)
            fill(seq, spec, prompt, device)
            seq.finish_prefill()
            fill(seq, spec, step, device)
            out = seq.attend(0, q.to(device))
            exact = seq.attend_exact(0, q.to(device))
            torch.cuda.synchronize()
            outs[device] = (out.cpu(), exact.cpu())
    torch.testing.assert_close(outs["cuda"][1], outs["cpu"][1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs["cuda"][0], outs["cpu"][0], rtol=2e-2, atol=2e-2)


def test_cuda_select_batch_on_torch_stream(bf16_spec, rng):
    device_pointers_supported()
    spec = bf16_spec
    with pqkv.Store.open(spec, device="cuda") as store:
        seqs = []
        for i, n in enumerate((120, 260)):
            seq = store.create_sequence(f"s{i}", pqkv.SequenceOptions(sink=4, window=8, top_k=8))
            fill(seq, spec, [keys_values(rng, n, spec) for _ in range(spec.num_layers)], "cuda")
            seq.finish_prefill()
            fill(seq, spec, [keys_values(rng, 1, spec) for _ in range(spec.num_layers)], "cuda")
            seqs.append(seq)
        q = torch.randn(2, spec.num_q_heads, spec.head_dim, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            positions, lengths = store.select_batch(0, seqs, q)
            outs = store.attend_batch(0, seqs, q)
        stream.synchronize()
        assert positions.is_cuda and positions.dtype == torch.int32
        assert lengths.shape == (2, spec.num_kv_heads) and bool((lengths > 0).all())
        for i, seq in enumerate(seqs):
            newest = seq.length(0) - 1
            for h in range(spec.num_kv_heads):
                row = positions[i, h, : lengths[i, h]].tolist()
                assert newest in row and set(range(4)) <= set(row)
            torch.testing.assert_close(outs[i], seq.attend(0, q[i]), rtol=1e-3, atol=1e-3)


def test_cuda_scores_past_fp32_are_reported(bf16_spec, rng):
    need("pqkv_sequence_check_health")
    spec = bf16_spec
    with pqkv.Store.open(spec, device="cuda") as store:
        seq = store.create_sequence("s")
        data = [keys_values(rng, 300, spec) for _ in range(spec.num_layers)]
        fill(seq, spec, data, "cuda")
        seq.finish_prefill()
        newest = np.asarray(data[0][0], dtype=np.float32)[-1]
        group = spec.group_size
        # Each query head along the newest key of its KV head: past fp32's range.
        q = np.stack([np.where(newest[h // group] < 0, -3e38, 3e38) for h in range(spec.num_q_heads)])
        q = q.astype(np.float32)
        qd = torch.from_numpy(q).cuda()
        # A host output, and torch's default stream (the store's host stream): at the call.
        for queries in (q, qd):
            with pytest.raises(pqkv.InvalidArgumentError, match="fp32's range"):
                seq.attend(0, queries)
        # A device output on a stream of its own: after the stream, through check_health.
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            seq.attend(0, qd)
        stream.synchronize()
        with pytest.raises(pqkv.InvalidArgumentError, match="layer 0"):
            seq.check_health()
        seq.check_health()  # reported once


def test_hf_generate_on_cuda_matches_cpu():
    device_pointers_supported()
    transformers = pytest.importorskip("transformers")
    import pqkv.hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.08, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    pqkv.hf.enable(model)
    ids = torch.randint(3, 256, (1, 96))
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        cache = pqkv.hf.PqkvCache(
            config, pqkv.SequenceOptions(sink=4, window=16, top_k=16), dtype=pqkv.DType.BF16
        )
        with torch.no_grad():
            out = model.generate(
                ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                past_key_values=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                return_dict_in_generate=True, output_scores=True,
            )
        results[device] = (out.sequences.cpu(), torch.stack(out.scores).cpu())
        assert cache.decode_calls == config.num_hidden_layers * 7
        cache.close()
    torch.testing.assert_close(results["cuda"][1][..., 3:], results["cpu"][1][..., 3:], rtol=2e-2, atol=2e-2)
    assert results["cuda"][0].tolist() == results["cpu"][0].tolist()
