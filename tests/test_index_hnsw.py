"""HNSWIndex in both graph spaces ("augmented", "ip"): recall against brute force on non-normalised data (and
against raw hnswlib space="ip"), exact inner-product scores, labels, the growing-norm rebuild, save/load (the space
round-trips; old files load as "augmented"), thread safety and bad inputs."""

from __future__ import annotations

import threading
import warnings

import hnswlib  # a hard dependency on CPU: a broken install must fail here, not skip (not in the GPU machine's list)
import numpy as np
import pytest
import torch

from pyrag.index import HNSWIndex, _format, load_index


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
    hint = "space='augmented' avoids this" if space == "ip" else "raise M"
    with pytest.raises(ValueError, match=rf"fewer than k=31 neighbours for query \d+ .*{hint}"):
        index.search(q, 31)


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
    from pyrag.index import FlatIndex

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
