"""Handles used after their sequence or store went, from other threads too, and
the plain values of the newer bindings: each a clear exception, never a crash
or a silently changed value."""

import ctypes
import math
import threading

import numpy as np
import pytest

import pqkv
from pqkv import _lib
from support import keys_values, need


def _prefilled(store, name, spec, rng, tokens=96):
    seq = store.create_sequence(name)
    for layer in range(spec.num_layers):
        seq.append(layer, *keys_values(rng, tokens, spec))
    seq.finish_prefill()
    return seq


def test_raw_handles_after_drop_and_close_are_refused(spec, rng):
    lib = _lib.library()
    store = pqkv.Store.open(spec)
    seq = _prefilled(store, "a", spec, rng)
    other = _prefilled(store, "b", spec, rng)
    seq_handle, other_handle, store_handle = seq.handle, other.handle, store.handle
    store.drop("a")
    with pytest.raises(pqkv.FailedPreconditionError, match="dropped"):
        seq.length(0)
    # The handle C code kept: refused by the library itself.
    assert lib.fn("pqkv_sequence_length")(seq_handle, 0) == -1
    with pytest.raises(pqkv.InvalidArgumentError, match="released sequence handle"):
        lib.count("pqkv_sequence_length", seq_handle, 0)
    with pytest.raises(pqkv.InvalidArgumentError, match="pqkv_sequence_get"):
        lib.call("pqkv_sequence_finish_prefill", seq_handle)
    assert other.length(0) == 96

    store.close()
    store.close()  # idempotent in Python
    with pytest.raises(pqkv.FailedPreconditionError, match="closed"):
        other.length(0)
    with pytest.raises(pqkv.InvalidArgumentError, match="its store was closed"):
        lib.count("pqkv_sequence_length", other_handle, 0)
    with pytest.raises(pqkv.InvalidArgumentError, match="closed store"):
        lib.count("pqkv_store_dram_bytes_used", store_handle)
    # A second close through C changes nothing and says so.
    lib.fn("pqkv_store_close")(store_handle)
    assert lib.fn("pqkv_last_error_code")() == 1  # PQKV_INVALID_ARGUMENT
    assert "closed store" in lib.last_error()


def test_made_up_and_wrong_kind_handles_are_refused(store, spec, rng):
    lib = _lib.library()
    seq = _prefilled(store, "a", spec, rng)
    buf = ctypes.create_string_buffer(64)
    for bogus in (1, 0x1000, ctypes.addressof(buf), 2**64 - 1):
        with pytest.raises(pqkv.InvalidArgumentError, match="is not a handle pqkv gave"):
            lib.count("pqkv_sequence_length", bogus, 0)
        with pytest.raises(pqkv.InvalidArgumentError, match="is not a handle pqkv gave"):
            lib.call("pqkv_store_compact", bogus)
    with pytest.raises(pqkv.InvalidArgumentError, match="not a pqkv_sequence"):
        lib.count("pqkv_sequence_length", store.handle, 0)
    with pytest.raises(pqkv.InvalidArgumentError, match="not a pqkv_store"):
        lib.call("pqkv_store_compact", seq.handle)
    assert seq.length(1) == 96


def test_a_sequence_of_another_store_is_refused(spec, rng):
    with pqkv.Store.open(spec) as a, pqkv.Store.open(spec) as b:
        seq = _prefilled(a, "x", spec, rng)
        q = rng.standard_normal((1, spec.num_q_heads, spec.head_dim)).astype(np.float32)
        with pytest.raises(pqkv.InvalidArgumentError, match="another store"):
            b.attend_batch(0, [seq], q)
        with pytest.raises(pqkv.InvalidArgumentError, match="another store"):
            b.save(seq)
        assert np.isfinite(a.attend_batch(0, [seq], q)).all()


def test_closing_the_store_under_decoding_threads_raises_never_crashes(spec, rng):
    store = pqkv.Store.open(spec, num_threads=2)
    seqs = [_prefilled(store, f"t{i}", spec, rng) for i in range(4)]
    k, v = keys_values(rng, 1, spec)
    q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
    unexpected = []
    started = threading.Barrier(len(seqs) + 1)

    def decode(seq):
        handle = seq.handle  # kept, as C code would, past the close
        lib = _lib.library()
        started.wait()
        for step in range(300):
            layer = step % spec.num_layers
            try:
                seq.append(layer, k, v)
                seq.attend(layer, q)
            except (pqkv.InvalidArgumentError, pqkv.FailedPreconditionError):
                pass  # released under us: the expected refusal
            except Exception as e:  # noqa: BLE001 - anything else is the failure
                unexpected.append(repr(e))
            lib.fn("pqkv_sequence_length")(handle, 0)

    threads = [threading.Thread(target=decode, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    started.wait()
    store.drop("t0")
    store.close()
    for t in threads:
        t.join()
    assert unexpected == []
    for s in seqs:
        with pytest.raises(pqkv.FailedPreconditionError):
            s.length(0)


def test_refit_options_refuse_values_c_would_change(store):
    need("pqkv_sequence_drift_stats")
    for bad in (2**64, 2**63, -(2**63) - 1):  # wrapped by ctypes before
        with pytest.raises(pqkv.InvalidArgumentError, match="refit_min_tokens"):
            store.create_sequence("r", pqkv.SequenceOptions(refit_threshold=2, refit_min_tokens=bad))
    # 0 is "the default" in C; here it is a value, refused as the library does.
    with pytest.raises(pqkv.InvalidArgumentError, match="refit_min_tokens must be >= 1"):
        store.create_sequence("r", pqkv.SequenceOptions(refit_threshold=2, refit_min_tokens=0))
    for bad in (1.5, "32"):
        with pytest.raises(TypeError, match="refit_min_tokens"):
            store.create_sequence("r", pqkv.SequenceOptions(refit_min_tokens=bad))
    for bad in ("2", True, [2]):
        with pytest.raises(TypeError, match="refit_threshold"):
            store.create_sequence("r", pqkv.SequenceOptions(refit_threshold=bad))
    for bad in (math.nan, math.inf, -1.0, 1.0, 0.5):
        with pytest.raises(pqkv.InvalidArgumentError, match="refit_threshold"):
            store.create_sequence("r", pqkv.SequenceOptions(refit_threshold=bad))
    assert "r" not in store._sequences
    seq = store.create_sequence(
        "r", pqkv.SequenceOptions(refit_threshold=np.float64(2.5), refit_min_tokens=2**40)
    )
    assert seq.length(0) == 0


def test_dram_calls_refuse_values_c_would_change(spec):
    need("pqkv_store_preallocate_dram")
    with pqkv.Store.open(spec) as store:
        with pytest.raises(pqkv.InvalidArgumentError, match="nbytes"):
            store.preallocate_dram(2**64 + 1)  # reached C as 1 before
        with pytest.raises(TypeError, match="nbytes"):
            store.preallocate_dram(1.5)
        with pytest.raises(pqkv.InvalidArgumentError, match="bytes must be >= 0"):
            store.preallocate_dram(-1)
        with pytest.raises(pqkv.ResourceExhaustedError, match="nothing was taken"):
            store.preallocate_dram(2**63 - 1)
        assert store.dram_bytes_used == 0
        with pytest.raises(pqkv.InvalidArgumentError, match="tokens"):
            store.dram_bytes_for_tokens(2**64 + 5)  # reached C as 5 before
        assert store.dram_bytes_for_tokens(2**63 - 1) == 2**63 - 1  # saturates; was 0
        assert store.dram_bytes_for_tokens(0) == 0
        assert store.dram_bytes_for_tokens(-5) == 0
        assert store.dram_bytes_for_tokens(1) > 0
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(pqkv.InvalidArgumentError, match="dram_prealloc_bytes"):
            pqkv.Store(pqkv.StoreOptions(spec, dram_prealloc_bytes=bad))
    with pytest.raises(pqkv.InvalidArgumentError, match="dram_prealloc_bytes"):
        pqkv.Store(pqkv.StoreOptions(spec, dram_prealloc_bytes=-1))


def test_drift_stats_layer_is_checked(store, spec, rng):
    need("pqkv_sequence_drift_stats")
    seq = _prefilled(store, "d", spec, rng)
    assert seq.drift_stats(0).tracking
    with pytest.raises(pqkv.InvalidArgumentError, match="layer"):
        seq.drift_stats(2**32)  # reached C as layer 0 before
    with pytest.raises(TypeError, match="layer"):
        seq.drift_stats(0.5)
    with pytest.raises(pqkv.InvalidArgumentError):
        seq.drift_stats(-1)
