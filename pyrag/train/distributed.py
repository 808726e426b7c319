"""Data-parallel training over torch.distributed: what train_rag needs from the process group, in one place.

Gradients are averaged by hand (flattened buckets, one all-reduce per bucket, once per optimizer step) instead of
through torch's DistributedDataParallel wrapper: a RAG model's forward takes strings, retrieves from a frozen
knowledge base and returns a structured output, and gradient accumulation needs the reduction once per step, not
per micro-batch -- all of which a plain loop handles directly, with the same numbers as one process on the global
batch (a mean of per-rank means over equal shards)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_BUCKET_BYTES = 32 << 20  # gradients reduced per all-reduce call: few calls, bounded extra memory


@dataclass(frozen=True)
class Group:
    """A process group as train_rag sees it: this rank, the world size, and the device its collectives move
    tensors through (CUDA for NCCL, the CPU for gloo)."""

    rank: int
    size: int
    comm: torch.device
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_group(group=None) -> Group | None:
    """The initialised process group (the world by default) when it has more than one rank, else None."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size(group)
    if size < 2:
        return None
    comm = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
            else torch.device("cpu"))
    return Group(dist.get_rank(group), size, comm, group)


def init_from_env(device: str | None = None) -> torch.device | None:
    """For a process started by torchrun (WORLD_SIZE > 1 in the environment): joins the process group (NCCL when
    CUDA is used, gloo otherwise) and returns this rank's device (cuda:LOCAL_RANK unless `device` names one).
    Returns None when the environment asks for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    named = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if named is None else named.type == "cuda"
    if use_cuda:
        # a device named with its index ("cuda:1") is used as given; otherwise this rank's local GPU
        dev = named if named is not None and named.index is not None else torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dev


def broadcast_parameters(modules, g: Group) -> None:
    """Rank 0's parameters and buffers on every rank, so that all ranks start from the same model (one call per
    tensor: it runs once, at the start)."""
    with torch.no_grad():
        for m in modules:
            for t in (*m.parameters(), *m.buffers()):
                buf = t.detach().to(g.comm).contiguous()
                dist.broadcast(buf, 0, group=g.group)
                t.copy_(buf)


def _buckets(tensors):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= _BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def average_gradients(params, g: Group) -> None:
    """Every rank's .grad becomes the mean over the ranks. A parameter no rank produced a gradient for keeps
    grad None (AdamW then skips it, as one process would); one that only some ranks touched counts zeros for
    the others. Reduced in fp32 at least (fp64 where the gradient is fp64)."""
    params = list(params)
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=g.comm)
    dist.all_reduce(had, group=g.group)
    live = [p for p, h in zip(params, had.tolist()) if h > 0]
    for bucket in _buckets(live):
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in bucket) else torch.float32
        flat = torch.cat([(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device))
                          .to(g.comm, dtype) for p in bucket])
        dist.all_reduce(flat, group=g.group)
        flat /= g.size
        off = 0
        for p in bucket:
            n = p.numel()
            part = flat[off:off + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
            off += n


def sum_floats(values, g: Group) -> list[float]:
    """Elementwise sum over the ranks of a few Python floats (fp64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=g.comm)
    dist.all_reduce(t, group=g.group)
    return t.tolist()


def gather_objects(obj, g: Group) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects)."""
    out = [None] * g.size
    dist.all_gather_object(out, obj, group=g.group)
    return out


def barrier(g: Group) -> None:
    dist.barrier(group=g.group)
