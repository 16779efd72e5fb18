"""Test support: synthetic keys and values, and skipping on missing C functions."""

import numpy as np
import pytest

import pqkv


def keys_values(rng, tokens, spec):
    """Keys with a few outlier channels (as post-RoPE keys have) and plain values,
    [tokens, kv_heads, head_dim] fp32."""
    k = rng.standard_normal((tokens, spec.num_kv_heads, spec.head_dim)).astype(np.float32)
    k[..., :2] *= 6.0
    v = rng.standard_normal((tokens, spec.num_kv_heads, spec.head_dim)).astype(np.float32)
    return k, v


def need(name):
    """Skips the test when the loaded libpqkv lacks the C function `name`."""
    if not pqkv.has_function(name):
        pytest.skip(f"{pqkv.library_path()} has no {name}: built before that function existed")
