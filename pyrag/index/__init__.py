"""Passage indexes for maximum-inner-product search: FlatIndex (exact, on pyrag's fused top-k kernel),
HNSWIndex (hnswlib with DPR's inner-product -> L2 augmentation), ShardedIndex (over torch.distributed ranks),
and load_index, which opens any saved index by the kind recorded in its header."""

from __future__ import annotations

from . import _format
from .flat import FlatIndex
from .hnsw import HNSWIndex
from .sharded import ShardedIndex

_KINDS = {FlatIndex.kind: FlatIndex, HNSWIndex.kind: HNSWIndex}


def load_index(path, mmap: bool = True, *, verify: bool = True):
    """Open the index saved at `path` (FlatIndex or HNSWIndex, chosen by the file header).

    mmap maps stored vectors from the file instead of reading them; verify checks the payload CRC-32 first
    (one sequential read of the file). ValueError naming the path for a truncated, corrupted, foreign or
    unsupported file."""
    from pathlib import Path

    if Path(path).is_dir():  # ShardedIndex.save writes a directory of per-rank files, loaded collectively
        raise ValueError(f"{str(path)!r} is a directory, not an index file; a ShardedIndex directory is opened on "
                         f"every rank with ShardedIndex.load(path)")
    c = _format.load_container(path, mmap=mmap, verify=verify)
    if c.kind not in _KINDS:
        raise ValueError(f"{path}: unknown index kind {c.kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[c.kind]._from_container(c)


__all__ = ["FlatIndex", "HNSWIndex", "ShardedIndex", "load_index"]
