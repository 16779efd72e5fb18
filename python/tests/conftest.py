"""Shared fixtures: random geometry and data with printed seeds."""

import os

import numpy as np
import pytest

import pqkv


@pytest.fixture
def rng(request):
    """A numpy Generator whose seed is printed (PQKV_TEST_SEED overrides it)."""
    seed = int(os.environ.get("PQKV_TEST_SEED", "1234"))
    print(f"seed={seed} test={request.node.name}")
    return np.random.default_rng(seed)


@pytest.fixture
def spec():
    """tiny geometry (2 layers, 4 q heads, 2 KV heads, head_dim 32), stored in fp32."""
    s = pqkv.ModelSpec.preset("tiny")
    s.dtype = pqkv.DType.F32
    return s


@pytest.fixture
def store(spec):
    with pqkv.Store.open(spec) as st:
        yield st


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
