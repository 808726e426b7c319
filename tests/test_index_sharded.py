"""ShardedIndex: two CPU processes over gloo must return exactly what one FlatIndex over all passages returns
(ties included, -inf and NaN scores too), for per-rank and shared queries, int8 storage, custom labels,
reconstruct, save/load, and must raise on every rank (never hang) when one rank's input is bad or its local add or
search fails -- leaving every rank's index as it was."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port, spawn_ranks

import pyrag
from pyrag.index import FlatIndex, HNSWIndex, ShardedIndex

D = 24
# (rank 0 rows, rank 1 rows) per add() call; global order is rank-major within each call.
CALLS = [(400, 300), (200, 101), (0, 5)]


def _data(dtype_seed: int = 0):
    """All passages in global order plus each rank's slice of each call (the same in every process)."""
    g = torch.Generator().manual_seed(1234 + dtype_seed)
    total = sum(a + b for a, b in CALLS)
    x = torch.randn(total, D, generator=g) * torch.rand(total, 1, generator=g) * 3
    # exact duplicates on different ranks: their scores tie and the lower global row must win, whether it sits on
    # the lower rank (rows 0.. on rank 0 vs 420.. on rank 1) or the higher one (400.. on rank 1 vs 700.. on rank 0)
    x[420:440] = x[0:20]
    x[700:720] = x[400:420]
    x[1001:1006] = x[300:305]
    slices, pos = [], 0
    for a, b in CALLS:
        slices.append((x[pos:pos + a], x[pos + a:pos + a + b]))
        pos += a + b
    return x, slices


def _queries():
    g = torch.Generator().manual_seed(99)
    x, _ = _data()
    own = [torch.randn(3, D, generator=g), torch.cat([x[0:2], torch.randn(3, D, generator=g)])]
    shared = torch.cat([x[700:702], x[420:421], torch.randn(2, D, generator=g)])
    return own, shared


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        own, shared = _queries()
        for dtype in ("float32", "int8", "float32-sketch"):
            _, slices = _data()
            index = ShardedIndex(D, dtype.split("-")[0], sketch=dtype.endswith("sketch"))
            results[dtype, "sketch"] = index.local.sketch
            for call in slices:
                index.add(call[rank])
            results[dtype, "len"] = (len(index), index.local_len)
            for k in (1, 50, 1006):
                results[dtype, "own", k] = index.search(own[rank], k)
                results[dtype, "shared", k] = index.search(shared, k, same_queries=True)
            results[dtype, "reconstruct"] = index.reconstruct(torch.tensor([[5, 1004], [710, 0]]) + rank)

        # custom labels: distinct across ranks, reconstruct across ranks, save/load
        x, slices = _data()
        index = ShardedIndex(D)
        labels = torch.arange(len(x)) * 10 + 7
        pos = 0
        for a, b in CALLS:
            mine = labels[pos:pos + a] if rank == 0 else labels[pos + a:pos + a + b]
            index.add(x[pos:pos + a] if rank == 0 else x[pos + a:pos + a + b], ids=mine)
            pos += a + b
        results["labels", "search"] = index.search(own[rank], 20)
        results["labels", "reconstruct"] = index.reconstruct(labels[[3, 702, 1004]])
        index.save(os.path.join(out_dir, "shards"))
        loaded = ShardedIndex.load(os.path.join(out_dir, "shards"))
        results["labels", "loaded"] = loaded.search(own[rank], 20)

        # errors reach every rank instead of leaving one waiting in a collective
        errors = {}
        for name, call in {
            "duplicate_across_ranks": lambda: index.add(torch.randn(1, D), ids=torch.tensor([123456])),
            "already_present": lambda: index.add(torch.randn(1, D), ids=labels[[rank]] if rank else torch.tensor([5])),
            "ids_on_one_rank": lambda: index.add(torch.randn(1, D), ids=torch.tensor([777777]) if rank else None),
            "bad_query_on_rank1": lambda: index.search(torch.randn(2, D + rank), 3),
            "k_too_large": lambda: index.search(own[rank], len(index) + 1),
            "unknown_id": lambda: index.reconstruct(torch.tensor([8 + rank])),
        }.items():
            try:
                call()
                errors[name] = None
            except (ValueError, TypeError) as e:
                errors[name] = str(e)
        results["errors"] = errors
        results["len_after_errors"] = len(index)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, timeout=240):
    spawn_ranks(_worker, (2, free_port(), str(tmp_path)), 2, timeout, "sharded workers")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single(dtype: str) -> FlatIndex:
    x, _ = _data()
    index = FlatIndex(D, dtype)
    index.add(x)
    return index


def test_two_process_gloo_sharded_index_equals_single_flat_index(tmp_path):
    ranks = _run_two_ranks(tmp_path)
    own, shared = _queries()
    x, _ = _data()
    for dtype in ("float32", "int8", "float32-sketch"):
        single = _single(dtype.split("-")[0])  # with or without a sketch, the results are the same bits
        assert ranks[0][dtype, "sketch"] == ranks[1][dtype, "sketch"] == dtype.endswith("sketch")
        assert ranks[0][dtype, "len"] == (1006, 600) and ranks[1][dtype, "len"] == (1006, 406)
        for k in (1, 50, 1006):
            for rank in range(2):
                for kind, q in (("own", own[rank]), ("shared", shared)):
                    s, i = ranks[rank][dtype, kind, k]
                    es, ei = single.search(q, k)
                    assert torch.equal(i, ei), f"{dtype} rank {rank} {kind} k={k}: ids differ"
                    assert torch.equal(s, es), f"{dtype} rank {rank} {kind} k={k}: scores differ"
        # rows 700 (rank 0) and 400 (rank 1) tie, as do 420 (rank 1) and 0 (rank 0): the lower id comes first,
        # immediately followed by its twin, in every query's full ranking
        for row in ranks[0][dtype, "shared", 1006][1].tolist():
            assert row[row.index(400) + 1] == 700 and row[row.index(0) + 1] == 420
        for rank in range(2):
            ids = torch.tensor([[5, 1004], [710, 0]]) + rank
            assert torch.equal(ranks[rank][dtype, "reconstruct"], single.reconstruct(ids))

    labels = torch.arange(len(x)) * 10 + 7
    single = FlatIndex(D)
    single.add(x, ids=labels)
    for rank in range(2):
        for key in ("search", "loaded"):
            s, i = ranks[rank]["labels", key]
            es, ei = single.search(own[rank], 20)
            assert torch.equal(i, ei) and torch.equal(s, es), f"labels/{key} rank {rank}"
        assert torch.equal(ranks[rank]["labels", "reconstruct"], x[[3, 702, 1004]])

    e0, e1 = ranks[0]["errors"], ranks[1]["errors"]
    assert "more than once across ranks" in e0["duplicate_across_ranks"] and e1["duplicate_across_ranks"]
    assert "already in the index" in e0["already_present"] and e1["already_present"]
    assert "on every rank or on none" in e0["ids_on_one_rank"] and e1["ids_on_one_rank"]
    assert "failed on rank(s) [1]" in e0["bad_query_on_rank1"] and "shape [N, 24]" in e1["bad_query_on_rank1"]
    assert "k must be in [1, len(index)] = [1, 1006]" in e0["k_too_large"] and e1["k_too_large"]
    assert "id 8 is not in the index" in e0["unknown_id"] and "id 9 is not in the index" in e1["unknown_id"]
    assert ranks[0]["len_after_errors"] == ranks[1]["len_after_errors"] == 1006


def _outcome(call):
    """(result, None) or (None, "ExceptionType: message"), KeyboardInterrupt included."""
    try:
        return call(), None
    except BaseException as e:  # noqa: BLE001 - recorded for the test process to check
        return None, f"{type(e).__name__}: {e}"


def _failure_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        r = {}
        g = torch.Generator().manual_seed(5)
        x = torch.randn(8, 4, generator=g)
        q = torch.randn(3, 4, generator=g)

        # a float16 local index refuses a value one rank's slice holds: both ranks raise, neither adds its rows
        index = ShardedIndex(4, "float16")
        index.add(x[:4] if rank == 0 else x[4:])
        big = torch.full((2, 4), 1e6) if rank == 0 else torch.randn(3, 4, generator=g)
        r["fp16", "add"] = _outcome(lambda: index.add(big))[1]
        r["fp16", "len"] = (len(index), index.local_len)
        r["fp16", "search"] = index.search(q, len(index), same_queries=True)
        index.add(x[:1] * 2 if rank == 0 else x[1:3] * 2)  # still in step: the labels continue at 8
        r["fp16", "after"] = index.search(q, len(index), same_queries=True)

        # an HNSW local whose add fails on rank 1 (an error, then a Ctrl-C): rank 0 undoes its successful add
        for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
            local = HNSWIndex(4, M=4, ef_construction=20, space="ip")
            hn = ShardedIndex(4, local=local)
            hn.add(x[:4] if rank == 0 else x[4:])
            real_add = local.add

            def add_then_fail(emb, ids=None, _real=real_add, _exc=exc, **kw):
                _real(emb, ids, show_progress=False)
                if rank == 1:
                    raise _exc

            local.add = add_then_fail
            r["hnsw", type(exc).__name__, "add"] = _outcome(lambda: hn.add(torch.randn(300, 4, generator=g)))[1]  # noqa: B023
            del local.add
            r["hnsw", type(exc).__name__, "len"] = (len(hn), hn.local_len)
            r["hnsw", type(exc).__name__, "search"] = hn.search(q, len(hn), same_queries=True)

        # a local search that raises on rank 1 only: every rank raises instead of rank 0 waiting in all_gather
        real_search = local.search
        local.search = (lambda qq, k: (_ for _ in ()).throw(ValueError("hnswlib: boom"))) if rank else real_search
        r["hnsw", "search_error"] = _outcome(lambda: hn.search(q, 3, same_queries=True))[1]
        local.search = real_search
        r["hnsw", "search_after"] = hn.search(q, 3, same_queries=True)

        # -inf / NaN scores: finite vectors whose products with the query overflow; rank 0 has fewer rows than k,
        # so its padding competes with real rows that all score -inf (or NaN)
        inf = ShardedIndex(2)
        row = torch.tensor([[1e30, -1e30]])
        inf.add(row if rank == 0 else row.repeat(3, 1))
        for k in (1, 2, 3, 4):
            r["inf", k] = inf.search(torch.tensor([[1e30, 1e30]]), k, same_queries=True)
        # ... and with a real label -1 (labels may be negative), which the padding must not be mistaken for
        neg = ShardedIndex(2)
        neg.add(row if rank == 0 else row.repeat(3, 1), ids=torch.tensor([-5]) if rank == 0 else torch.tensor([-1, 0, 7]))
        r["neg"] = neg.search(torch.tensor([[1e30, 1e30], [1.0, -1.0]]), 4, same_queries=True)
        torch.save(r, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_failures_of_the_local_index_raise_on_every_rank_and_change_nothing(tmp_path):
    spawn_ranks(_failure_worker, (2, free_port(), str(tmp_path)), 2, 120, "sharded failure workers")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    g = torch.Generator().manual_seed(5)
    x, q = torch.randn(8, 4, generator=g), torch.randn(3, 4, generator=g)

    # float16 overflow on rank 0: rank 0 raises FlatIndex's error, rank 1 one naming rank 0 and that error
    assert r0["fp16", "add"].startswith("ValueError: embeddings exceed the float16 range")
    assert r1["fp16", "add"].startswith("ValueError: ShardedIndex.add failed on rank(s) [0]; rank 0 raised "
                                        "ValueError: embeddings exceed the float16 range")
    assert r0["fp16", "len"] == r1["fp16", "len"][:1] + (4,) == (8, 4)
    single = FlatIndex(4, "float16")
    single.add(x)
    for r in (r0, r1):
        s, i = r["fp16", "search"]
        es, ei = single.search(q, 8)
        assert torch.equal(i, ei) and torch.equal(s, es)
    single.add(torch.cat([x[:1], x[1:3]]) * 2)
    for r in (r0, r1):
        s, i = r["fp16", "after"]
        es, ei = single.search(q, 11)
        assert torch.equal(i, ei) and torch.equal(s, es)

    # HNSW local failing on rank 1: both raise; rank 0 rolled back its graph insert (search k=len is exact)
    for name, own in (("RuntimeError", "RuntimeError: disk full"), ("KeyboardInterrupt", "KeyboardInterrupt: ")):
        assert r1["hnsw", name, "add"] == own
        assert r0["hnsw", name, "add"] == f"RuntimeError: ShardedIndex.add failed on rank(s) [1]; rank 1 raised {own}"
        assert r0["hnsw", name, "len"] == (8, 4) and r1["hnsw", name, "len"] == (8, 4)
        exact = FlatIndex(4)
        exact.add(x)
        for r in (r0, r1):
            s, i = r["hnsw", name, "search"]
            assert torch.equal(i, exact.search(q, 8)[1])
    assert r1["hnsw", "search_error"] == "ValueError: hnswlib: boom"
    assert r0["hnsw", "search_error"] == ("ValueError: ShardedIndex.search failed on rank(s) [1]; rank 1 raised "
                                          "ValueError: hnswlib: boom")
    assert torch.equal(r0["hnsw", "search_after"][1], r1["hnsw", "search_after"][1])

    # -inf / NaN scores: the same as one FlatIndex, padding never returned
    rows = torch.tensor([[1e30, -1e30]]).repeat(4, 1)
    flat = FlatIndex(2)
    flat.add(rows)
    for k in (1, 2, 3, 4):
        es, ei = flat.search(torch.tensor([[1e30, 1e30]]), k)
        for r in (r0, r1):
            s, i = r["inf", k]
            assert torch.equal(i, ei) and torch.equal(s, es), (k, i, ei)
    flat = FlatIndex(2)
    flat.add(rows, ids=torch.tensor([-5, -1, 0, 7]))
    es, ei = flat.search(torch.tensor([[1e30, 1e30], [1.0, -1.0]]), 4)
    assert ei[0].tolist() == [-5, -1, 0, 7]
    for r in (r0, r1):
        assert torch.equal(r["neg"][1], ei) and torch.equal(r["neg"][0], es)


def test_sharded_index_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.fail("this test expects no process group in the pytest process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedIndex(8)


def _nccl_worker(rank: int, port: int, out_dir: str) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x, _ = _data()
        index = ShardedIndex(D, "float16")
        index.to("cuda")
        index.add(x.cuda())
        own, _ = _queries()
        s, i = index.search(own[0].cuda(), 30)
        torch.save((s.cpu(), i.cpu()), os.path.join(out_dir, "nccl.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
def test_sharded_index_over_nccl_on_one_gpu_matches_flat(tmp_path):
    mp.spawn(_nccl_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    s, i = torch.load(tmp_path / "nccl.pt")
    x, _ = _data()
    single = FlatIndex(D, "float16").to("cuda")
    single.add(x.cuda())
    es, ei = single.search(_queries()[0][0].cuda(), 30)
    assert torch.equal(i, ei.cpu()) and torch.equal(s, es.cpu())
