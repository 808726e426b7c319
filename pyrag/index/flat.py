"""FlatIndex: exact maximum-inner-product search over stored vectors (fp32, fp16, bf16, or int8 with a per-row
scale) on the fused top-k kernel pyrag.ops.topk_ip; save/load in the checksummed container, memory-mappable."""

from __future__ import annotations

import torch

from ..ops.sketch import Sketch, make_sketch, quantize_int8  # quantize_int8 also re-exported from here
from ..ops.topk_ip import topk_ip
from . import _format
from ._util import (
    LabelMap,
    LockedPickle,
    RowBuffer,
    RWLock,
    check_dim,
    check_dtype,
    check_ids_arg,
    check_k,
    check_matrix,
    restore_rows,
    snapshot_rows,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


class FlatIndex(LockedPickle):  # LockedPickle: pickle / deepcopy
    """Exact inner-product index.

    Args:
        dim: vector dimension D.
        dtype: storage dtype, "float32" | "float16" | "bfloat16" | "int8" (symmetric per-row quantisation with an
            fp32 scale per row; scores are computed against the dequantised vectors q * scale).
        sketch: also keep an int8 sketch of the float vectors (N * (D + 12) bytes: +25% memory for float32, +50%
            for float16/bfloat16). CPU searches then read the sketch first (up to 12 queries; any number on CPUs
            with AMX), as do CUDA searches of up to 8 queries, and compute exact scores only where a rigorous error
            bound says a row could still make the top k: the same results bit for bit, a quarter (fp32) or half
            (fp16/bf16) of the bytes read (CPU: about 2.5x faster at 1 query on a 2-core machine, where search is
            bound by memory bandwidth; CUDA: not yet timed). The sketch moves with to(). Not for dtype="int8"
            (already compact).

    `add(embeddings [N, D], ids=None)` appends rows with int64 labels (default: continuing after the largest
    label so far, i.e. 0..N-1 for a fresh index); `search(queries [Q, D], k)` returns (scores [Q, k] fp32,
    ids [Q, k] int64 labels), best first, ties broken by the earlier-added row. Replaces the plain-torch
    `scores, rows = torch.topk(queries @ docs.T, k)` without building the [Q, N] score matrix.

    Thread safety: any number of threads may search concurrently; add() and to() wait for running searches
    and block new ones while they run (a readers-writer lock).
    """

    kind = "flat"

    def __init__(self, dim: int, dtype: str | torch.dtype = "float32", *, sketch: bool = False):
        self._dim = check_dim(dim)
        self.dtype = check_dtype(dtype, DTYPES)
        if not isinstance(sketch, bool):
            raise TypeError(f"sketch must be True or False, got {sketch!r}")
        if sketch and self.dtype == "int8":
            raise ValueError("sketch=True is for float storage; dtype='int8' is already stored as int8 codes")
        self._vectors = RowBuffer(torch.empty(0, self._dim, dtype=DTYPES[self.dtype]))
        self._scales = RowBuffer(torch.empty(0, dtype=torch.float32)) if self.dtype == "int8" else None
        # The sketch's four parts (codes [N, D] int8; scale, norm, res [N] fp32), appended with the vectors.
        self._sketch = (
            [RowBuffer(torch.empty(0, self._dim, dtype=torch.int8))]
            + [RowBuffer(torch.empty(0, dtype=torch.float32)) for _ in range(3)]
            if sketch else None
        )
        self._labels = LabelMap()
        self._lock = RWLock()
        self.extra_meta: dict = {}  # free-form JSON saved with the index (e.g. a shard's rank)

    # ---- properties ----
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return self._vectors.buf.device

    @property
    def sketch(self) -> bool:
        """Whether the index keeps an int8 sketch of its vectors (see the class docstring)."""
        return self._sketch is not None

    def __len__(self) -> int:
        return self._vectors.n

    def __repr__(self) -> str:
        sk = ", sketch=True" if self.sketch else ""
        return f"FlatIndex(dim={self._dim}, dtype={self.dtype!r}{sk}, len={len(self)}, device={self.device})"

    # ---- building ----
    def add(self, embeddings, ids=None) -> None:
        """Append embeddings [N, D] (tensor or ndarray; fp64/fp32/fp16/bf16, finite) with optional int64 labels
        ids [N] (distinct, not already present)."""
        x = check_matrix(embeddings, "embeddings", self._dim)
        with self._lock.write():
            labels = self._labels.prepare(ids, x.shape[0])
            x = x.to(self.device)
            if self.dtype == "int8":
                q, scale = quantize_int8(x)
                self._vectors.append(q)
                self._scales.append(scale)
            else:
                stored = x.to(DTYPES[self.dtype])
                if stored.numel() and not bool(torch.isfinite(stored).all()):  # finite input, beyond the dtype
                    wider = "; use dtype='float32' or 'bfloat16'" if self.dtype == "float16" else ""
                    raise ValueError(f"embeddings exceed the {self.dtype} range (max |x| = "
                                     f"{float(x.abs().max()):.4g}, stored as inf){wider}")
                parts = make_sketch(stored) if self._sketch is not None else ()  # may refuse: before any append
                self._vectors.append(stored)
                for buf, part in zip(self._sketch or [], parts):
                    buf.append(part)
            self._labels.append(labels, x.shape[0])

    def _snapshot(self):
        """What _rollback needs to undo the add()s that follow (ShardedIndex undoes a rank's successful add when
        another rank's failed): the row buffers' lengths and label map, all the state an add changes."""
        with self._lock.read():
            return snapshot_rows(self)

    def _rollback(self, snap) -> None:
        with self._lock.write():
            restore_rows(self, snap)

    def build_sketch(self) -> FlatIndex:
        """Add the int8 sketch (see the class docstring) to an index built or loaded without one -- e.g. a
        knowledge base's index: `kb.index.build_sketch()` -- and return self. Costs one pass over the vectors;
        a no-op if the index already has a sketch. save() then stores it with the vectors."""
        if self.dtype == "int8":
            raise ValueError("build_sketch() is for float storage; dtype='int8' is already stored as int8 codes")
        with self._lock.write():
            if self._sketch is None:
                self._sketch = [RowBuffer(t) for t in make_sketch(self._vectors.view())]  # on the vectors' device
        return self

    def to(self, device) -> FlatIndex:
        """Move the stored vectors, their scales, labels and sketch to `device` in place and return self; searches
        then run there (on CUDA with pyrag's CUDA kernel, which reads the sketch for up to 8 queries). On a GPU the
        sketch costs N * (D + 12) bytes of its memory (+50% for float16); build the index without one to save it."""
        device = torch.device(device)
        with self._lock.write():
            self._vectors.to(device)
            if self._scales is not None:
                self._scales.to(device)
            for buf in self._sketch or []:  # the CUDA kernel reads it too (up to 8 queries)
                buf.to(device)
            self._labels.to(device)
        return self

    # ---- querying ----
    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product: queries [Q, D] -> (scores [Q, k] fp32, ids [Q, k] int64), on the index's
        device, sorted by score descending (ties -> earlier row). ValueError when k > len(index) or the
        index is empty."""
        q = check_matrix(queries, "queries", self._dim)
        with self._lock.read():
            k = check_k(k, len(self))
            if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                q = q.to(torch.float32)
            q = q.to(self.device).contiguous()
            if q.shape[0] == 0:
                return (torch.empty(0, k, dtype=torch.float32, device=self.device),
                        torch.empty(0, k, dtype=torch.int64, device=self.device))
            docs = self._vectors.view()
            scale = self._scales.view() if self._scales is not None else None
            sketch = Sketch(*(b.view() for b in self._sketch)) if self._sketch is not None else None
            scores, rows = topk_ip(q, docs, k, doc_scale=scale, sketch=sketch)
            return scores, self._labels.to_labels(rows)

    def reconstruct(self, ids) -> torch.Tensor:
        """The stored vectors of labels `ids` (int tensor/ndarray/list of any shape S), dequantised:
        fp32 [*S, D] on the index's device. ValueError naming the first unknown id."""
        ids = check_ids_arg(ids, self.device)
        with self._lock.read():
            rows = self._labels.rows_of(ids).reshape(-1)
            v = self._vectors.view()[rows].to(torch.float32)
            if self._scales is not None:
                v = v * self._scales.view()[rows][:, None]
            return v.reshape(*ids.shape, self._dim)

    # ---- persistence ----
    def _sections(self) -> tuple[dict, int]:
        """The arrays to save and their row count, read together under the lock (a concurrent add() must not
        make the header's count disagree with the sections)."""
        with self._lock.read():
            sections = {"vectors": self._vectors.view()}
            if self._scales is not None:
                sections["scales"] = self._scales.view()
            if self._sketch is not None:
                for name, buf in zip(Sketch._fields, self._sketch):
                    sections["sketch_" + name] = buf.view()
            if not self._labels.identity:
                sections["labels"] = self._labels.labels()
            return sections, len(self)

    def save(self, path) -> None:
        """Write the index to `path` atomically (temporary file in the same directory, then os.replace)."""
        sections, count = self._sections()
        _format.save_container(path, kind=self.kind, dim=self._dim, dtype=self.dtype, count=count,
                               meta={"extra": self.extra_meta, "sketch": self.sketch}, sections=sections)

    @classmethod
    def load(cls, path, mmap: bool = True, *, verify: bool = True) -> FlatIndex:
        """Open an index saved by `save`. mmap=True maps the vectors from the file (copy-on-write: pages are read
        on demand, nothing is loaded up front, the file is never modified). verify=True first checks the payload
        CRC-32, which reads the whole file once; pass verify=False to skip that for a trusted file."""
        c = _format.load_container(path, kind=cls.kind, mmap=mmap, verify=verify)
        return cls._from_container(c)

    @classmethod
    def _from_container(cls, c: _format.Container) -> FlatIndex:
        if c.dtype not in DTYPES:
            raise ValueError(f"{c.path}: unknown storage dtype {c.dtype!r} in the header")
        sketch = c.meta.get("sketch", False)  # absent in files written before sketches existed
        if not isinstance(sketch, bool) or (sketch and c.dtype == "int8"):
            raise ValueError(f"{c.path}: invalid sketch={sketch!r} in the header meta for dtype={c.dtype}")
        self = cls(c.dim, c.dtype, sketch=sketch)
        vectors = c.section("vectors")
        if tuple(vectors.shape) != (c.count, c.dim) or vectors.dtype != DTYPES[c.dtype]:
            raise ValueError(f"{c.path}: vectors section {tuple(vectors.shape)} {vectors.dtype} does not match "
                             f"the header (count={c.count}, dim={c.dim}, dtype={c.dtype})")
        self._vectors = RowBuffer(vectors)
        if c.dtype == "int8":
            scales = c.section("scales")
            if tuple(scales.shape) != (c.count,):
                raise ValueError(f"{c.path}: scales section has shape {tuple(scales.shape)}, expected ({c.count},)")
            self._scales = RowBuffer(scales)
        if sketch:
            parts = []
            for name in Sketch._fields:
                t = c.section("sketch_" + name)
                want = (c.count, c.dim) if name == "codes" else (c.count,)
                dtype = torch.int8 if name == "codes" else torch.float32
                if tuple(t.shape) != want or t.dtype != dtype:
                    raise ValueError(f"{c.path}: sketch_{name} section is {t.dtype} {tuple(t.shape)}, expected "
                                     f"{dtype} {want}")
                parts.append(t)
            self._sketch = [RowBuffer(t) for t in parts]
        labels = c.section("labels") if c.has("labels") else None
        if labels is not None and tuple(labels.shape) != (c.count,):
            raise ValueError(f"{c.path}: labels section has shape {tuple(labels.shape)}, expected ({c.count},)")
        self._labels = LabelMap("cpu", labels, c.count)
        self.extra_meta = c.meta.get("extra", {})
        return self
