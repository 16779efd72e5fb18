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
