"""The bindings over the C ABI: lifecycle, attention against the exact reference, errors."""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import pqkv
from pqkv import _lib
from support import keys_values, need


def prefill(seq, spec, rng, tokens):
    kv = [keys_values(rng, tokens, spec) for _ in range(spec.num_layers)]
    for layer, (k, v) in enumerate(kv):
        seq.append(layer, k, v)
    seq.finish_prefill()
    return kv


def test_full_budget_attend_matches_exact(store, spec, rng):
    seq = store.create_sequence("s", pqkv.SequenceOptions.everything())
    prefill(seq, spec, rng, 97)
    for layer in range(spec.num_layers):
        k, v = keys_values(rng, 1, spec)
        seq.append(layer, k, v)
        q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
        got = seq.attend(layer, q)
        want = seq.attend_exact(layer, q)
        assert got.shape == (spec.num_q_heads, spec.head_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert seq.length(0) == 98 and seq.length(1) == 98


def test_exact_attention_matches_numpy(store, spec, rng):
    seq = store.create_sequence("s")
    kv = prefill(seq, spec, rng, 33)
    k, v = kv[1]
    q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
    out = np.empty_like(q)
    assert seq.attend_exact(1, q, out) is out
    group = spec.group_size
    for h in range(spec.num_q_heads):
        s = k[:, h // group, :] @ q[h] / np.sqrt(spec.head_dim)
        p = np.exp(s - s.max())
        p /= p.sum()
        np.testing.assert_allclose(out[h], p @ v[:, h // group, :], rtol=1e-4, atol=1e-5)


def test_scores_past_fp32_are_refused(store, spec, rng):
    seq = store.create_sequence("s")
    kv = prefill(seq, spec, rng, 97)
    k = kv[0][0]
    group = spec.group_size
    # Every query head along the newest key of its KV head, at 3e38 a channel.
    q = np.stack([np.where(k[-1, h // group] < 0, -3e38, 3e38) for h in range(spec.num_q_heads)])
    q = q.astype(np.float32)
    for attend in (seq.attend, seq.attend_exact):
        with pytest.raises(pqkv.InvalidArgumentError, match="fp32's range"):
            attend(0, q)
    ok = seq.attend(0, rng.standard_normal(q.shape).astype(np.float32))
    assert np.isfinite(ok).all()
    seq.check_health()  # a cpu store answers at the call: nothing is left to report


def test_fp16_arrays(spec, rng):
    spec.dtype = pqkv.DType.F16
    with pqkv.Store.open(spec) as st:
        seq = st.create_sequence("h")
        for layer in range(spec.num_layers):
            k, v = keys_values(rng, 40, spec)
            seq.append(layer, k.astype(np.float16), v.astype(np.float16))
        seq.finish_prefill()
        q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float16)
        out = seq.attend_exact(0, q)
        assert out.dtype == np.float16 and np.isfinite(out).all()


def test_sequence_lifecycle(store, spec, rng):
    seq = store.create_sequence("a")
    assert store.get_sequence("a") is seq
    with pytest.raises(pqkv.AlreadyExistsError, match="exists"):
        store.create_sequence("a")
    k, v = keys_values(rng, 5, spec)
    seq.append(0, k, v)
    assert store.dram_bytes_used > 0
    store.drop("a")
    with pytest.raises(pqkv.FailedPreconditionError, match="dropped"):
        seq.length(0)
    with pytest.raises(pqkv.NotFoundError):
        store.get_sequence("a")
    store.close()
    with pytest.raises(pqkv.FailedPreconditionError, match="closed"):
        store.create_sequence("b")


def test_errors_carry_pqkv_messages(store, spec, rng):
    seq = store.create_sequence("e")
    k, v = keys_values(rng, 3, spec)
    with pytest.raises(pqkv.InvalidArgumentError, match="out of range") as info:
        seq.append(spec.num_layers, k, v)
    assert info.value.status == 1 and info.value.function == "pqkv_sequence_append"
    assert isinstance(info.value, ValueError)
    bad = np.zeros((3, spec.num_kv_heads + 1, spec.head_dim), np.float32)
    with pytest.raises(pqkv.InvalidArgumentError, match=r"\[tokens, kv_heads, head_dim\]"):
        seq.append(0, bad, bad)
    with pytest.raises(pqkv.InvalidArgumentError, match="float64"):
        seq.append(0, k.astype(np.float64), v)
    with pytest.raises(pqkv.InvalidArgumentError, match="one dtype"):
        seq.append(0, k, v.astype(np.float16))
    with pytest.raises(pqkv.InvalidArgumentError, match="contiguous"):
        seq.append(0, np.asfortranarray(k), v)
    nan = k.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(pqkv.InvalidArgumentError):
        seq.append(0, nan, v)
    assert seq.length(0) == 0  # nothing was appended by a refused call


def test_options_reach_the_library(spec):
    s = pqkv.SequenceOptions(pq_m=4, pq_bits=6, sink=16, window="64+5%", top_k=0.1).to_struct()
    assert (s.pq_m, s.pq_bits, s.sink.tokens) == (4, 6, 16)
    assert (s.window.tokens, s.window.ratio, s.top_k.ratio) == (64, 0.05, 0.1)
    d = pqkv.SequenceOptions().to_struct()  # library defaults
    assert d.pq_bits == 8 and d.sink.tokens == 32 and d.kmeans_iters > 0
    o = pqkv.StoreOptions(spec, device="cuda:1").to_struct()
    assert o.cuda_device == 1 and o.spec.head_dim == spec.head_dim


def test_token_count_strings_follow_the_command_line_grammar():
    # "1.0" was read as 100% here while the command line refuses it.
    assert pqkv.TokenCount.of("100%") == pqkv.TokenCount(0, 1.0)
    assert pqkv.TokenCount.of("64+0.05") == pqkv.TokenCount(64, 0.05)
    for bad in ("1.0", "1.", "150%", "nan%", "-3", "1e3", "0.5.5"):
        with pytest.raises(pqkv.InvalidArgumentError, match="is not a token count"):
            pqkv.TokenCount.of(bad, "top_k")


def test_missing_function_is_a_clear_error():
    libc = _lib.Library(ctypes.CDLL("libc.so.6"), "libc.so.6")
    assert not libc.has("pqkv_select_batch")
    with pytest.raises(pqkv.UnimplementedError, match="pqkv_select_batch is not in libc.so.6"):
        libc.fn("pqkv_select_batch")


def test_missing_library_says_how_to_fix_it():
    code = "import pqkv\ntry:\n pqkv.ModelSpec.preset('tiny')\nexcept pqkv.LibraryNotFoundError as e:\n print(e)"
    env = dict(os.environ, PQKV_LIBRARY="/nonexistent/libpqkv.so")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "PQKV_LIBRARY=/nonexistent/libpqkv.so" in out.stdout, out.stderr
    assert "cmake --build build --target pqkv" in out.stdout


def test_version_and_path():
    assert "libpqkv" in pqkv.library_path()
    v = pqkv.library_version()
    if v is None:
        pytest.skip("this libpqkv has no pqkv_version")
    assert v


def test_reserve(store, spec, rng):
    need("pqkv_sequence_reserve")
    seq = store.create_sequence("r")
    prefill(seq, spec, rng, 64)
    seq.reserve(256)
    for layer in range(spec.num_layers):
        k, v = keys_values(rng, 1, spec)
        seq.append(layer, k, v)
    assert seq.length(0) == 65


def test_torch_cpu_tensors(store, spec, rng):
    torch = pytest.importorskip("torch")
    seq = store.create_sequence("t", pqkv.SequenceOptions.everything())
    for layer in range(spec.num_layers):
        k, v = keys_values(rng, 50, spec)
        seq.append(layer, torch.from_numpy(k), torch.from_numpy(v))
    seq.finish_prefill()
    q = torch.randn(spec.num_q_heads, spec.head_dim)
    out = seq.attend_exact(1, q)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    with pytest.raises(pqkv.InvalidArgumentError, match="contiguous"):
        seq.attend_exact(1, torch.randn(spec.head_dim, spec.num_q_heads).t())


def test_attend_batch_matches_attend(store, spec, rng):
    need("pqkv_attend_batch")
    seqs = [store.create_sequence(f"b{i}") for i in range(3)]
    for i, s in enumerate(seqs):
        prefill(s, spec, rng, 60 + 17 * i)
    layer = 0
    for s in seqs:
        k, v = keys_values(rng, 1, spec)
        s.append(layer, k, v)
    q = rng.standard_normal((3, spec.num_q_heads, spec.head_dim)).astype(np.float32)
    out = store.attend_batch(layer, seqs, q)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(out[i], s.attend(layer, q[i]), rtol=1e-5, atol=1e-6)


def test_preallocated_rows_serve_the_appends(spec, rng):
    with pqkv.Store.open(spec) as probe:
        need_bytes = probe.dram_bytes_for_tokens(256)
        assert need_bytes > 0 and probe.dram_bytes_used == 0
    with pqkv.Store(pqkv.StoreOptions(spec, dram_prealloc_bytes=need_bytes)) as st:
        assert st.dram_bytes_used == need_bytes
        prefill(st.create_sequence("s"), spec, rng, 256)
        assert st.dram_bytes_used == need_bytes, "the appends took no further memory"
        st.preallocate_dram(need_bytes)
        st.preallocate_dram(need_bytes)
        assert st.dram_bytes_used == 2 * need_bytes, "a repeated call takes nothing"


def test_preallocation_over_the_budget_takes_nothing(spec, rng):
    budget = 32 << 20
    with pqkv.Store.open(spec, dram_budget_bytes=budget) as st:
        seq = st.create_sequence("s")
        prefill(seq, spec, rng, 50)
        used = st.dram_bytes_used
        q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
        before = seq.attend(0, q)
        with pytest.raises(pqkv.ResourceExhaustedError, match="dram_budget_bytes"):
            st.preallocate_dram(2 * budget)
        assert st.dram_bytes_used == used
        np.testing.assert_array_equal(seq.attend(0, q), before)
        with pytest.raises(pqkv.InvalidArgumentError):
            st.preallocate_dram(-1)
    with pytest.raises(pqkv.InvalidArgumentError, match="dram_prealloc_bytes"):
        pqkv.Store(pqkv.StoreOptions(spec, dram_budget_bytes=1 << 20, dram_prealloc_bytes=2 << 20))
