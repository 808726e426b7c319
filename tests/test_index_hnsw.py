"""HNSWIndex in both graph spaces ("augmented", "ip"): recall against brute force on non-normalised data (and
against raw hnswlib space="ip"), exact inner-product scores, labels, the growing-norm rebuild, save/load (the space
round-trips; old files load as "augmented"), thread safety, all-or-nothing add() under injected failures, exact
search where k or ef_search is a large fraction of the index, bounded rescoring memory, and bad inputs."""

from __future__ import annotations

import threading
import warnings

import hnswlib  # a hard dependency on CPU: a broken install must fail here, not skip (not in the GPU machine's list)
import numpy as np
import pytest
import torch

from pyrag.index import FlatIndex, HNSWIndex, _format, load_index
from pyrag.index import hnsw as hnsw_module


def recall_at_k(got: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, true)]))


def brute_force_ids(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def anisotropic_with_hubs(n=20_000, d=32, n_clusters=50, hub_fraction=0.01, nq=500, seed=0):
    """Non-normalised embeddings shaped like real sentence embeddings: every passage shares a common direction
    u (dimension 0; real encoders are anisotropic), topics are clusters in the other dimensions, norms vary
    log-normally, and 1% of the vectors are "hubs": long vectors along u (boilerplate / very generic passages).
    Questions have no u component, so their true top-10 are topical passages, never hubs.

    Why a raw inner-product graph breaks here: hnswlib's space="ip" uses 1 - x.y as the "distance", which is
    not a metric (a hub is "closer" to every passage than the passage is to itself). When a passage is inserted,
    hnswlib's neighbour heuristic keeps a candidate only if it is closer to the new passage than to the
    neighbours already kept; once a hub is kept, 1 - c.hub is hugely negative for every candidate c, so nearly
    all candidates are dropped. Passages end up linked mainly to hubs and hubs to hubs, and a greedy search that
    starts among the hubs (which have ~0 inner product with every question) has nowhere better to go.
    The augmented L2 graph is a proper metric graph on the same points, so its search is not misled."""
    rng = np.random.default_rng(seed)
    n_hubs = int(n * hub_fraction)
    centres = np.zeros((n_clusters, d))
    centres[:, 1:] = rng.normal(size=(n_clusters, d - 1))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = centres[rng.integers(0, n_clusters, n - n_hubs)] + 0.5 * rng.normal(size=(n - n_hubs, d)) / np.sqrt(d)
    topic[:, 0] = 1.0
    topic *= np.exp(rng.normal(0, 0.3, (n - n_hubs, 1)))
    hubs = 0.3 * rng.normal(size=(n_hubs, d)) / np.sqrt(d)
    hubs[:, 0] = 15 * np.exp(rng.normal(0, 0.2, n_hubs))
    x = np.concatenate([hubs, topic])[rng.permutation(n)]
    q = centres[rng.integers(0, n_clusters, nq)] + 0.5 * rng.normal(size=(nq, d)) / np.sqrt(d)
    q[:, 0] = 0.0
    return x.astype(np.float32), q.astype(np.float32)


def test_hnsw_recall_beats_raw_inner_product_graph_on_non_normalised_embeddings():
    x, q = anisotropic_with_hubs()
    norms = np.linalg.norm(x, axis=1)
    assert norms.max() / np.median(norms) > 8  # really non-normalised
    M, ef_c, ef, k = 32, 200, 128, 10
    true = brute_force_ids(q, x, k)

    index = HNSWIndex(x.shape[1], M=M, ef_construction=ef_c, ef_search=ef)
    index.add(x, show_progress=False)
    scores, ids = index.search(q, k)
    ours = recall_at_k(ids.numpy(), true)

    raw = hnswlib.Index(space="ip", dim=x.shape[1])
    raw.init_index(max_elements=len(x), M=M, ef_construction=ef_c, random_seed=100)
    raw.add_items(x, np.arange(len(x)), num_threads=max(1, torch.get_num_threads()))
    raw.set_ef(ef)
    raw_recall = recall_at_k(raw.knn_query(q, k=k)[0], true)

    ip_index = HNSWIndex(x.shape[1], M=M, ef_construction=ef_c, ef_search=ef, space="ip")
    ip_index.add(x, show_progress=False)
    # the ip graph is so badly linked here that its search reaches fewer than ef_search points: a warning, and
    # those queries are rescored over what it found
    with pytest.warns(UserWarning, match="graph reached fewer than max"):
        ip_scores, ip_ids = ip_index.search(q, k)
    ours_ip = recall_at_k(ip_ids.numpy(), true)
    assert all(len(set(row)) == k for row in ip_ids.tolist())
    ip_exact = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, ip_ids.numpy(), axis=1)
    np.testing.assert_allclose(ip_scores.numpy(), ip_exact, rtol=1e-5, atol=1e-5)

    msg = (f"recall@10: HNSWIndex (DPR augmentation) {ours:.3f}, raw hnswlib space='ip' {raw_recall:.3f}, "
           f"HNSWIndex(space='ip') {ours_ip:.3f}")
    assert ours >= 0.95, msg
    assert raw_recall <= ours - 0.2, msg
    assert ours_ip <= ours - 0.2, msg  # exact rescoring of ef candidates cannot rescue a misled graph
    # reported scores are the true inner products of the returned ids
    exact = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, ids.numpy(), axis=1)
    np.testing.assert_allclose(scores.numpy(), exact, rtol=1e-5, atol=1e-5)


def lognormal_norms(n=3000, d=32, nq=200, seed=0):
    """Isotropic Gaussian directions with log-normal norms (sigma 0.5): non-normalised but without hubs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(rng.normal(0, 0.5, (n, 1)))
    return x.astype(np.float32), rng.standard_normal((nq, d)).astype(np.float32)


def test_hnsw_ip_space_beats_augmentation_on_random_lognormal_norms():
    # The opposite case (Morozov & Babenko, 2018): with no hubs, the augmentation puts every query far from all
    # augmented points and the L2 graph search gets lost, while the raw inner-product graph navigates well.
    x, q = lognormal_norms()
    true = brute_force_ids(q, x, 10)
    got = {}
    for space in ("ip", "augmented"):
        index = HNSWIndex(x.shape[1], M=16, ef_construction=100, ef_search=64, space=space)
        index.add(x, show_progress=False)
        scores, ids = index.search(q, 10)
        got[space] = recall_at_k(ids.numpy(), true)
        exact = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, ids.numpy(), axis=1)
        np.testing.assert_allclose(scores.numpy(), exact, rtol=1e-5, atol=1e-5)  # true inner products, both spaces
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert index.space == "augmented" and index.phi is not None
    msg = f"recall@10: space='ip' {got['ip']:.3f}, space='augmented' {got['augmented']:.3f}"
    assert got["ip"] >= 0.95, msg
    assert got["augmented"] <= got["ip"] - 0.3, msg


def test_hnsw_ip_space_stores_raw_vectors_and_never_rebuilds():
    x = torch.from_numpy(lognormal_norms(1500, 16)[0])
    big = torch.from_numpy(lognormal_norms(300, 16, seed=1)[0]) * 3  # larger norms: "augmented" would rebuild
    index = HNSWIndex(16, M=16, ef_construction=100, ef_search=64, space="ip")
    index.add(x, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.add(big, ids=torch.arange(5000, 5300), show_progress=False)
    assert index.phi is None and index.rebuilds == 0 and "space='ip'" in repr(index)
    everything = torch.cat([x, big])
    graph = torch.from_numpy(np.asarray(index._graph.get_items(list(range(len(everything))))))
    assert graph.shape == (1800, 16)  # no extra coordinate
    torch.testing.assert_close(graph, everything)
    q = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    _, ids = index.search(q, 10)
    rows = torch.where(ids >= 5000, ids - 5000 + 1500, ids)
    assert recall_at_k(rows.numpy(), brute_force_ids(q.numpy(), everything.numpy(), 10)) >= 0.95
    assert torch.equal(index.reconstruct(torch.tensor([0, 5299])), everything[[0, 1799]])


class _ShortGraph:
    """Wraps an hnswlib index so that queries with q[0] > 0 reach only `limit` points, like a poorly connected
    graph: hnswlib then refuses the whole batch (RuntimeError) when k > limit, as the real library does."""

    def __init__(self, graph, limit: int):
        self.graph, self.limit = graph, limit

    def knn_query(self, q, k, num_threads=1):
        if k > self.limit and bool((q[:, 0] > 0).any()):
            raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
        return self.graph.knn_query(q, k=k, num_threads=num_threads)


@pytest.mark.parametrize("space", ["augmented", "ip"])
def test_hnsw_search_degrades_gracefully_when_the_graph_reaches_fewer_than_ef(space):
    x, q = _small(1000), _small(40, seed=1)
    index = HNSWIndex(16, M=12, ef_construction=60, ef_search=100, space=space)
    index.add(x, show_progress=False)
    full_scores, full_ids = index.search(q, 10)
    index._graph = _ShortGraph(index._graph, limit=30)
    short = q[:, 0] > 0
    assert 0 < int(short.sum()) < len(q)
    with pytest.warns(UserWarning, match=rf"fewer than max\(k, ef_search\)=100 vectors for {int(short.sum())} of 40"):
        scores, ids = index.search(q, 10)
    # full-candidate queries are unchanged; short ones get k distinct ids with exact scores, best first
    assert torch.equal(ids[~short], full_ids[~short]) and torch.equal(scores[~short], full_scores[~short])
    assert all(len(set(row)) == 10 for row in ids.tolist())
    torch.testing.assert_close(scores, torch.einsum("qd,qkd->qk", q, index.reconstruct(ids)), rtol=1e-5, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    # a query the graph cannot give k candidates at all is answered by exact search over the stored vectors
    hint = "space='augmented' avoids that" if space == "ip" else "raise M"
    with pytest.warns(UserWarning, match=rf"fewer than k=31 of the 1000 vectors for {int(short.sum())} of 40 "
                                         rf"queries; they were answered by exact search .*{hint}"):
        scores, ids = index.search(q, 31)
    exact = FlatIndex(16)
    exact.add(x)
    es, ei = exact.search(q[short], 31)
    assert torch.equal(ids[short], ei) and torch.equal(scores[short], es)


def _small(n=2000, d=16, seed=0):
    """Clustered vectors with norms varying by a factor of 3 (the functional tests' data)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g)
    x = centres[torch.randint(0, 20, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return x * (0.5 + torch.rand(n, 1, generator=g))


def test_hnsw_scores_are_exact_inner_products_sorted_with_labels():
    x, q = _small(), _small(20, seed=1)
    labels = torch.randperm(10**6)[:2000] - 500_000
    index = HNSWIndex(16, ef_construction=100)
    index.add(x, ids=labels, show_progress=False)
    scores, ids = index.search(q, 10)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and scores.shape == (20, 10)
    order = torch.argsort(labels)
    rows = order[torch.searchsorted(labels[order], ids)]  # label -> row in x
    vecs = index.reconstruct(ids)  # [20, 10, 16]
    assert torch.equal(vecs, x[rows])
    assert torch.allclose(scores, torch.einsum("qd,qkd->qk", q, vecs), rtol=1e-5, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    true = brute_force_ids(q.numpy(), x.numpy(), 10)
    assert recall_at_k(rows.numpy(), true) >= 0.95
    assert torch.equal(index.reconstruct(labels[:3]), x[:3])
    with pytest.raises(ValueError, match="is not in the index"):
        index.reconstruct(torch.tensor([10**7]))


def test_hnsw_tiny_index_and_k_equal_to_len():
    x = torch.randn(5, 4)
    index = HNSWIndex(4, M=4, ef_construction=10, ef_search=2)
    index.add(x, show_progress=False)
    scores, ids = index.search(x, 5)  # k = len > ef_search: all five, exactly ordered
    expected = torch.sort(x @ x.T, dim=1, descending=True, stable=True)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(scores, expected.values)


# One thread: hnswlib's threaded inserts make the graph (and this recall, 0.910-0.948 over 200 builds against 0.9)
# vary run to run; a single-threaded build with the fixed seed gives one graph (0.918) every time.
@pytest.mark.usefixtures("one_thread")
def test_hnsw_larger_norm_batch_rebuilds_the_graph():
    x = _small(2000)
    big = _small(300, seed=2) * 1.6  # larger norms than the first batch
    index = HNSWIndex(16, ef_construction=100, ef_search=200)
    index.add(x, show_progress=False)
    phi = index.phi
    assert phi == pytest.approx(float((x.double() ** 2).sum(1).max()))
    index.add(x[:100] * 0.5, show_progress=False)  # smaller norms fit under phi: no rebuild
    assert index.phi == phi and index.rebuilds == 0
    with pytest.warns(UserWarning, match="rebuilding the graph"):
        index.add(big, show_progress=False)
    everything = torch.cat([x, x[:100] * 0.5, big])
    norms2 = (everything.double() ** 2).sum(1)
    assert index.rebuilds == 1 and index.phi == pytest.approx(float(norms2.max()))
    # every stored point, old ones included, is re-augmented with the new phi: L2 order = inner-product order
    graph = torch.from_numpy(np.asarray(index._graph.get_items(list(range(len(everything))))))
    torch.testing.assert_close(graph[:, :16], everything)
    torch.testing.assert_close(graph[:, 16].double(), torch.sqrt(index.phi - norms2), rtol=1e-5, atol=1e-3)
    q = _small(50, seed=3)
    _, ids = index.search(q, 10)
    assert recall_at_k(ids.numpy(), brute_force_ids(q.numpy(), everything.numpy(), 10)) >= 0.9
    assert torch.equal(index.reconstruct(torch.arange(len(everything))), everything)


def test_hnsw_norm_headroom_avoids_rebuilds():
    x = _small(800)
    index = HNSWIndex(16, ef_construction=100, norm_headroom=1.5)
    index.add(x, show_progress=False)
    index.add(x[:50] * 1.2, show_progress=False)  # 1.44x the squared norm: fits in the headroom
    assert index.rebuilds == 0
    q = _small(30, seed=1)
    _, ids = index.search(q, 10)
    everything = torch.cat([x, x[:50] * 1.2])
    assert recall_at_k(ids.numpy(), brute_force_ids(q.numpy(), everything.numpy(), 10)) >= 0.95


@pytest.mark.parametrize("mmap", [True, False])
def test_hnsw_save_load_gives_identical_results(tmp_path, mmap):
    x, q = _small(1000), _small(15, seed=1)
    labels = torch.arange(1000) * 3 + 11
    index = HNSWIndex(16, M=12, ef_construction=60, ef_search=40)
    index.add(x, ids=labels, show_progress=False)
    path = tmp_path / "h.idx"
    index.save(path)
    loaded = HNSWIndex.load(path, mmap=mmap)
    assert (loaded.M, loaded.ef_construction, loaded.ef_search, loaded.phi) == (12, 60, 40, index.phi)
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.reconstruct(labels[5:9]), x[5:9])
    via = load_index(path)
    assert isinstance(via, HNSWIndex) and len(via) == 1000
    loaded.add(torch.randn(10, 16), show_progress=False)  # a loaded index keeps growing
    assert len(loaded) == 1010 and loaded.search(q, 3)[1].shape == (15, 3)
    assert len(HNSWIndex.load(path)) == 1000  # ... without touching the file
    # corruption is refused
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"h.idx: index file is corrupted"):
        HNSWIndex.load(path)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        load_index(path)


def test_hnsw_ip_space_round_trips_through_save_load(tmp_path):
    x, q = _small(1000), _small(15, seed=1)
    index = HNSWIndex(16, M=12, ef_construction=60, ef_search=40, space="ip")
    index.add(x, show_progress=False)
    path = tmp_path / "ip.idx"
    index.save(path)
    for loaded in (HNSWIndex.load(path), load_index(path)):
        assert loaded.space == "ip" and loaded.phi is None and loaded._graph.space == "ip"
        for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
            assert torch.equal(a, b)
    loaded.add(x[:10] * 5, show_progress=False)  # grows in the ip space, no rebuild
    assert len(loaded) == 1010 and loaded.rebuilds == 0


def test_hnsw_file_without_space_loads_as_augmented(tmp_path):
    # Files written before the `space` option existed: same container, no "space" key in the metadata.
    x, q = _small(500), _small(10, seed=1)
    index = HNSWIndex(16, M=12, ef_construction=60, ef_search=40)
    index.add(x, show_progress=False)
    path = tmp_path / "new.idx"
    index.save(path)
    c = _format.load_container(path, kind="hnsw", mmap=False)
    assert c.meta["space"] == "augmented"
    meta = {key: v for key, v in c.meta.items() if key != "space"}
    sections = {name: c.section(name) for name in ("vectors", "labels", "graph") if c.has(name)}
    assert "graph" in sections
    old = tmp_path / "old.idx"
    _format.save_container(old, kind="hnsw", dim=c.dim, dtype=c.dtype, count=c.count, meta=meta, sections=sections)
    loaded = HNSWIndex.load(old)
    assert loaded.space == "augmented" and loaded.phi == index.phi and loaded._graph.space == "l2"
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        assert torch.equal(a, b)
    # a bad space in the file is refused with the file's name
    meta["space"] = "cosine"
    _format.save_container(old, kind="hnsw", dim=c.dim, dtype=c.dtype, count=c.count, meta=meta, sections=sections)
    with pytest.raises(ValueError, match=r"old.idx: HNSW index metadata .*'cosine'"):
        HNSWIndex.load(old)


def test_hnsw_empty_round_trip_and_errors(tmp_path):
    index = HNSWIndex(8)
    with pytest.raises(ValueError, match="empty index"):
        index.search(torch.randn(1, 8), 1)
    index.save(tmp_path / "e.idx")
    assert len(HNSWIndex.load(tmp_path / "e.idx")) == 0
    index.add(torch.randn(30, 8), show_progress=False)
    with pytest.raises(ValueError, match=r"got k=31"):
        index.search(torch.randn(1, 8), 31)
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        index.search(torch.randn(2, 9), 1)
    bad = torch.randn(2, 8)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(bad)
    with pytest.raises(ValueError, match="ef_search must be an int >= 1"):
        index.ef_search = 0
    with pytest.raises(ValueError, match="M must be an int"):
        HNSWIndex(8, M=1)
    with pytest.raises(ValueError, match="norm_headroom"):
        HNSWIndex(8, norm_headroom=0.5)
    for bad_space in ("cosine", "IP", "l2", None):
        with pytest.raises(ValueError, match=rf"space must be one of \('augmented', 'ip'\), got {bad_space!r}"):
            HNSWIndex(8, space=bad_space)
    index.ef_search = 7
    assert index.ef_search == 7 and index.search(torch.randn(2, 8), 3)[0].shape == (2, 3)
    assert index.to("cpu") is index


def test_hnsw_concurrent_searches_from_threads_are_correct():
    x = _small(3000)
    index = HNSWIndex(16, M=16, ef_construction=80, ef_search=64)
    index.add(x, show_progress=False)
    batches = [torch.randn(3 + t, 16) for t in range(6)]
    expected = [index.search(b, 10) for b in batches]
    errors, results = [], {}

    def worker(t):
        try:
            for rep in range(5):
                results[t, rep] = index.search(batches[t], 10)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    index.ef_search = 64  # a writer in the middle (same value, so results stay comparable)
    for th in threads:
        th.join()
    assert not errors, errors
    for (t, _), (s, i) in results.items():
        assert torch.equal(s, expected[t][0]) and torch.equal(i, expected[t][1])


def test_kind_mismatch_between_flat_and_hnsw_files_is_refused(tmp_path):
    flat = FlatIndex(12)
    flat.add(torch.randn(20, 12))
    fpath = tmp_path / "flat.idx"
    flat.save(fpath)
    hnsw = HNSWIndex(12, M=8, ef_construction=20)
    hnsw.add(torch.randn(30, 12), show_progress=False)
    hpath = tmp_path / "graph.idx"
    hnsw.save(hpath)
    with pytest.raises(ValueError, match=r"graph.idx: holds a 'hnsw' index, not a 'flat' index"):
        FlatIndex.load(hpath)
    with pytest.raises(ValueError, match=r"flat.idx: holds a 'flat' index, not a 'hnsw' index"):
        HNSWIndex.load(fpath)
    assert isinstance(load_index(hpath), HNSWIndex) and isinstance(load_index(fpath), FlatIndex)


# ---- add() is all or nothing ----
class _Faults:
    """Wraps every graph HNSWIndex creates; the `countdown`-th add_items call from now inserts the first half of
    its rows into the real graph, then raises `exc` (as an hnswlib error mid-chunk, or a Ctrl-C, would)."""

    def __init__(self, monkeypatch):
        self.countdown, self.exc, self.graphs = None, None, []
        make = HNSWIndex._new_graph

        def new_graph(index, capacity):
            self.graphs.append(_FaultyGraph(make(index, capacity), self))
            return self.graphs[-1]

        monkeypatch.setattr(HNSWIndex, "_new_graph", new_graph)
        monkeypatch.setattr(hnsw_module, "_MIN_INSERT_CHUNK", 100)  # several chunks per test-sized add

    def arm(self, countdown: int, exc: BaseException) -> None:
        self.countdown, self.exc = countdown, exc


class _FaultyGraph:
    def __init__(self, graph, faults: _Faults):
        self.graph, self.faults = graph, faults

    def add_items(self, data, labels, num_threads=1):
        f = self.faults
        if f.countdown is not None:
            f.countdown -= 1
            if f.countdown == 0:
                f.countdown = None
                half = len(labels) // 2
                self.graph.add_items(data[:half], labels[:half], num_threads=num_threads)
                raise f.exc
        self.graph.add_items(data, labels, num_threads=num_threads)

    def __getattr__(self, name):
        return getattr(self.graph, name)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("hnswlib: out of memory")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("case", ["ip", "augmented", "augmented-rebuild", "ip-first-add"])
def test_hnsw_add_failing_mid_graph_insert_leaves_the_index_as_it_was(monkeypatch, tmp_path, case, exc):
    faults = _Faults(monkeypatch)
    space = case.split("-")[0]
    x, q = _small(600), _small(20, seed=1)
    batch = _small(450, seed=2) * (2.0 if case == "augmented-rebuild" else 0.5)  # 5 chunks of 100 rows (+ rest)
    ids = torch.arange(450) + 10_000
    index = HNSWIndex(16, M=8, ef_construction=40, ef_search=20, space=space)
    if case != "ip-first-add":
        index.add(x, show_progress=False)
    graph, phi, n = index._graph, index.phi, len(index)
    if case == "augmented":
        assert float((batch.double() ** 2).sum(1).max()) <= phi  # no rebuild
    faults.arm(2 if case != "augmented-rebuild" else 8, exc)  # the rebuild first re-inserts the 600 old rows
    with pytest.raises(type(exc)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rebuild's warning
        index.add(batch, ids=ids, show_progress=False)
    assert faults.countdown is None  # the fault fired
    assert len(index) == index._labels.n == n and index._graph is graph and index.phi == phi
    assert index.rebuilds == 0
    if case == "ip-first-add":
        assert graph is None
        with pytest.raises(ValueError, match="empty index"):
            index.search(q, 1)
    else:
        # what the graph had taken is deleted: searches return only the old rows, with their true scores
        scores, got = index.search(q, 10)
        assert int(got.max()) < n
        torch.testing.assert_close(scores, torch.einsum("qd,qkd->qk", q, index.reconstruct(got)))
        with pytest.raises(ValueError, match="id 10000 is not in the index"):
            index.reconstruct([10_000])
        index.save(tmp_path / "after-failure.idx")  # the deleted points travel with the graph
        assert len(HNSWIndex.load(tmp_path / "after-failure.idx")) == n
    # the same add again (same ids: none of them was kept) succeeds and the index is whole
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index.add(batch, ids=ids, show_progress=False)
    everything = torch.cat([x[:n], batch])
    labels = torch.cat([torch.arange(n), ids])
    assert len(index) == n + 450 and torch.equal(index.reconstruct(labels), everything)
    exact = FlatIndex(16)
    exact.add(everything, ids=labels)
    # hnswlib inserts from several threads, so the graph (and its recall) varies run to run: at ef_search=20 a
    # freshly built 450-row ip index ranged 0.89-0.97 recall@10 over 40 builds, at 40 it ranged 0.96-0.98; the
    # wider beam keeps this a check of the index's wholeness, not of the draw (still a graph search: 40 < len/8)
    index.ef_search = 40
    for k in (10, len(index)):  # graph search, and the exact search k = len takes
        scores, got = index.search(q, k)
        torch.testing.assert_close(scores, torch.einsum("qd,qkd->qk", q, index.reconstruct(got)))
        true = exact.search(q, k)[1]
        assert recall_at_k(got.numpy(), true.numpy()) >= (0.9 if space == "ip" else 0.5)
    assert torch.equal(index.search(q, len(index))[1], exact.search(q, len(index))[1])
    index.save(tmp_path / "h.idx")
    loaded = HNSWIndex.load(tmp_path / "h.idx")
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        assert torch.equal(a, b)


def test_hnsw_rollback_undoes_a_successful_add():
    # what ShardedIndex uses when another rank's add failed
    x, more, q = _small(500), _small(300, seed=2), _small(10, seed=1)
    for space in ("ip", "augmented"):
        index = HNSWIndex(16, M=8, ef_construction=40, ef_search=20, space=space)
        index.add(x, show_progress=False)
        before = index.search(q, 10)
        snap = index._snapshot()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index.add(more * 3, ids=torch.arange(300) + 900, show_progress=False)  # "augmented": a rebuild
        index._rollback(snap)
        assert len(index) == 500 and index.rebuilds == 0
        after = index.search(q, 10)
        assert int(after[1].max()) < 500
        if space == "augmented":  # the old graph itself is back
            assert torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index.add(more, ids=torch.arange(300) + 900, show_progress=False)
        assert torch.equal(index.reconstruct([900, 1199]), more[[0, 299]])


# ---- search ----
def test_hnsw_search_with_k_close_to_len_is_exact_on_lognormal_ip_data():
    # an inner-product graph on ordinary data does not reach every point; k = len used to raise "fewer than k"
    x, q = lognormal_norms(3000, 32, nq=20)
    index = HNSWIndex(32, space="ip")
    index.add(x, show_progress=False)
    exact = FlatIndex(32)
    exact.add(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in (len(x), len(x) // 2, len(x) // 8):
            s, i = index.search(q, k)
            es, ei = exact.search(q, k)
            assert torch.equal(i, ei) and torch.equal(s, es), k


def test_hnsw_rescoring_in_blocks_gives_the_same_results_within_its_memory_bound(monkeypatch):
    import tracemalloc

    x, q = _small(3000, d=64), _small(64, d=64, seed=1)
    index = HNSWIndex(64, M=8, ef_construction=40, ef_search=16)
    index.add(x, show_progress=False)
    k = 300  # graph path (8 * 300 < 3000); the old one-step gather was 64 * 300 * 64 * 4 B = 4.9 MB
    reference = index.search(q, k)
    for budget in (1 << 20, 64 * 4 * 7):  # blocks of queries; blocks of 7 candidates of one query
        monkeypatch.setattr(hnsw_module, "_RESCORE_BYTES", budget)
        tracemalloc.start()
        got = index.search(q, k)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
        # the gather's budget, plus [Q, C] candidates and scores and [Q, k] results (~0.7 MB here)
        assert peak < budget + 1.5e6, (budget, peak)


class _FixedCandidates:
    """A graph stub that reaches only the rows `reach` (hnswlib refuses any larger k, as with a poor graph)."""

    def __init__(self, reach):
        self.reach = np.array([reach], dtype=np.uint64)

    def knn_query(self, q, k, num_threads=1):
        if k > self.reach.shape[1]:
            raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
        return np.repeat(self.reach[:, :k], len(q), axis=0), np.zeros((len(q), k), dtype=np.float32)


def test_hnsw_rescoring_ranks_nan_products_as_minus_inf_and_never_returns_padding():
    x = _small(100, d=2)
    x[[2, 5, 7]] = torch.tensor([1e30, -1e30])  # q . d = inf - inf = NaN against q below
    index = HNSWIndex(2, M=4, ef_construction=10, ef_search=10, space="ip")
    index.add(x, show_progress=False)
    index._graph = _FixedCandidates([7, 2, 5])  # the graph finds only the NaN rows: the rest is padding
    with pytest.warns(UserWarning, match="rescored over the"):
        scores, ids = index.search(torch.tensor([[1e30, 1e30]]), 3)
    assert ids.tolist() == [[2, 5, 7]]  # ties (-inf) -> lower row, as FlatIndex; no pad (row 0) among them
    assert scores.tolist() == [[float("-inf")] * 3]


# ---- arguments ----
def test_hnsw_seed_and_sizes_outside_size_t_are_refused_up_front():
    for seed in (2**64, -1, 10**30):
        with pytest.raises(ValueError, match=rf"seed must be an int (>= 0|<= {2**64 - 1}).*got {seed}"):
            HNSWIndex(8, seed=seed)
    with pytest.raises(ValueError, match="ef_search must be an int <= "):
        HNSWIndex(8, ef_search=2**64)
    index = HNSWIndex(8, seed=np.uint64(2**64 - 1), M=4, ef_construction=10)
    index.add(torch.randn(20, 8), show_progress=False)
    assert index.search(torch.randn(1, 8), 3)[1].shape == (1, 3)


def test_hnsw_refuses_float64_beyond_float32_before_casting():
    index = HNSWIndex(4, M=4, ef_construction=10)
    index.add(torch.randn(10, 4), show_progress=False)
    big = torch.randn(3, 4, dtype=torch.float64)
    big[1, 2] = 1e39
    for call in (lambda: index.add(big, show_progress=False), lambda: index.search(big, 2),
                 lambda: index.add(big.numpy(), show_progress=False)):
        with pytest.raises(ValueError, match=r"float32 range.*\[1, 2\] = 1e\+39"):
            call()
    assert len(index) == 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_hnsw_to_an_unusable_device_fails_at_once_like_flat_index():
    with pytest.raises(Exception) as flat_error:  # whatever torch raises for FlatIndex
        FlatIndex(4).to("cuda")
    index = HNSWIndex(4, M=4, ef_construction=10)
    index.add(torch.randn(10, 4), show_progress=False)
    with pytest.raises(type(flat_error.value)):
        index.to("cuda")
    assert index.device == torch.device("cpu") and "device=cpu" in repr(index)
    assert index.search(torch.randn(1, 4), 2)[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hnsw_results_on_cuda_after_to():
    index = HNSWIndex(4, M=4, ef_construction=10).to("cuda")
    index.add(torch.randn(100, 4), show_progress=False)
    scores, ids = index.search(torch.randn(2, 4), 3)
    assert scores.is_cuda and ids.is_cuda and "device=cuda" in repr(index)


@pytest.mark.parametrize("space", ["ip", "augmented"])
def test_hnsw_index_pickles_and_deep_copies(space):
    import copy
    import pickle

    g = torch.Generator().manual_seed(0)
    index = HNSWIndex(8, space=space, ef_search=16)
    index.add(torch.randn(3000, 8, generator=g), ids=torch.arange(3000) * 2 + 1)
    q = torch.randn(5, 8, generator=g)
    want = index.search(q, 10)
    for other in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        assert repr(other) == repr(index)
        got = other.search(q, 10)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        other.add(torch.randn(3, 8, generator=g))  # independent, with a working lock
        assert len(other) == 3003 and len(index) == 3000
