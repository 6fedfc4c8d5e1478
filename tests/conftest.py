"""Shared fixtures for the pystage test suite.

CPU-only must pass; anything CUDA-specific is parametrised over ``devices`` and
skips without a GPU.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import pystage.ops  # noqa: F401  (registers torch.ops.pystage.* with their fakes and autograd)

from pystage import _ext

# "cuda" is tested only where a GPU is present *and* the CUDA kernels were built and load.
HAS_CUDA = torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS

# Every tensor here is tiny: intra-op threads only add synchronisation, and on a loaded 2-core machine
# OpenMP spin-waits make a 4x7x6 conv ~1000x slower. One thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def seeded_rng():
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen() -> torch.Generator:
    """A private, seeded CPU generator for tests that want their own stream."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device the masked ops can run on here: "cpu", plus "cuda" when available."""
    return request.param


@pytest.fixture
def devices() -> list[str]:
    """The list of usable devices ("cuda" only when a GPU is present)."""
    return list(DEVICES)


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
