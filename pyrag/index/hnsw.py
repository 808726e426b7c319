"""HNSWIndex: approximate maximum-inner-product search on an hnswlib L2 graph, made exact-order by DPR's
inner-product -> L2 augmentation; reported scores are the true inner products recomputed from stored vectors."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch

from . import _format
from ._util import LabelMap, RowBuffer, RWLock, check_dim, check_ids_arg, check_k, check_matrix

_RESCORE_CHUNK = 64  # queries rescored per step: bounds the [chunk, candidates, D] gather (~25 MB at D=768)


def _hnswlib():
    # Imported lazily: the GPU machine (and some users) have no hnswlib; FlatIndex must work without it.
    try:
        import hnswlib
    except ImportError as e:
        raise ImportError("HNSWIndex needs hnswlib: pip install hnswlib") from e
    return hnswlib


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


class HNSWIndex:
    """Graph index (hnswlib) for maximum inner product, with DPR's augmentation.

    Inner-product search is not a metric search: a vector with a large norm can be the best match of almost every
    query while being nobody's near neighbour, and graphs built on raw inner products navigate poorly on data whose
    norms vary. DPR (Karpukhin et al., 2020) maps it to exact L2 search: each stored vector d gets an extra
    coordinate sqrt(phi - |d|^2), with phi >= max |d|^2, and each query q gets 0, so
    |q' - d'|^2 = |q|^2 + phi - 2 q.d: L2 order equals inner-product order.

    phi is fixed by the first add() as max |d|^2 * norm_headroom. A later add() whose largest |d|^2 exceeds phi
    cannot be augmented consistently, so the graph is rebuilt from all stored vectors with a new phi (a full
    build; a UserWarning says so). Streams of batches avoid rebuilds with norm_headroom > 1 (e.g. 1.2), at a
    small recall cost: the extra coordinate then carries less of the norm information.

    Results: the graph search collects max(k, ef_search) candidates; their inner products with the query are
    recomputed exactly in fp32 from the stored vectors and the best k returned (ties -> earlier row). So
    scores are true inner products (not L2 distances), and float32 rounding in the augmented distances
    cannot reorder the results.

    The graph and the stored vectors live in CPU memory; `.to(device)` only chooses where results and
    reconstructed vectors are returned. Searches may run concurrently from several threads; add(), `ef_search`
    changes and to() wait for them.

    Args:
        dim: vector dimension D.
        M: graph degree (hnswlib M). ef_construction: build-time beam width. ef_search: query-time beam width
            (settable later through the `ef_search` attribute).
        norm_headroom: phi = headroom * max |d|^2 of the first batch (>= 1).
        seed: hnswlib's random seed for level assignment.
    """

    kind = "hnsw"

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef_search: int = 128, *,
                 norm_headroom: float = 1.0, seed: int = 100):
        self._dim = check_dim(dim)
        self.M = _check_int("M", M, 2)
        self.ef_construction = _check_int("ef_construction", ef_construction, 1)
        self._ef_search = _check_int("ef_search", ef_search, 1)
        if not isinstance(norm_headroom, (int, float)) or not norm_headroom >= 1.0 or norm_headroom == float("inf"):
            raise ValueError(f"norm_headroom must be a finite float >= 1, got {norm_headroom!r}")
        self.norm_headroom = float(norm_headroom)
        self.seed = _check_int("seed", seed, 0)
        self.phi: float | None = None  # the augmentation constant (set by the first add)
        self.rebuilds = 0  # how many times a larger-norm batch forced a rebuild
        self.extra_meta: dict = {}
        self._vectors = RowBuffer(torch.empty(0, self._dim, dtype=torch.float32))
        self._labels = LabelMap()
        self._graph = None
        self._device = torch.device("cpu")
        self._lock = RWLock()

    # ---- properties ----
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return self._vectors.n

    def __repr__(self) -> str:
        return (f"HNSWIndex(dim={self._dim}, M={self.M}, ef_construction={self.ef_construction}, "
                f"ef_search={self._ef_search}, len={len(self)})")

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        value = _check_int("ef_search", value, 1)
        with self._lock.write():
            self._ef_search = value
            if self._graph is not None:
                self._graph.set_ef(value)

    # ---- building ----
    def _augment(self, x: torch.Tensor) -> np.ndarray:
        """x [N, D] fp32 -> [N, D+1] fp32 with the extra coordinate sqrt(phi - |x|^2) (fp64 arithmetic)."""
        norms2 = (x.double() ** 2).sum(dim=1)
        extra = torch.sqrt(torch.clamp(self.phi - norms2, min=0.0)).to(torch.float32)
        return torch.cat([x, extra[:, None]], dim=1).numpy()

    def _new_graph(self, capacity: int):
        g = _hnswlib().Index(space="l2", dim=self._dim + 1)
        g.init_index(max_elements=max(capacity, 1), M=self.M, ef_construction=self.ef_construction,
                     random_seed=self.seed)
        g.set_ef(self._ef_search)
        return g

    def _insert(self, x: torch.Tensor, first_row: int, show_progress: bool) -> None:
        need = first_row + x.shape[0]
        if self._graph is None:
            self._graph = self._new_graph(need)
        elif need > self._graph.get_max_elements():
            self._graph.resize_index(max(need, 2 * self._graph.get_max_elements()))
        threads = max(1, torch.get_num_threads())
        step = max(4096, x.shape[0] // 100)
        chunks = range(0, x.shape[0], step)
        if show_progress and x.shape[0] > step:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="hnsw add", unit="chunk")
        for i in chunks:
            part = x[i:i + step]
            self._graph.add_items(self._augment(part), np.arange(first_row + i, first_row + i + part.shape[0]),
                                  num_threads=threads)

    def add(self, embeddings, ids=None, *, show_progress: bool = True) -> None:
        """Append embeddings [N, D] (tensor or ndarray, finite floats) with optional distinct int64 labels ids [N]
        (default: continuing after the largest label so far)."""
        x = check_matrix(embeddings, "embeddings", self._dim).to("cpu", torch.float32).contiguous()
        if x.shape[0] == 0:
            return
        with self._lock.write():
            labels = self._labels.prepare(ids, x.shape[0])
            top = float((x.double() ** 2).sum(dim=1).max())
            n_old = len(self)
            if self.phi is None or top > self.phi:
                if self.phi is not None:
                    warnings.warn(f"HNSWIndex.add: a vector with squared norm {top:.4g} exceeds the augmentation "
                                  f"constant phi={self.phi:.4g} fixed by earlier batches; rebuilding the graph "
                                  f"over all {n_old + x.shape[0]} vectors (pass norm_headroom > 1 to avoid this)",
                                  stacklevel=2)
                    self.rebuilds += 1
                old = self._vectors.view()
                self.phi = max(top, float((old.double() ** 2).sum(dim=1).max()) if n_old else 0.0)
                self.phi *= self.norm_headroom
                self._graph = None
                self._vectors.append(x)
                self._insert(self._vectors.view(), 0, show_progress)
            else:
                self._vectors.append(x)
                self._insert(x, n_old, show_progress)
            self._labels.append(labels, x.shape[0])

    def to(self, device) -> HNSWIndex:
        """Return results and reconstructed vectors on `device` from now on (the graph stays on the CPU)."""
        device = torch.device(device)
        with self._lock.write():
            self._device = device
        return self

    # ---- querying ----
    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k by inner product: queries [Q, D] -> (scores [Q, k] fp32 exact inner products,
        ids [Q, k] int64 labels), best first. ValueError when k > len(index) or the index is empty."""
        q = check_matrix(queries, "queries", self._dim).to("cpu", torch.float32).contiguous().numpy()
        with self._lock.read():
            n = len(self)
            k = check_k(k, n)
            nq = q.shape[0]
            if nq == 0:
                return (torch.empty(0, k, dtype=torch.float32, device=self._device),
                        torch.empty(0, k, dtype=torch.int64, device=self._device))
            fetch = min(n, max(k, self._ef_search))
            aug = np.concatenate([q, np.zeros((nq, 1), dtype=np.float32)], axis=1)
            threads = max(1, torch.get_num_threads())
            try:
                cand, _ = self._graph.knn_query(aug, k=fetch, num_threads=threads)
            except RuntimeError as e:
                # hnswlib cannot fill `fetch` results when ef is too small for a sparse/disconnected graph.
                raise ValueError(f"hnswlib found fewer than {fetch} neighbours ({e}); raise ef_search "
                                 f"(now {self._ef_search}) or M") from e
            # Exact rescoring in numpy (single-threaded: this step is small, and torch's OpenMP pool stalls on
            # tiny ops when the cores are shared). Candidates sorted by row first, so the stable sort by score
            # breaks ties toward the lower row.
            cand = np.sort(cand.astype(np.int64), axis=1)
            docs = self._vectors.view().numpy()
            scores = np.empty((nq, k), dtype=np.float32)
            rows = np.empty((nq, k), dtype=np.int64)
            for i in range(0, nq, _RESCORE_CHUNK):
                c = cand[i:i + _RESCORE_CHUNK]
                s = np.einsum("qkd,qd->qk", docs[c], q[i:i + _RESCORE_CHUNK])
                order = np.argsort(-s, axis=1, kind="stable")[:, :k]
                scores[i:i + _RESCORE_CHUNK] = np.take_along_axis(s, order, axis=1)
                rows[i:i + _RESCORE_CHUNK] = np.take_along_axis(c, order, axis=1)
            ids = self._labels.to_labels(torch.from_numpy(rows))
            return torch.from_numpy(scores).to(self._device), ids.to(self._device)

    def reconstruct(self, ids) -> torch.Tensor:
        """The stored vectors (fp32) of labels `ids` of any shape S -> [*S, D] on the index's device;
        ValueError naming the first unknown id."""
        ids = check_ids_arg(ids, "cpu")
        with self._lock.read():
            rows = self._labels.rows_of(ids).reshape(-1)
            return self._vectors.view()[rows].reshape(*ids.shape, self._dim).to(self._device)

    # ---- persistence ----
    def save(self, path) -> None:
        """Write vectors, labels and hnswlib's own graph file (save_index) into one checksummed container,
        atomically (temporary file in the same directory, then os.replace)."""
        path = os.fspath(path)
        with self._lock.read():
            sections = {"vectors": self._vectors.view()}
            if not self._labels.identity:
                sections["labels"] = self._labels.labels()
            if self._graph is not None:
                d = os.path.dirname(os.path.abspath(path))
                os.makedirs(d, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".hnsw-graph.", suffix=".tmp", dir=d)
                os.close(fd)
                try:
                    self._graph.save_index(tmp)
                    with open(tmp, "rb") as f:
                        graph = bytearray(f.read())
                finally:
                    os.unlink(tmp)
                sections["graph"] = torch.frombuffer(graph, dtype=torch.int8) if graph else torch.empty(
                    0, dtype=torch.int8)
            meta = {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self._ef_search,
                    "norm_headroom": self.norm_headroom, "seed": self.seed, "phi": self.phi,
                    "rebuilds": self.rebuilds, "extra": self.extra_meta}
            _format.save_container(path, kind=self.kind, dim=self._dim, dtype="float32", count=len(self),
                                   meta=meta, sections=sections)

    @classmethod
    def load(cls, path, mmap: bool = True, *, verify: bool = True) -> HNSWIndex:
        """Open an index saved by `save`. mmap=True maps the stored vectors from the file; the graph is always
        read into memory (hnswlib loads it from a temporary copy). verify checks the payload CRC-32 first
        (one read of the file)."""
        c = _format.load_container(path, kind=cls.kind, mmap=mmap, verify=verify)
        return cls._from_container(c)

    @classmethod
    def _from_container(cls, c: _format.Container) -> HNSWIndex:
        m = c.meta
        try:
            self = cls(c.dim, M=m["M"], ef_construction=m["ef_construction"], ef_search=m["ef_search"],
                       norm_headroom=m["norm_headroom"], seed=m["seed"])
            self.phi, self.rebuilds, self.extra_meta = m["phi"], m["rebuilds"], m.get("extra", {})
        except (KeyError, TypeError) as e:
            raise ValueError(f"{c.path}: HNSW index metadata is incomplete or malformed ({e!r})") from e
        vectors = c.section("vectors")
        if tuple(vectors.shape) != (c.count, c.dim) or vectors.dtype != torch.float32:
            raise ValueError(f"{c.path}: vectors section {tuple(vectors.shape)} does not match the header "
                             f"(count={c.count}, dim={c.dim})")
        labels = c.section("labels") if c.has("labels") else None
        if labels is not None and tuple(labels.shape) != (c.count,):
            raise ValueError(f"{c.path}: labels section has shape {tuple(labels.shape)}, expected ({c.count},)")
        self._vectors = RowBuffer(vectors)
        self._labels = LabelMap("cpu", labels, c.count)
        if c.count:
            if not c.has("graph"):
                raise ValueError(f"{c.path}: HNSW index with {c.count} vectors has no graph section")
            fd, tmp = tempfile.mkstemp(prefix=".hnsw-graph.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(c.raw_bytes("graph"))
                g = _hnswlib().Index(space="l2", dim=c.dim + 1)
                try:
                    g.load_index(tmp, max_elements=c.count)
                except RuntimeError as e:
                    raise ValueError(f"{c.path}: hnswlib could not read the stored graph ({e})") from e
            finally:
                os.unlink(tmp)
            if g.get_current_count() != c.count:
                raise ValueError(f"{c.path}: graph holds {g.get_current_count()} vectors, header says {c.count}")
            g.set_ef(self._ef_search)
            self._graph = g
        return self
