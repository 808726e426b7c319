"""Helpers the ops share: dtype codes for the C++ core, pointer/stream plumbing, argument checks."""

from __future__ import annotations

import contextlib

import torch

from .. import _ext

# Must match csrc/common.h DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ptr(t: torch.Tensor | None) -> int:
    """Address handed to the C++ core (0 for an absent optional tensor)."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as an integer for the CUDA module (kernels launch on it); 0 for a
    CPU tensor (the CUDA simulator's only stream)."""
    if t.device.type == "cpu":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def simulating(t: torch.Tensor) -> bool:
    """Whether t's op runs the CUDA kernels' code in the CUDA simulator (pyrag._ext.simulate_cuda)."""
    return t.device.type == "cpu" and _ext.current_sim() is not None


def device_guard(t: torch.Tensor):
    """Makes t's GPU current (kernels plan for and launch on the current device); nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def kernels_for(t: torch.Tensor):
    """The compiled module that serves t's device, or None when pyrag has no kernel there (use the reference).
    CPU tensors get the CUDA simulator instead of the CPU kernels inside pyrag._ext.simulate_cuda()."""
    if t.device.type == "cpu":
        return _ext.current_sim() or _ext.cpu
    if t.device.type == "cuda" and _ext.has_cuda_kernels():
        return _ext.cuda
    return None


def num_threads() -> int:
    """CPU kernels use as many threads as torch does, so torch.set_num_threads governs both."""
    return max(1, torch.get_num_threads())
