"""Pieces the index classes share: input checks with clear errors, a growable row buffer, the row<->label map,
and a readers-writer lock (many concurrent searches, one exclusive add)."""

from __future__ import annotations

import threading

import numpy as np
import torch

FLOAT_INPUT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def as_tensor(x, name: str, lists_ok: bool = False) -> torch.Tensor:
    """A torch view of a tensor or numpy array (no copy); anything else is a TypeError naming `name` (lists_ok: the
    caller takes lists itself, so the message offers them)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "u" and x.size and x.dtype.itemsize == 8 and int(x.max()) >= 2 ** 63:
            raise ValueError(f"{name} holds {int(x.max())}, beyond the int64 range pyrag stores labels in")
        if x.dtype == np.float64 or x.dtype == np.float32 or x.dtype == np.float16 or x.dtype.kind in "iu":
            return torch.from_numpy(np.ascontiguousarray(x))
        raise TypeError(f"{name} must hold numbers (floats for vectors, integers for ids), got a numpy array of "
                        f"dtype {x.dtype}")
    kinds = "a torch.Tensor, numpy.ndarray or list" if lists_ok else "a torch.Tensor or numpy.ndarray"
    raise TypeError(f"{name} must be {kinds}, got {type(x).__name__}")


def check_matrix(x, name: str, dim: int) -> torch.Tensor:
    """x as a finite floating tensor of shape [N, dim] (dtype and device unchanged)."""
    x = as_tensor(x, name)
    if x.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [N, {dim}] for this index (dim={dim}), got shape {tuple(x.shape)}")
    if x.numel() and not _all_finite(x):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero()[0, 0].item()
        raise ValueError(f"{name} contains NaN or infinite values (first in row {bad}); refusing to index/search them")
    if x.dtype == torch.float64 and x.numel():  # every index computes in float32: these would become inf
        big = x.abs() > torch.finfo(torch.float32).max
        if bool(big.any()):
            r, c = (int(i) for i in big.nonzero()[0])
            raise ValueError(f"{name} exceed the float32 range every index computes in (first {name}[{r}, {c}] = "
                             f"{x[r, c].item():g})")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    # numpy on CPU: single-threaded, so a small check cannot stall in torch's OpenMP pool when cores are busy
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return bool(np.isfinite(x.numpy()).all())
    return bool(torch.isfinite(x).all())


def check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    k = int(k)
    if n == 0:
        raise ValueError("cannot search an empty index: add() some vectors first")
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, len(index)] = [1, {n}], got {k=}")
    return k


def check_labels(ids, n: int, name: str = "ids") -> torch.Tensor:
    """ids as a CPU int64 vector of length n, all distinct."""
    ids = as_tensor(ids, name, lists_ok=True) if not isinstance(ids, (list, tuple)) else torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise TypeError(f"{name} must be integer labels, got {ids.dtype=}")
    ids = ids.to("cpu", torch.int64)
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"{name} must be a vector with one label per embedding ({n}), got {tuple(ids.shape)=}")
    if n > 1:
        s = torch.sort(ids).values
        dup = (s[1:] == s[:-1]).nonzero()
        if dup.numel():
            raise ValueError(f"{name} contains duplicate label {s[dup[0, 0]].item()}")
    return ids


def check_dtype(dtype, allowed: dict) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in allowed.items()}
        if dtype in names:
            return names[dtype]
    elif isinstance(dtype, str) and dtype in allowed:
        return dtype
    raise ValueError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}")


def check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


class RowBuffer:
    """Rows appended in amortised O(1): a tensor with spare capacity along dim 0; `view()` is the filled part.

    Appending never writes into rows a previous `view()` exposed, so a reader holding an old view stays valid
    while a writer appends (the writer either fills spare rows beyond it or moves to a new, larger tensor)."""

    def __init__(self, data: torch.Tensor):
        self.buf = data
        self.n = data.shape[0]

    def view(self) -> torch.Tensor:
        return self.buf[: self.n]

    def append(self, rows: torch.Tensor) -> None:
        m = rows.shape[0]
        if self.n + m > self.buf.shape[0]:
            cap = max(self.n + m, 2 * self.buf.shape[0], 1024)
            new = torch.empty((cap, *self.buf.shape[1:]), dtype=self.buf.dtype, device=self.buf.device)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n: self.n + m] = rows.to(self.buf.device, self.buf.dtype)
        self.n += m

    def to(self, device) -> None:
        self.buf = self.view().to(device)

    def compact(self) -> torch.Tensor:
        """The filled rows as their own tensor (for saving)."""
        return self.view()


class LabelMap:
    """Row number <-> user label (int64). Stores nothing while labels are the rows themselves (0..n-1), the
    common case; otherwise one int64 per row plus a sorted copy built lazily for label->row look-ups."""

    def __init__(self, device="cpu", labels: torch.Tensor | None = None, n: int = 0):
        self.n = n
        self.device = torch.device(device)
        self._labels = None if labels is None else RowBuffer(labels.to(self.device))
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None
        self._max = (n - 1) if labels is None else (int(labels.max()) if labels.numel() else -1)

    @property
    def identity(self) -> bool:
        return self._labels is None

    def next_default(self) -> int:
        return self._max + 1

    def labels(self) -> torch.Tensor:
        """All labels, [n] int64 on the index device."""
        if self._labels is None:
            return torch.arange(self.n, dtype=torch.int64, device=self.device)
        return self._labels.view()

    def prepare(self, ids: torch.Tensor | None, m: int) -> torch.Tensor | None:
        """Validate the labels for m new rows (None = continue after the largest label) and return them (CPU
        int64), or None when the rows keep label == row. Raises ValueError on a label already present."""
        if ids is None:
            if self.identity and self._max + 1 == self.n:
                return None
            return torch.arange(self._max + 1, self._max + 1 + m, dtype=torch.int64)
        ids = check_labels(ids, m)
        if m and self.n:
            present = self.contains(ids.to(self.device)).cpu()
            if bool(present.any()):
                raise ValueError(f"ids contains label {ids[present.nonzero()[0, 0]].item()}, "
                                 f"which is already in the index")
        if self.identity and m and bool((ids == torch.arange(self.n, self.n + m)).all()):
            return None
        return ids

    def append(self, ids: torch.Tensor | None, m: int) -> None:
        if ids is not None and self._labels is None:
            self._labels = RowBuffer(torch.arange(self.n, dtype=torch.int64, device=self.device))
        if self._labels is not None:
            self._labels.append(ids if ids is not None else torch.arange(self.n, self.n + m, dtype=torch.int64))
        if m:
            self._max = max(self._max, self.n + m - 1 if ids is None else int(ids.max()))
        self.n += m
        self._sorted = None

    def to(self, device) -> None:
        self.device = torch.device(device)
        if self._labels is not None:
            self._labels.to(self.device)
        self._sorted = None

    def _sorted_pair(self):
        if self._sorted is None:
            s, order = torch.sort(self._labels.view())
            self._sorted = (s, order)
        return self._sorted

    def _find(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, found) for int64 labels of any shape on self.device."""
        if self._labels is None:
            found = (labels >= 0) & (labels < self.n)
            return torch.where(found, labels, torch.zeros_like(labels)), found
        s, order = self._sorted_pair()
        if s.numel() == 0:
            return torch.zeros_like(labels), torch.zeros_like(labels, dtype=torch.bool)
        pos = torch.searchsorted(s, labels.reshape(-1)).clamp_(max=s.numel() - 1).reshape(labels.shape)
        found = s[pos] == labels
        return order[pos], found

    def contains(self, labels: torch.Tensor) -> torch.Tensor:
        return self._find(labels)[1]

    def rows_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Row numbers of int64 labels of any shape; ValueError naming the first unknown label."""
        rows, found = self._find(labels)
        if not bool(found.all()):
            missing = labels[~found]
            raise ValueError(f"id {missing.reshape(-1)[0].item()} is not in the index "
                             f"({missing.numel()} unknown id(s) of {labels.numel()} requested)")
        return rows

    def to_labels(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self._labels is None else self._labels.view()[rows]


def _int64_scalar(i) -> torch.Tensor:
    if not -(2 ** 63) <= int(i) < 2 ** 63:
        raise ValueError(f"ids must be int64 labels, got {int(i)} (out of the int64 range)")
    return torch.tensor(int(i))


def check_ids_arg(ids, device) -> torch.Tensor:
    """reconstruct()'s ids: int / list / ndarray / tensor of integers, any shape -> int64 tensor on device."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)):
        ids = _int64_scalar(ids)
    elif isinstance(ids, (list, tuple)):
        # torch.as_tensor(..., dtype=int64) would truncate 1.7 to 1 and read True as 1: infer, then check the kind
        ids = torch.as_tensor(ids) if len(ids) else torch.empty(0, dtype=torch.int64)
    else:
        ids = as_tensor(ids, "ids", lists_ok=True)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise TypeError(f"ids must be integer labels, got {ids.dtype=}")
    return ids.to(device, torch.int64)


class RWLock:
    """Readers-writer lock: any number of concurrent readers (searches) or one writer (add / to / ef change).
    Writer-preferring: once a writer waits, new readers queue behind it, so a stream of searches cannot starve
    an add()."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def read(self):
        return _Guard(self._acquire_read, self._release_read)

    def write(self):
        return _Guard(self._acquire_write, self._release_write)

    def _acquire_read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def _acquire_write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def _release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Guard:
    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self):
        self._acquire()
        return self

    def __exit__(self, *exc):
        self._release()
        return False


def snapshot_rows(index) -> list:
    """The row storage of an index (its RowBuffer, LabelMap and list-of-RowBuffer attributes), to put back with
    restore_rows after a failed add. A buffer's state is its tensor and length: restoring them makes the rows
    appended since free again, and no view of those rows outlives the write lock the rollback takes (searches and
    reconstruct return copies). Used by FlatIndex and HNSWIndex (their _snapshot / _rollback, which ShardedIndex calls)."""
    saved = []
    for name, v in vars(index).items():
        parts = v if isinstance(v, list) and v and all(isinstance(b, RowBuffer) for b in v) else [v]
        if not all(isinstance(b, (RowBuffer, LabelMap)) for b in parts):
            continue
        state = [(b, dict(vars(b))) for b in parts]
        state += [(b._labels, dict(vars(b._labels))) for b in parts
                  if isinstance(b, LabelMap) and b._labels is not None]
        saved.append((name, v, state))
    return saved


def restore_rows(index, saved: list) -> None:
    for name, v, state in saved:
        setattr(index, name, v)
        for obj, d in state:
            vars(obj).clear()
            vars(obj).update(d)


class LockedPickle:
    """Pickle / copy.deepcopy for the indexes (spawn-based multiprocessing, joblib, Ray): their attributes without
    the RWLock `_lock`, read under it, each RowBuffer / LabelMap cut to its filled rows (not the spare capacity);
    the copy gets a fresh lock. An mmap-loaded index pickles its data, not the file."""

    def __getstate__(self) -> dict:
        def compact(v):
            if isinstance(v, RowBuffer):
                return RowBuffer(v.view().clone())
            if isinstance(v, LabelMap):
                return LabelMap(v.device, None if v.identity else v.labels().clone(), v.n)
            if isinstance(v, list) and v and all(isinstance(b, RowBuffer) for b in v):
                return [compact(b) for b in v]
            return v

        with self._lock.read():
            return {k: compact(v) for k, v in vars(self).items() if not isinstance(v, RWLock)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = RWLock()
