"""HNSWIndex: approximate maximum-inner-product search on an hnswlib graph, either an L2 graph made exact-order by
DPR's inner-product -> L2 augmentation or a raw inner-product graph; scores are exact fp32 inner products."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch

from . import _format
from ._util import LabelMap, RowBuffer, RWLock, check_dim, check_ids_arg, check_k, check_matrix

_RESCORE_CHUNK = 64  # queries rescored per step: bounds the [chunk, candidates, D] gather (~25 MB at D=768)
SPACES = ("augmented", "ip")


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
    """Graph index (hnswlib) for maximum inner product; two graph spaces, chosen by `space`.

    space="augmented" (default; DPR's method, Karpukhin et al., 2020): the graph is an exact L2 graph. Each stored
    vector d gets an extra coordinate sqrt(phi - |d|^2), with phi >= max |d|^2, and each query q gets 0, so
    |q' - d'|^2 = |q|^2 + phi - 2 q.d: L2 order equals inner-product order. phi is fixed by the first add() as
    max |d|^2 * norm_headroom. A later add() whose largest |d|^2 exceeds phi cannot be augmented consistently, so
    the graph is rebuilt from all stored vectors with a new phi (a full build; a UserWarning says so). Streams of
    batches avoid rebuilds with norm_headroom > 1 (e.g. 1.2), at a small recall cost.

    space="ip": hnswlib's own inner-product graph on the raw vectors (no extra coordinate, no phi, never a
    rebuild; norm_headroom is unused).

    Which to choose (recall@10 at M=32, ef_construction=200, benchmarks/results/hnsw.json): on ordinary
    embeddings "ip" is far better. The augmentation pushes every query far from all augmented points (the extra
    coordinate is large for most passages), which hurts graph navigation (Morozov & Babenko, NeurIPS 2018): on
    real MiniLM embeddings of SQuAD (not normalised) 0.467 augmented vs 0.988 ip at ef_search=32; on random
    vectors with log-normal norms 0.008 vs 0.969 at ef_search=128 (raw hnswlib with the same augmentation does
    no better). "augmented" wins only where a few large-norm "hub" vectors dominate the raw inner product without
    being any query's answer: there the ip graph links passages mainly to hubs and its search gets stuck (0.373
    vs 0.000 at ef_search=128 in the benchmark; tests/test_index_hnsw.py builds a 20k case where augmented
    reaches >= 0.95). With L2-normalised vectors both coincide with cosine search. build_kb uses "ip". Measure
    recall on a sample of your own queries (FlatIndex gives the truth) when in doubt.

    Results: the graph search collects max(k, ef_search) candidates; their inner products with the query are
    recomputed exactly in fp32 from the stored vectors and the best k returned (ties -> earlier row). So
    scores are true inner products (not L2 distances), and float32 rounding in the augmented distances
    cannot reorder the results. Where a poorly linked graph reaches fewer than max(k, ef_search) points for a
    query, that query is rescored over the (>= k) candidates found, with a UserWarning.

    The graph and the stored vectors live in CPU memory; `.to(device)` only chooses where results and
    reconstructed vectors are returned. Searches may run concurrently from several threads; add(), `ef_search`
    changes and to() wait for them.

    Args:
        dim: vector dimension D.
        M: graph degree (hnswlib M). ef_construction: build-time beam width. ef_search: query-time beam width
            (settable later through the `ef_search` attribute).
        space: "augmented" (DPR's L2 augmentation) or "ip" (raw inner-product graph); saved with the index.
        norm_headroom: phi = headroom * max |d|^2 of the first batch (>= 1); "augmented" only.
        seed: hnswlib's random seed for level assignment.
    """

    kind = "hnsw"

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef_search: int = 128, *,
                 space: str = "augmented", norm_headroom: float = 1.0, seed: int = 100):
        self._dim = check_dim(dim)
        if not isinstance(space, str) or space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.M = _check_int("M", M, 2)
        self.ef_construction = _check_int("ef_construction", ef_construction, 1)
        self._ef_search = _check_int("ef_search", ef_search, 1)
        if not isinstance(norm_headroom, (int, float)) or not norm_headroom >= 1.0 or norm_headroom == float("inf"):
            raise ValueError(f"norm_headroom must be a finite float >= 1, got {norm_headroom!r}")
        self.norm_headroom = float(norm_headroom)
        self.seed = _check_int("seed", seed, 0)
        self.phi: float | None = None  # the augmentation constant (set by the first add; None for space="ip")
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
                f"ef_search={self._ef_search}, space={self.space!r}, len={len(self)})")

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

    def _graph_points(self, x: torch.Tensor) -> np.ndarray:
        """x [N, D] fp32 -> what the graph stores: [N, D+1] augmented, or x itself for space="ip"."""
        return self._augment(x) if self.space == "augmented" else x.numpy()

    def _graph_queries(self, q: np.ndarray) -> np.ndarray:
        """q [Q, D] fp32 -> [Q, D+1] with a 0 extra coordinate (augmented), or q itself for space="ip"."""
        if self.space == "ip":
            return q
        return np.concatenate([q, np.zeros((q.shape[0], 1), dtype=np.float32)], axis=1)

    @staticmethod
    def _empty_graph(space: str, dim: int):
        if space == "ip":
            return _hnswlib().Index(space="ip", dim=dim)
        return _hnswlib().Index(space="l2", dim=dim + 1)

    def _new_graph(self, capacity: int):
        g = self._empty_graph(self.space, self._dim)
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
            self._graph.add_items(self._graph_points(part), np.arange(first_row + i, first_row + i + part.shape[0]),
                                  num_threads=threads)

    def add(self, embeddings, ids=None, *, show_progress: bool = True) -> None:
        """Append embeddings [N, D] (tensor or ndarray, finite floats) with optional distinct int64 labels ids [N]
        (default: continuing after the largest label so far)."""
        x = check_matrix(embeddings, "embeddings", self._dim).to("cpu", torch.float32).contiguous()
        if x.shape[0] == 0:
            return
        with self._lock.write():
            labels = self._labels.prepare(ids, x.shape[0])
            top = float((x.double() ** 2).sum(dim=1).max()) if self.space == "augmented" else 0.0
            n_old = len(self)
            if self.space == "augmented" and (self.phi is None or top > self.phi):
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
            cand = self._candidates(q, k, fetch)
            # Exact rescoring in numpy (single-threaded: this step is small, and torch's OpenMP pool stalls on
            # tiny ops when the cores are shared). Candidates sorted by row first, so the stable sort by score
            # breaks ties toward the lower row; -1 pads (queries that got fewer candidates) sort first and score
            # -inf, so they are never among the k returned.
            cand = np.sort(cand, axis=1)
            padded = bool(cand[:, 0].min() < 0)
            docs = self._vectors.view().numpy()
            scores = np.empty((nq, k), dtype=np.float32)
            rows = np.empty((nq, k), dtype=np.int64)
            for i in range(0, nq, _RESCORE_CHUNK):
                c = cand[i:i + _RESCORE_CHUNK]
                if padded:
                    pad = c < 0
                    c = np.where(pad, 0, c)
                s = np.einsum("qkd,qd->qk", docs[c], q[i:i + _RESCORE_CHUNK])
                if padded:
                    s[pad] = -np.inf
                order = np.argsort(-s, axis=1, kind="stable")[:, :k]
                scores[i:i + _RESCORE_CHUNK] = np.take_along_axis(s, order, axis=1)
                rows[i:i + _RESCORE_CHUNK] = np.take_along_axis(c, order, axis=1)
            ids = self._labels.to_labels(torch.from_numpy(rows))
            return torch.from_numpy(scores).to(self._device), ids.to(self._device)

    def _candidates(self, q: np.ndarray, k: int, fetch: int) -> np.ndarray:
        """Graph candidates [Q, fetch] int64 (rows) for queries q [Q, D]; -1 pads where the graph yields fewer.

        hnswlib refuses a whole batch when any query reaches fewer than `fetch` vectors (a poorly connected
        graph: e.g. an inner-product graph on hub data reaches only ~100 of 20,000 points). Those queries are then
        retried one by one with fewer candidates (fetch/2, fetch/4, ..., k), with a warning; a query that cannot
        get k is a ValueError."""
        threads = max(1, torch.get_num_threads())
        gq = self._graph_queries(q)
        try:
            return self._graph.knn_query(gq, k=fetch, num_threads=threads)[0].astype(np.int64)
        except RuntimeError:  # some query reached fewer than `fetch` points: retried one by one below
            pass
        cand = np.full((q.shape[0], fetch), -1, dtype=np.int64)
        short = 0
        for i in range(q.shape[0]):
            want = fetch
            while True:
                try:
                    cand[i, :want] = self._graph.knn_query(gq[i:i + 1], k=want, num_threads=1)[0]
                    break
                except RuntimeError as e:
                    if want == k:
                        raise ValueError(
                            f"hnswlib found fewer than k={k} neighbours for query {i} ({e}); the graph is poorly "
                            f"connected for this data: {self._connectivity_hint()}") from e
                    want = max(k, want // 2)
            short += want < fetch
        if short:
            warnings.warn(f"HNSWIndex.search: the graph reached fewer than max(k, ef_search)={fetch} vectors for "
                          f"{short} of {q.shape[0]} queries; they were rescored over the (>= k) candidates it "
                          f"found, so their recall may be low: {self._connectivity_hint()}", stacklevel=3)
        return cand

    def _connectivity_hint(self) -> str:
        if self.space == "ip":
            return ("large-norm 'hub' vectors mislead an inner-product graph; space='augmented' avoids this "
                    "(see the HNSWIndex docstring)")
        return f"raise M (now {self.M}) or ef_construction (now {self.ef_construction})"

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
                    "space": self.space, "norm_headroom": self.norm_headroom, "seed": self.seed, "phi": self.phi,
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
            # Files written before `space` existed hold DPR-augmented graphs.
            self = cls(c.dim, M=m["M"], ef_construction=m["ef_construction"], ef_search=m["ef_search"],
                       space=m.get("space", "augmented"), norm_headroom=m["norm_headroom"], seed=m["seed"])
            self.phi, self.rebuilds, self.extra_meta = m["phi"], m["rebuilds"], m.get("extra", {})
        except (KeyError, TypeError, ValueError) as e:
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
                g = self._empty_graph(self.space, c.dim)
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
