"""Drift options through the C ABI: validation, statistics, and a refit once keys drift."""

import time

import numpy as np
import pytest

import pqkv
from support import keys_values, need


def test_refit_options_round_trip_and_validation(store, spec, rng):
    need("pqkv_sequence_drift_stats")
    with pytest.raises(pqkv.InvalidArgumentError, match="refit_threshold"):
        store.create_sequence("bad", pqkv.SequenceOptions(refit_threshold=0.5))
    with pytest.raises(pqkv.InvalidArgumentError, match="refit_min_tokens"):
        store.create_sequence("bad", pqkv.SequenceOptions(refit_threshold=2, refit_min_tokens=-1))
    seq = store.create_sequence(
        "s", pqkv.SequenceOptions(selection="int8", refit_threshold=2.0, refit_min_tokens=32)
    )
    with pytest.raises(pqkv.FailedPreconditionError):
        seq.drift_stats(0)
    for layer in range(spec.num_layers):
        seq.append(layer, *keys_values(rng, 256, spec))
    seq.finish_prefill()
    stats = seq.drift_stats(1)
    assert isinstance(stats, pqkv.DriftStats)
    assert stats.tracking and stats.fit_tokens == 256 - 32 and stats.tokens_since_fit == 0
    with pytest.raises(pqkv.InvalidArgumentError):
        seq.drift_stats(spec.num_layers)

    # Keys far outside the fitted range: a refit starts past 32 of them and is
    # swapped in by a later append.
    for step in range(400):
        for layer in range(spec.num_layers):
            k, v = keys_values(rng, 1, spec)
            seq.append(layer, 4.0 * k + 5.0, v)
        stats = seq.drift_stats(0)
        if stats.refits > 0:
            break
        time.sleep(0.005)
    assert stats.refits >= 1, stats
    assert stats.total_refit_ms >= stats.last_refit_ms >= 0
    q = rng.standard_normal((spec.num_q_heads, spec.head_dim)).astype(np.float32)
    assert np.isfinite(seq.attend(0, q)).all()
