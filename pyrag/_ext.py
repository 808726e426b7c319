"""Loads the compiled kernels: pyrag._C (CPU, always built) and pyrag._C_cuda (built where nvcc was found), and
switches the CUDA simulator (pyrag._C_cudasim, built with _C_cuda) on for tests."""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading

__all__ = ["cpu", "cuda", "has_cuda_kernels", "simulate_cuda"]

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


# The CUDA simulator module while simulate_cuda() is active in this thread (see pyrag.ops._common.kernels_for);
# other threads' CPU ops keep the CPU kernels. Its settings are process-wide, so one simulate_cuda() at a time.
_tls = threading.local()
_sim_lock = threading.Lock()
_sim_active = False
_SIM_ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


def current_sim():
    """The CUDA simulator module if this thread is inside simulate_cuda(), else None."""
    return getattr(_tls, "mod", None)


@contextlib.contextmanager
def simulate_cuda(order: str = "forward", seed: int = 0, sms: int = 4):
    """Inside the block, pyrag's ops on CPU tensors in this thread run the CUDA kernels' code through the CUDA
    simulator (csrc/sim/: every thread a fiber, blocks one after another) instead of the CPU kernels: the same host
    code, launches, shared memory and warp protocols as on a GPU, checked for deadlocks and shared-memory misuse.
    For testing CUDA code on machines without a GPU; slow (one core), so keep shapes small.

    order: how threads (and blocks) take turns between synchronisation points -- "forward", "reverse" or
    "shuffle" (seeded); a result that changes with it reveals a race. sms: the multiprocessor count the kernels
    plan their grids for (small values give few, long-running blocks; large ones many short blocks). seed: the
    shuffle's seed (order="shuffle"). Yields the simulator module (its sim_stats() counts launches per kernel)."""
    global _sim_active
    if order not in _SIM_ORDERS:
        raise ValueError(f"order must be one of {sorted(_SIM_ORDERS)}, got {order!r}")
    if not isinstance(sms, int) or isinstance(sms, bool) or not 1 <= sms <= 1 << 20:
        raise ValueError(f"sms must be an int in [1, 2**20], got {sms!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    try:
        mod = importlib.import_module("pyrag._C_cudasim")
    except ImportError as e:
        raise RuntimeError(
            "the CUDA simulator pyrag._C_cudasim was not built (it is built with pyrag._C_cuda, where CMake finds "
            "the CUDA toolkit)"
        ) from e
    with _sim_lock:
        if _sim_active:
            raise RuntimeError("simulate_cuda() is already active (its settings are process-wide)")
        mod.sim_configure(_SIM_ORDERS[order], seed, sms)
        _sim_active = True
    _tls.mod = mod
    try:
        yield mod
    finally:
        _tls.mod = None
        with _sim_lock:
            _sim_active = False
