"""Shared pytest fixtures: deterministic seeds and the devices to parametrise over (CUDA only where pyrag has
kernels for it, so a CPU-only machine runs the whole suite with CUDA cases skipped)."""

from __future__ import annotations

import pytest
import torch

import pyrag

DEVICES = ["cpu"] + (["cuda"] if pyrag.has_cuda_kernels() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    make them 10x slower: modules that use it (pytestmark = pytest.mark.usefixtures("one_thread")) run
    single-threaded, the thread count restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
