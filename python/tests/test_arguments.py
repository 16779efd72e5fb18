"""Plain arguments of the wrong type or out of C's range: a TypeError or an
InvalidArgumentError naming the argument, never a value ctypes silently
wrapped (2**40 reaching C as 0) or a string cut at a NUL."""

import numpy as np
import pytest

import pqkv
from pqkv._args import c_int, c_path, c_str


def keys_values(rng, tokens, spec):
    k = rng.standard_normal((tokens, spec.num_kv_heads, spec.head_dim)).astype(np.float32)
    return k, k.copy()


def test_c_int_checks_type_and_range():
    assert c_int(np.int64(7), "x") == 7
    assert c_int(2**63 - 1, "x", "int64") == 2**63 - 1
    for bad in (2**31, -(2**31) - 1):
        with pytest.raises(pqkv.InvalidArgumentError, match="x = "):
            c_int(bad, "x")
    with pytest.raises(pqkv.InvalidArgumentError):
        c_int(-1, "x", "uint64")
    for bad in (1.5, "3", None, True):
        with pytest.raises(TypeError, match="x must be an integer"):
            c_int(bad, "x")


def test_c_str_and_c_path_refuse_what_c_cannot_carry():
    assert c_str("é", "s") == "é".encode()
    with pytest.raises(pqkv.InvalidArgumentError, match="NUL"):
        c_str("a\0b", "s")
    with pytest.raises(pqkv.InvalidArgumentError, match="UTF-8"):
        c_str("\udcff", "s")
    with pytest.raises(TypeError, match="s must be a str"):
        c_str(b"bytes", "s")
    assert c_path(b"/tmp/x", "p") == b"/tmp/x"
    with pytest.raises(pqkv.InvalidArgumentError, match="NUL"):
        c_path("/tmp/a\0b", "p")
    with pytest.raises(TypeError, match="p must be a path"):
        c_path(5, "p")


def test_layers_and_counts_that_would_wrap_are_refused(store, spec, rng):
    seq = store.create_sequence("wrap")
    k, v = keys_values(rng, 3, spec)
    # 2**32 wrapped to layer 0 and appended there.
    with pytest.raises(pqkv.InvalidArgumentError, match="layer = 4294967296"):
        seq.append(2**32, k, v)
    assert seq.length(0) == 0
    with pytest.raises(TypeError, match="layer must be an integer"):
        seq.append("0", k, v)
    with pytest.raises(TypeError, match="layer must be an integer"):
        seq.length(1.0)
    # 2**64 wrapped to 0 and "reserved" nothing.
    with pytest.raises(pqkv.InvalidArgumentError, match="max_tokens"):
        seq.reserve(2**64)
    q = np.zeros((spec.num_q_heads, spec.head_dim), np.float32)
    with pytest.raises(pqkv.InvalidArgumentError, match="layer = "):
        seq.attend(-(2**40), q)


def test_options_that_would_wrap_are_refused(spec):
    with pytest.raises(pqkv.InvalidArgumentError, match="num_threads"):
        pqkv.Store(pqkv.StoreOptions(spec, num_threads=2**40))
    with pytest.raises(pqkv.InvalidArgumentError, match="dram_budget_bytes"):
        pqkv.Store(pqkv.StoreOptions(spec, dram_budget_bytes=2**70))
    with pytest.raises(TypeError, match="dram_budget_bytes"):
        pqkv.Store(pqkv.StoreOptions(spec, dram_budget_bytes=1.5))
    huge = pqkv.ModelSpec(2**33, spec.num_q_heads, spec.num_kv_heads, spec.head_dim)
    with pytest.raises(pqkv.InvalidArgumentError, match="spec.num_layers"):
        pqkv.Store(pqkv.StoreOptions(huge))
    with pytest.raises(pqkv.InvalidArgumentError, match="pq_m"):
        pqkv.SequenceOptions(pq_m=2**40).to_struct()
    with pytest.raises(pqkv.InvalidArgumentError, match="sink tokens"):
        pqkv.SequenceOptions(sink=2**64).to_struct()
    with pytest.raises(TypeError, match="selection must be a str"):
        pqkv.SequenceOptions(selection=4).to_struct()
    with pytest.raises(pqkv.InvalidArgumentError, match="model_fingerprint"):
        pqkv.StoreOptions(spec, model_fingerprint="m\0rev").to_struct()
    with pytest.raises(pqkv.InvalidArgumentError, match="device"):
        pqkv.StoreOptions(spec, device="cuda:x").cuda_device()


def test_wrong_types_are_type_errors_naming_the_argument(store, spec):
    with pytest.raises(TypeError, match="StoreOptions"):
        pqkv.Store("tiny")
    with pytest.raises(TypeError, match="spec must be a ModelSpec"):
        pqkv.Store(pqkv.StoreOptions(None))
    for bad in (None, 5, b"bytes"):
        with pytest.raises(TypeError, match="name must be a str"):
            store.create_sequence(bad)
    with pytest.raises(TypeError, match="options must be a SequenceOptions"):
        store.create_sequence("o", {"pq_m": 4})
    with pytest.raises(TypeError, match=r"seqs\[0\] must be a pqkv.Sequence"):
        store.attend_batch(0, ["o"], [np.zeros((spec.num_q_heads, spec.head_dim), np.float32)])
    with pytest.raises(TypeError, match="seq must be a pqkv.Sequence"):
        store.save("o")


def test_names_with_nul_are_refused_not_cut(store):
    # "a\0b" reached C as "a": a sequence named "a" was made.
    with pytest.raises(pqkv.InvalidArgumentError, match="NUL"):
        store.create_sequence("a\0b")
    with pytest.raises(pqkv.NotFoundError):
        store.get_sequence("a")
    with pytest.raises(pqkv.InvalidArgumentError, match="NUL"):
        store.drop("a\0b")


def test_an_empty_batch_attends_nothing(store, spec):
    assert store.attend_batch(0, [], []) == []
    with pytest.raises(pqkv.InvalidArgumentError, match="at least one sequence"):
        store.select_batch(0, [], [])


def test_count_errors_carry_their_status_class(store, spec):
    seq = store.create_sequence("count")
    # Once the PqkvError base class: the -1 answer carried no code.
    with pytest.raises(pqkv.InvalidArgumentError, match="out of range"):
        seq.length(spec.num_layers)
    with pytest.raises(pqkv.FailedPreconditionError):
        seq.max_selected(0)  # before finish_prefill


def test_block_cache_admit_steps_reaches_the_store_and_is_checked(spec):
    # Accepted values open; the store's own check names the field and the value.
    for ok in (1, 2, 1000):
        pqkv.Store(pqkv.StoreOptions(spec, block_cache_admit_steps=ok)).close()
    pqkv.Store(pqkv.StoreOptions(spec, block_cache_tokens=1, block_cache_admit_steps=2)).close()
    with pytest.raises(pqkv.InvalidArgumentError, match="block_cache_admit_steps.*got -3"):
        pqkv.Store(pqkv.StoreOptions(spec, block_cache_admit_steps=-3))
    with pytest.raises(pqkv.InvalidArgumentError, match="block_cache_admit_steps.*got 3"):
        pqkv.Store(pqkv.StoreOptions(spec, block_cache_tokens=1, block_cache_admit_steps=3))
    with pytest.raises(pqkv.InvalidArgumentError, match="block_cache_admit_steps = "):
        pqkv.Store(pqkv.StoreOptions(spec, block_cache_admit_steps=2**40))
    with pytest.raises(TypeError, match="block_cache_admit_steps"):
        pqkv.Store(pqkv.StoreOptions(spec, block_cache_admit_steps=1.5))
    # None keeps the library's default, 1.
    assert pqkv.StoreOptions(spec).to_struct().block_cache_admit_steps == 1


def test_zero_is_not_the_default_where_none_is(spec):
    # The C ABI reads 0 as "the default"; from Python 0 reached it and ran
    # as 64 tokens per block without a word.
    for name in ("block_cache_tokens", "block_cache_admit_steps"):
        with pytest.raises(pqkv.InvalidArgumentError, match=f"{name} must be >= 1, got 0"):
            pqkv.Store(pqkv.StoreOptions(spec, **{name: 0}))


def test_token_counts_name_the_option_and_the_grammar(spec):
    # A str outside the grammar raised ValueError("invalid literal for int()")
    # naming neither the option nor what it takes.
    for bad in ("abc", "1e5", "5%%", "+"):
        with pytest.raises(pqkv.InvalidArgumentError, match="sink .* is not a token count"):
            pqkv.SequenceOptions(sink=bad).to_struct()
    with pytest.raises(TypeError, match="window: cannot read a token count"):
        pqkv.SequenceOptions(window=[1, 2]).to_struct()
    with pytest.raises(TypeError, match="top_k ratio must be a number"):
        pqkv.SequenceOptions(top_k=(3, "x")).to_struct()
    # numpy scalars were refused as "cannot read a token count".
    s = pqkv.SequenceOptions(sink=np.int64(16), window=np.float32(0.25)).to_struct()
    assert (s.sink.tokens, s.window.ratio) == (16, 0.25)


def test_a_negative_device_ordinal_is_refused(spec):
    # The C ABI reads every negative cuda_device as the CPU: -5 opened a cpu store.
    for bad in (-1, -5):
        with pytest.raises(pqkv.InvalidArgumentError, match="GPU ordinal is >= 0"):
            pqkv.Store(pqkv.StoreOptions(spec, device=bad))
