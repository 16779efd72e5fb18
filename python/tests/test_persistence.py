"""Saving and reopening sequences through the bindings: a store opened on a
directory, Sequence.save, Store.open_sequence / close_sequence /
saved_sequence_names / compact, and the errors a user meets."""

import os

import numpy as np
import pytest

import pqkv
from support import keys_values


def prefill_and_step(seq, spec, rng, tokens=150):
    """Prefills `tokens`, appends one decode token per layer, and returns the
    attention of each layer for one query per layer."""
    for layer in range(spec.num_layers):
        k, v = keys_values(rng, tokens, spec)
        seq.append(layer, k, v)
    seq.finish_prefill()
    queries, outs = [], []
    for layer in range(spec.num_layers):
        k, v = keys_values(rng, 1, spec)
        seq.append(layer, k, v)
        q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
        queries.append(q)
        outs.append(seq.attend(layer, q))
    return queries, outs


def test_saved_sequence_answers_as_before_after_close_and_restart(spec, rng, tmp_path):
    directory = str(tmp_path / "store")
    with pqkv.Store.open(spec, directory=directory, model_fingerprint="m1") as store:
        seq = store.create_sequence("chat-1", pqkv.SequenceOptions(selection="int4"))
        queries, outs = prefill_and_step(seq, spec, rng)
        seq.save()
        assert store.saved_sequence_names() == ["chat-1"]
        with pytest.raises(pqkv.AlreadyExistsError):
            store.open_sequence("chat-1")
        store.close_sequence("chat-1")
        with pytest.raises(pqkv.FailedPreconditionError):
            seq.length(0)
        again = store.open_sequence("chat-1")
        assert again.length(0) == 151
        for layer, q in enumerate(queries):
            np.testing.assert_array_equal(again.attend(layer, q), outs[layer])

    # A new store on the directory: the save outlives the process's store.
    with pqkv.Store.open(spec, directory=directory, model_fingerprint="m1") as store:
        assert store.saved_sequence_names() == ["chat-1"]
        seq = store.open_sequence("chat-1")
        for layer, q in enumerate(queries):
            np.testing.assert_array_equal(seq.attend(layer, q), outs[layer])

    with pqkv.Store.open(spec, directory=directory, model_fingerprint="another") as store:
        with pytest.raises(pqkv.FailedPreconditionError, match="fingerprint"):
            store.open_sequence("chat-1")


def test_errors_without_a_directory_and_for_unknown_names(store, spec, rng, tmp_path):
    seq = store.create_sequence("s")
    prefill_and_step(seq, spec, rng, tokens=40)
    with pytest.raises(pqkv.FailedPreconditionError):
        seq.save()
    assert store.saved_sequence_names() == []
    with pqkv.Store.open(spec, directory=str(tmp_path / "d")) as st:
        with pytest.raises(pqkv.NotFoundError):
            st.open_sequence("nope")
        with pytest.raises(pqkv.NotFoundError):
            st.close_sequence("nope")


def test_drop_and_compact_reclaim_the_save_and_many_long_names_list(spec, rng, tmp_path):
    directory = tmp_path / "store"
    # Names longer in all than the first buffer saved_sequence_names tries.
    names = [f"{i}-" + "x" * 1500 for i in range(4)]
    with pqkv.Store.open(spec, directory=str(directory)) as store:
        for name in names:
            seq = store.create_sequence(name)
            prefill_and_step(seq, spec, rng, tokens=40)
            seq.save()
        assert sorted(store.saved_sequence_names()) == sorted(names)
        segments = [f for f in os.listdir(directory) if f.endswith(".pqkv")]
        assert len(segments) == 4
        store.drop(names[0])
        store.compact()
        assert sorted(store.saved_sequence_names()) == sorted(names[1:])
        assert len([f for f in os.listdir(directory) if f.endswith(".pqkv")]) == 3
        with pytest.raises(pqkv.NotFoundError):
            store.open_sequence(names[0])
