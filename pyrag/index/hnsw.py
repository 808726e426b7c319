"""HNSWIndex: approximate maximum-inner-product search on an hnswlib graph, either an L2 graph made exact-order by
DPR's inner-product -> L2 augmentation or a raw inner-product graph; scores are exact fp32 inner products."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import numpy as np
import torch

from ..ops.topk_ip import topk_ip
from . import _format
from ._util import (
    LabelMap,
    LockedPickle,
    RowBuffer,
    RWLock,
    check_dim,
    check_ids_arg,
    check_k,
    check_matrix,
    restore_rows,
    snapshot_rows,
)

# The exact rescoring gathers the candidates' vectors, [queries, candidates, D] fp32; it runs in blocks of queries
# (and, for one query with very many candidates, of candidates) so that gather stays within this many bytes.
_RESCORE_BYTES = 32 << 20
# Where the graph search would fetch at least len/_EXACT_FRACTION candidates, exact search over the stored vectors
# (pyrag.topk_ip) is faster (measured 2-3.5x at len/16 .. len/8, 64 queries, N = 20k-100k) and never misses.
_EXACT_FRACTION = 8
_MIN_INSERT_CHUNK = 4096  # rows per hnswlib add_items call (at least; more for large batches): progress and rollback
_SIZE_T_MAX = 2**64 - 1  # hnswlib's integer parameters are C++ size_t
SPACES = ("augmented", "ip")


def _hnswlib():
    # Imported lazily: the GPU machine (and some users) have no hnswlib; FlatIndex must work without it.
    try:
        import hnswlib
    except ImportError as e:
        raise ImportError("HNSWIndex needs hnswlib: pip install hnswlib") from e
    return hnswlib


def _check_int(name: str, value, lo: int, hi: int = _SIZE_T_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if value > hi:
        raise ValueError(f"{name} must be an int <= {hi} (hnswlib takes a C++ size_t), got {value!r}")
    return int(value)


class HNSWIndex(LockedPickle):  # LockedPickle: pickle / deepcopy (hnswlib pickles its graph)
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
    query, that query is rescored over the (>= k) candidates found, with a UserWarning; where it cannot reach
    k points, the query gets an exact search over the stored vectors, with a UserWarning. Where max(k, ef_search)
    is at least len(index) / 8, every query gets that exact search (pyrag.topk_ip): faster than so wide a graph
    search, and exact. The rescoring's extra memory is bounded (32 MiB of gathered vectors at a time).

    The graph and the stored vectors live in CPU memory; `.to(device)` only chooses where results and
    reconstructed vectors are returned. Searches may run concurrently from several threads; add(), `ef_search`
    changes and to() wait for them.

    Args:
        dim: vector dimension D.
        M: graph degree (hnswlib M). ef_construction: build-time beam width. ef_search: query-time beam width
            (settable later through the `ef_search` attribute).
        space: "augmented" (DPR's L2 augmentation) or "ip" (raw inner-product graph); saved with the index.
        norm_headroom: phi = headroom * max |d|^2 of the first batch (>= 1); "augmented" only.
        seed: hnswlib's random seed for level assignment (an int in [0, 2**64 - 1], a C++ size_t).
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
                f"ef_search={self._ef_search}, space={self.space!r}, len={len(self)}, device={self._device})")

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
    def _augment(self, x: torch.Tensor, phi: float) -> np.ndarray:
        """x [N, D] fp32 -> [N, D+1] fp32 with the extra coordinate sqrt(phi - |x|^2) (fp64 arithmetic)."""
        norms2 = (x.double() ** 2).sum(dim=1)
        extra = torch.sqrt(torch.clamp(phi - norms2, min=0.0)).to(torch.float32)
        return torch.cat([x, extra[:, None]], dim=1).numpy()

    def _graph_points(self, x: torch.Tensor, phi: float | None) -> np.ndarray:
        """x [N, D] fp32 -> what the graph stores: [N, D+1] augmented with `phi`, or x itself for space="ip"."""
        return self._augment(x, phi) if self.space == "augmented" else x.numpy()

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

    def _insert(self, graph, x: torch.Tensor, first_row: int, phi: float | None, show_progress: bool) -> None:
        """Add rows x as graph labels first_row, first_row + 1, ... (a label already in the graph, deleted by a
        rolled-back add, is overwritten and comes back to life)."""
        need = graph.get_current_count() + x.shape[0]
        if need > graph.get_max_elements():
            graph.resize_index(max(need, 2 * graph.get_max_elements()))
        threads = max(1, torch.get_num_threads())
        step = max(_MIN_INSERT_CHUNK, x.shape[0] // 100)
        chunks = range(0, x.shape[0], step)
        if show_progress and x.shape[0] > step:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="hnsw add", unit="chunk")
        for i in chunks:
            part = x[i:i + step]
            graph.add_items(self._graph_points(part, phi), np.arange(first_row + i, first_row + i + part.shape[0]),
                            num_threads=threads)

    def add(self, embeddings, ids=None, *, show_progress: bool = True) -> None:
        """Append embeddings [N, D] (tensor or ndarray, finite floats) with optional distinct int64 labels ids [N]
        (default: continuing after the largest label so far).

        All or nothing for the rows: on any exception (KeyboardInterrupt included) len, labels, vectors and what a
        search can return are as they were. Not for the graph: hnswlib cannot remove points, so rows it had
        already taken stay in it, marked deleted (never returned), having rewired their neighbours' links, until a
        later add reuses their row numbers and overwrites them. Approximate results may therefore differ from
        before the failed add (every result is still a stored row with its exact score)."""
        x = check_matrix(embeddings, "embeddings", self._dim).to("cpu", torch.float32).contiguous()
        m = x.shape[0]
        if m == 0:
            return
        with self._lock.write():
            labels = self._labels.prepare(ids, m)
            snap = self._snapshot()
            try:
                self._add(x, labels, show_progress)
            except BaseException:
                self._restore(snap, snap[0] + m)
                raise

    def _add(self, x: torch.Tensor, labels: torch.Tensor | None, show_progress: bool) -> None:
        """add() under the write lock; the graph first, then the vectors and labels searches read with it."""
        n_old, m = len(self), x.shape[0]
        top = float((x.double() ** 2).sum(dim=1).max()) if self.space == "augmented" else 0.0
        if self.space == "augmented" and (self.phi is None or top > self.phi):
            rebuild = self.phi is not None
            if rebuild:
                warnings.warn(f"HNSWIndex.add: a vector with squared norm {top:.4g} exceeds the augmentation "
                              f"constant phi={self.phi:.4g} fixed by earlier batches; rebuilding the graph "
                              f"over all {n_old + m} vectors (pass norm_headroom > 1 to avoid this)", stacklevel=3)
            old = self._vectors.view()
            phi = max(top, float((old.double() ** 2).sum(dim=1).max()) if n_old else 0.0) * self.norm_headroom
            # A new graph over all vectors; the old one stays in use until it is complete, so that a failure
            # leaves the index as it was (at the cost of holding both graphs meanwhile).
            graph = self._new_graph(n_old + m)
            self._insert(graph, old, 0, phi, show_progress)
            self._insert(graph, x, n_old, phi, show_progress)
            self._graph, self.phi = graph, phi
            self.rebuilds += int(rebuild)
        else:
            if self._graph is None:
                self._graph = self._new_graph(m)
            self._insert(self._graph, x, n_old, self.phi, show_progress)
        self._vectors.append(x)
        self._labels.append(labels, m)

    def _snapshot(self) -> tuple:
        """What _restore needs to undo the adds that follow (for add() itself, and for ShardedIndex, which undoes
        a rank's successful add when another rank's failed)."""
        return (len(self), self._graph, self.phi, self.rebuilds, snapshot_rows(self))

    def _restore(self, snap: tuple, hi: int | None = None) -> None:
        """Return to the state `snap` was taken in; rows [snap's len, hi) (default: up to len(self)) are those
        the graph may have taken since. The caller holds the write lock."""
        n, graph, phi, rebuilds, rows = snap
        if self._graph is graph and graph is not None:
            for row in range(n, max(len(self), hi or 0)):
                # RuntimeError: never inserted (the add failed before it), or already deleted
                with contextlib.suppress(RuntimeError):
                    graph.mark_deleted(row)
        self._graph, self.phi, self.rebuilds = graph, phi, rebuilds
        restore_rows(self, rows)

    def _rollback(self, snap: tuple) -> None:
        """_restore under the write lock: undo every add() since `snap` was taken."""
        with self._lock.write():
            self._restore(snap)

    def to(self, device) -> HNSWIndex:
        """Return results and reconstructed vectors on `device` from now on (the graph stays on the CPU). Fails
        here, as FlatIndex.to does, where torch cannot use the device (e.g. "cuda" on a CPU-only build)."""
        device = torch.device(device)
        torch.empty(0, device=device)  # raises now rather than at the first search
        with self._lock.write():
            self._device = device
        return self

    # ---- querying ----
    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k by inner product: queries [Q, D] -> (scores [Q, k] fp32 exact inner products,
        ids [Q, k] int64 labels), best first (ties -> earlier row; NaN products rank as -inf, as in FlatIndex).
        ValueError when k > len(index) or the index is empty.

        Where the graph search would fetch max(k, ef_search) >= len(index) / 8 candidates, the result is an exact
        search over the stored vectors instead (faster at that width, and exact); so are queries for which the
        graph cannot reach k vectors at all (with a UserWarning)."""
        q = check_matrix(queries, "queries", self._dim).to("cpu", torch.float32).contiguous()
        with self._lock.read():
            n = len(self)
            k = check_k(k, n)
            nq = q.shape[0]
            if nq == 0:
                return (torch.empty(0, k, dtype=torch.float32, device=self._device),
                        torch.empty(0, k, dtype=torch.int64, device=self._device))
            docs = self._vectors.view()
            fetch = min(n, max(k, self._ef_search))
            if fetch * _EXACT_FRACTION >= n:
                scores, rows = topk_ip(q, docs, k)
            else:
                cand, exact = self._candidates(q.numpy(), k, fetch)
                scores, rows = self._rescore(q.numpy(), docs.numpy(), cand, k)
                if exact.any():
                    pick = torch.from_numpy(exact)
                    scores[pick], rows[pick] = topk_ip(q[pick], docs, k)
            ids = self._labels.to_labels(rows)
            return scores.to(self._device), ids.to(self._device)

    @staticmethod
    def _rescore(q: np.ndarray, docs: np.ndarray, cand: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact fp32 scores of the candidate rows cand [Q, C] (-1 pads) -> the best k (scores, rows) per query.

        In numpy (single-threaded: this step is small, and torch's OpenMP pool stalls on tiny ops when the cores
        are shared). Candidates are sorted by row with the pads last, so the stable sort by score breaks ties
        toward the lower row and a pad (scored -inf) never precedes a real row, even one whose score is -inf
        (each query has >= k real candidates)."""
        nq, c_all = cand.shape
        pad_row = docs.shape[0]
        cand = np.sort(np.where(cand < 0, pad_row, cand), axis=1)
        padded = bool(cand[:, -1].max() == pad_row)
        per_query = c_all * docs.shape[1] * 4  # bytes of one query's gathered candidate vectors
        q_step = max(1, _RESCORE_BYTES // per_query)
        c_step = c_all if per_query <= _RESCORE_BYTES else max(1, _RESCORE_BYTES // (docs.shape[1] * 4))
        scores = np.empty((nq, k), dtype=np.float32)
        rows = np.empty((nq, k), dtype=np.int64)
        for i in range(0, nq, q_step):
            c = cand[i:i + q_step]
            pad = c == pad_row
            if padded:
                c = np.where(pad, 0, c)
            s = np.empty(c.shape, dtype=np.float32)
            for j in range(0, c_all, c_step):
                s[:, j:j + c_step] = np.einsum("qkd,qd->qk", docs[c[:, j:j + c_step]], q[i:i + q_step])
            s[np.isnan(s) | pad] = -np.inf
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[i:i + q_step] = np.take_along_axis(s, order, axis=1)
            rows[i:i + q_step] = np.take_along_axis(c, order, axis=1)
        return torch.from_numpy(scores), torch.from_numpy(rows)

    def _candidates(self, q: np.ndarray, k: int, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Graph candidates [Q, fetch] int64 (rows; -1 pads where the graph yields fewer) for queries q [Q, D],
        and a mask [Q] of the queries the graph cannot give k candidates (to be searched exactly).

        hnswlib refuses a whole batch when any query reaches fewer than `fetch` vectors (a poorly connected
        graph: e.g. an inner-product graph on hub data reaches only ~100 of 20,000 points). Those queries are then
        retried one by one with fewer candidates (fetch/2, fetch/4, ..., k), with a warning."""
        threads = max(1, torch.get_num_threads())
        gq = self._graph_queries(q)
        exact = np.zeros(q.shape[0], dtype=bool)
        try:
            return self._graph.knn_query(gq, k=fetch, num_threads=threads)[0].astype(np.int64), exact
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
                except RuntimeError:
                    if want == k:
                        exact[i] = True
                        break
                    want = max(k, want // 2)
            short += want < fetch and not exact[i]
        if short:
            warnings.warn(f"HNSWIndex.search: the graph reached fewer than max(k, ef_search)={fetch} vectors for "
                          f"{short} of {q.shape[0]} queries; they were rescored over the (>= k) candidates it "
                          f"found, so their recall may be low: {self._connectivity_hint()}", stacklevel=3)
        if exact.any():
            warnings.warn(f"HNSWIndex.search: the graph reached fewer than k={k} of the {len(self)} vectors for "
                          f"{int(exact.sum())} of {q.shape[0]} queries; they were answered by exact search over "
                          f"all stored vectors (correct, but as slow as a FlatIndex): {self._connectivity_hint()}",
                          stacklevel=3)
        return cand, exact

    def _connectivity_hint(self) -> str:
        if self.space == "ip":
            return ("an inner-product graph is poorly linked where a few large-norm 'hub' vectors dominate the "
                    "inner products; space='augmented' avoids that (see the HNSWIndex docstring)")
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
            # graph_count: the graph's points, those of rolled-back adds (deleted) included
            meta = {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self._ef_search,
                    "space": self.space, "norm_headroom": self.norm_headroom, "seed": self.seed, "phi": self.phi,
                    "rebuilds": self.rebuilds, "extra": self.extra_meta,
                    "graph_count": self._graph.get_current_count() if self._graph is not None else 0}
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
            graph_count = m.get("graph_count", c.count)  # absent in files written before rollbacks existed
            if isinstance(graph_count, bool) or not isinstance(graph_count, int) or graph_count < c.count:
                raise ValueError(f"graph_count={graph_count!r} for {c.count} vectors")
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
                    g.load_index(tmp, max_elements=graph_count)
                except RuntimeError as e:
                    raise ValueError(f"{c.path}: hnswlib could not read the stored graph ({e})") from e
            finally:
                os.unlink(tmp)
            if g.get_current_count() != graph_count:
                raise ValueError(f"{c.path}: graph holds {g.get_current_count()} vectors, the metadata says "
                                 f"{graph_count} (for {c.count} rows)")
            g.set_ef(self._ef_search)
            self._graph = g
        return self
