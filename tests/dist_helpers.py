"""Multi-process test plumbing shared by the torch.distributed tests: a free TCP port for the rendezvous, and
spawning ranks with a deadline so that a hung collective fails the test instead of hanging the suite."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, args: tuple, nprocs: int, timeout: float, what: str) -> None:
    """mp.spawn(fn, args, nprocs), failing the test (after killing the ranks) if they take over `timeout` s."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {timeout:.0f} s (a collective hung?)")
