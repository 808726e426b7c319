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
