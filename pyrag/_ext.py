"""Loads the compiled kernels: pyrag._C (CPU, always built) and pyrag._C_cuda (built where nvcc was found)."""

from __future__ import annotations

import functools

__all__ = ["cpu", "cuda", "has_cuda_kernels"]

try:
    from . import _C as cpu
except ImportError as e:  # a source checkout that was never built, or a broken wheel
    raise ImportError(
        "pyrag's compiled CPU module pyrag._C is missing. Install the package with `pip install .` "
        "(or `pip install -e .` for development) so the C++ core gets built."
    ) from e

try:
    from . import _C_cuda as cuda
except ImportError:  # CPU-only build: nvcc was not found when the wheel was built
    cuda = None


@functools.cache
def has_cuda_kernels() -> bool:
    """True when the CUDA module was built, torch sees a GPU, and the module can see a device too."""
    if cuda is None:
        return False
    import torch

    return torch.cuda.is_available() and cuda.device_count() > 0
