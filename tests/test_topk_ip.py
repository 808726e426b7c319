"""Tests of pyrag.topk_ip (CPU kernel, CUDA kernel where a GPU exists): exact ids and scores against an fp64 brute
force, tie order, tiling/threading/SIMD paths, GIL release, peak memory, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrag
from pyrag.ops.topk_ip import best_cpu_isa, cpu_has_amx, topk_ip, topk_ip_options
from pyrag.reference import topk_ip_reference

U32 = 2.0**-24  # fp32 unit roundoff


def _make(Q, N, D, dtype, seed=0):
    """Random queries [Q, D] fp32 and docs [N, D] stored as dtype (+ doc_scale for int8)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g)
    d = torch.randn(N, D, generator=g)
    if dtype == torch.int8:
        scale = d.abs().amax(dim=1).clamp_min(1e-6) / 127  # symmetric per-row quantisation
        return q, (d / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale
    return q, d.to(dtype), None


def _dequant64(docs, scale):
    d = docs.double()
    return d if scale is None else d * scale.double()[:, None]


def _gt_topk(q64, d64, m, chunk=8192):
    """fp64 brute force: best m per query by (score desc, id asc), chunked over docs so [Q, N] is never held."""
    best_s = q64.new_empty((q64.shape[0], 0))
    best_i = torch.empty((q64.shape[0], 0), dtype=torch.int64)
    for lo in range(0, d64.shape[0], chunk):
        s = q64 @ d64[lo : lo + chunk].T
        s, i = torch.sort(s, dim=1, descending=True, stable=True)
        s, i = (
            torch.cat([best_s, s[:, :m]], 1),
            torch.cat([best_i, i[:, :m] + lo], 1),
        )  # earlier (lower) ids first
        s, order = torch.sort(s, dim=1, descending=True, stable=True)
        best_s, best_i = s[:, :m], i.gather(1, order[:, :m])
    return best_s, best_i


def assert_topk_exact(q, docs, k, scores, ids, doc_scale=None):
    """Strict check against fp64 brute force on the dequantised docs.

    Every score must equal the fp64 inner product of its id within the rigorous fp32 dot-product error bound
    tol = (D + 3) u sum_j |q_j d_j| (any summation order; +1 rounding each for int8's scale and fp16 queries).
    Ids must equal the expected ones exactly, except inside clusters of expected scores that lie within 2 tol of
    each other (their order is decided by rounding); a cluster that ends before k must still hold exactly the
    expected set of ids, and one reaching past k may hold any docs whose true score is that close.
    """
    Q, D = q.shape
    N = docs.shape[0]
    assert scores.shape == (Q, k) and ids.shape == (Q, k), (scores.shape, ids.shape)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    if Q == 0:
        return
    ids_np = ids.numpy()
    assert ids_np.min() >= 0 and ids_np.max() < N, "ids out of range"
    assert all(len(set(r)) == k for r in ids_np.tolist()), "duplicate ids in a row"
    q64, d64 = q.double(), _dequant64(docs, doc_scale)
    gt_ret = torch.einsum("qd,qkd->qk", q64, d64[ids])  # true scores of the returned ids
    abs_ret = torch.einsum("qd,qkd->qk", q64.abs(), d64[ids].abs())
    tol_ret = (D + 3) * U32 * abs_ret + 1e-30
    err = (scores.double() - gt_ret).abs()
    worst = int(torch.argmax(err - tol_ret))
    assert bool((err <= tol_ret).all()), (
        f"score off at [q={worst // k}, j={worst % k}]: got {scores.flatten()[worst].item()}, "
        f"fp64 {gt_ret.flatten()[worst].item()}, tol {tol_ret.flatten()[worst].item()}"
    )
    s_np = scores.numpy()
    assert (s_np[:, :-1] >= s_np[:, 1:]).all(), "scores not sorted descending"
    eq = s_np[:, :-1] == s_np[:, 1:]
    assert (ids_np[:, 1:][eq] > ids_np[:, :-1][eq]).all(), "equal scores not ordered by id"

    m = min(k + 1, N)
    e_s, e_i = _gt_topk(q64, d64, m)
    e_abs = torch.einsum("qd,qkd->qk", q64.abs(), d64[e_i].abs())
    tol_row = torch.maximum(((D + 3) * U32 * e_abs).amax(1), tol_ret.amax(1)).numpy()
    e_s, e_i, gt_ret = e_s.numpy(), e_i.numpy(), gt_ret.numpy()
    for r in range(Q):
        t2 = 2 * tol_row[r]
        gaps = e_s[r, :-1] - e_s[r, 1:]  # >= 0
        start = 0
        while start < k:  # clusters of near-tied expected positions [start, end]
            end = start
            while end + 1 < m and gaps[end] <= t2:
                end += 1
            if end == start:
                assert ids_np[r, start] == e_i[r, start], (
                    f"query {r} position {start}: id {ids_np[r, start]} (fp64 {gt_ret[r, start]}) != expected "
                    f"{e_i[r, start]} (fp64 {e_s[r, start]})"
                )
            elif end < k:
                got, want = set(ids_np[r, start : end + 1]), set(e_i[r, start : end + 1])
                assert got == want, f"query {r} near-tie cluster {start}..{end}: ids {got} != {want}"
            else:
                lo_s, hi_s = e_s[r, end] - t2, e_s[r, start] + t2
                g = gt_ret[r, start:k]
                assert ((g >= lo_s) & (g <= hi_s)).all(), (
                    f"query {r} cluster {start}..{k - 1}: true scores {g} outside [{lo_s}, {hi_s}]"
                )
            start = end + 1


# Ragged shapes covering every Q in {1, 3, 17, 300}, N in {1, 1001, 70000}, D in {7, 128, 769}, k in {1, 10, 100, N}.
SHAPES = [
    (1, 1, 7, 1),
    (3, 1001, 769, 10),
    (17, 1001, 128, 100),
    (300, 1001, 7, 1001),
    (300, 1001, 128, 10),
    (1, 70000, 128, 100),
    (17, 70000, 7, 10),
    (3, 70000, 769, 1),
    (300, 70000, 128, 100),
]
STORAGE = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("Q,N,D,k", SHAPES)
def test_fp32_matches_brute_force(Q, N, D, k):
    q, d, _ = _make(Q, N, D, torch.float32)
    s, i = topk_ip(q, d, k)
    assert_topk_exact(q, d, k, s, i)


# k in {1, 10, 100, N} for every storage dtype: k = N = 1, k = 10 (three shapes), k = 100, and k = N = 600.
@pytest.mark.parametrize("dtype", STORAGE[1:])
@pytest.mark.parametrize("Q,N,D,k", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[6], (20, 600, 33, 600)])
def test_low_precision_storage_matches_brute_force_on_dequantised(Q, N, D, k, dtype):
    q, d, scale = _make(Q, N, D, dtype, seed=1)
    s, i = topk_ip(q, d, k, doc_scale=scale)
    assert_topk_exact(q, d, k, s, i, scale)


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16])
def test_half_queries_are_searched_exactly(qdtype, dtype):
    q, d, scale = _make(17, 1001, 128, dtype, seed=2)
    q = q.to(qdtype)
    s, i = topk_ip(q, d, 10, doc_scale=scale)
    assert_topk_exact(q, d, 10, s, i, scale)


# Every SIMD level is a test case on every machine; the ones this CPU lacks skip with the reason (pytest -ra lists
# them), so lost coverage shows in the report instead of vanishing from the parametrisation.
ISAS = [0, 1, 2]
ISA_NAMES = ["scalar", "avx2", "avx512"]


def need_isa(isa: int) -> None:
    """Skip (with the reason) a case for a SIMD level this CPU lacks; forcing it would be refused."""
    best = best_cpu_isa()
    if isa > best:
        pytest.skip(f"this CPU lacks {ISA_NAMES[isa]} (its best topk_ip kernel is {ISA_NAMES[best]})")


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", STORAGE)
def test_every_simd_path_matches_brute_force(isa, dtype):
    need_isa(isa)
    q, d, scale = _make(5, 3001, 133, dtype, seed=3)
    with topk_ip_options(path="fused", isa=isa):
        s, i = topk_ip(q, d, 37, doc_scale=scale)
    assert_topk_exact(q, d, 37, s, i, scale)


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty on a CPU without an x86 "flags" line, e.g. aarch64)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux): the CPU's flags cannot be read to check the SIMD level")
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_reports_the_simd_level_its_flags_allow():
    # csrc/topk_ip_cpu.cpp best_cpu_isa: AVX-512 needs F, BW and VL; AVX2 needs AVX2, FMA and F16C. Linux drops
    # a flag from /proc/cpuinfo when the OS does not save that register state, as __builtin_cpu_supports checks.
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        want = 2
    elif {"avx2", "fma", "f16c"} <= flags:
        want = 1
    else:
        want = 0
    got = best_cpu_isa()
    assert got == want, f"best_cpu_isa() = {ISA_NAMES[got]}, but /proc/cpuinfo's flags allow {ISA_NAMES[want]}"
    # AMX also needs Linux's permission (arch_prctl), which a sandbox may refuse: checked one way only.
    if cpu_has_amx():
        assert {"amx_tile", "amx_bf16"} <= flags and want == 2, "cpu_has_amx() but the flags lack AMX/AVX-512"


@pytest.mark.parametrize(
    "opts",
    [
        {
            "tile_n": 7,
            "split": 1,
            "parts": 5,
            "threads": 2,
        },  # small tiles + merging 5 doc partitions, 2 threads
        {"tile_n": 1, "split": 1, "parts": 13, "threads": 2},
        {"tile_n": 3, "split": 2, "threads": 2},  # threads over queries
        {"split": 1, "threads": 1, "parts": 3},
        {"split": 2, "threads": 1},
        {"threads": 2},
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_forced_tiles_partitions_and_threads(opts, dtype):
    q, d, scale = _make(11, 997, 29, dtype, seed=4)
    with topk_ip_options(path="fused", **opts):
        s, i = topk_ip(q, d, 50, doc_scale=scale)
    assert_topk_exact(q, d, 50, s, i, scale)


def test_partitions_smaller_than_k_merge_to_exact_result():
    # 40 partitions of ~25 docs each, k=100: every partition returns all its docs, the merge picks the best.
    q, d, _ = _make(4, 1001, 16, torch.float32, seed=5)
    with topk_ip_options(path="fused", split=1, parts=40, threads=2, tile_n=5):
        s, i = topk_ip(q, d, 100)
    assert_topk_exact(q, d, 100, s, i)


@pytest.mark.parametrize("opts", [{"split": 1, "parts": 7}, {"split": 1, "parts": 2}, {"split": 2}], ids=str)
@pytest.mark.parametrize("k", [1500, 2999, 3000])
def test_large_k_with_exact_ties_across_partitions(opts, k):
    # Integer docs score exactly, so ties (duplicates in different partitions) and the NaN rows (ranked as -inf,
    # lowest ids first) have one right order: the merge of the partitions' sorted lists and the final selection
    # must reproduce it bit for bit, up to k = N.
    q, d = tie_heavy_case(5, 3000)
    want = q.double() @ d.double().T
    want = torch.where(want.isnan(), float("-inf"), want)
    order = np.lexsort((np.broadcast_to(np.arange(3000), want.shape), -want.numpy()), axis=1)[:, :k]
    with topk_ip_options(path="fused", threads=2, tile_n=64, **opts):
        s, i = topk_ip(q, d, k)
    assert i.tolist() == order.tolist()
    assert torch.equal(s.double(), torch.gather(want, 1, torch.from_numpy(order)))


# The AMX prefilter path exists only on CPUs with AMX: its cases skip elsewhere (with the reason), and
# test_forced_prefilter_runs_exactly_where_amx_exists checks the clear refusal there.
HAS_AMX = cpu_has_amx()
PATHS = ["fused", "prefilter"]


def need_amx() -> None:
    if not HAS_AMX:
        pytest.skip("this CPU lacks AMX (AMX-TILE + AMX-BF16, granted by Linux): the prefilter path cannot run")


def _prefilter(q, d, k, scale=None, **opts):
    """topk_ip on the forced AMX prefilter path (the case skips where there is no AMX)."""
    need_amx()
    with topk_ip_options(path="prefilter", **opts):
        return topk_ip(q, d, k, doc_scale=scale)


def test_forced_prefilter_runs_exactly_where_amx_exists():
    q, d, _ = _make(50, 700, 32, torch.float32, seed=20)
    with topk_ip_options(path="prefilter"):
        if HAS_AMX:
            s, i = topk_ip(q, d, 9)
            assert_topk_exact(q, d, 9, s, i)
        else:
            with pytest.raises(ValueError, match="path=prefilter needs AMX"):
                topk_ip(q, d, 9)


@pytest.mark.parametrize("other", ["split-queries", "prefilter"])
def test_small_and_large_q_paths_agree_exactly(other):
    q, d, _ = _make(64, 5000, 96, torch.float32, seed=6)
    with topk_ip_options(path="fused", split=1, threads=2):
        a = topk_ip(q, d, 20)
    if other == "prefilter":
        b = _prefilter(q, d, 20, threads=2)
    else:
        with topk_ip_options(path="fused", split=2, threads=2):
            b = topk_ip(q, d, 20)
    # Same SIMD dot kernel, same per-doc summation order: identical bits whatever the thread split or path.
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_topk_exact(q, d, 20, *a)


def _adversarial_docs(kind, dtype, g):
    """Docs that stress the prefilter's error bound: near-duplicates (many scores tie within the bf16 error),
    huge and tiny magnitudes, non-finite rows, zero rows."""
    n, dim = 3000, 65
    if kind == "near_duplicates":
        base = torch.randn(1, dim, generator=g)
        d = base + 1e-3 * torch.randn(n, dim, generator=g)  # all scores within ~0.1% of each other
    elif kind == "magnitudes":
        d = (
            torch.randn(n, dim, generator=g)
            * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g), None]
        )
        if dtype == torch.float16:
            d = d.clamp(-6e4, 6e4)
    elif kind == "nonfinite":
        d = torch.randn(n, dim, generator=g)
        d[::97, 3] = float("nan")
        d[5::101, 7] = float("inf")
        d[11::103, 1] = float("-inf")
    else:  # zeros and exact duplicates
        d = torch.randn(n, dim, generator=g)
        d[::7] = 0
        d[1::7] = d[2::7]
    if dtype == torch.int8:
        scale = d.nan_to_num(0, 0, 0).abs().amax(1).clamp_min(1e-30) / 127
        q8 = (d.nan_to_num(0, 0, 0) / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return q8, scale
    return d.to(dtype), None


def _adversarial_case(kind, dtype):
    g = torch.Generator().manual_seed(16)
    d, scale = _adversarial_docs(kind, dtype, g)
    q = torch.randn(40, d.shape[1], generator=g)
    q[0] *= 1e-20  # a tiny query and a huge one
    q[1] *= 1e20
    return q, d, scale


@pytest.mark.parametrize("kind", ["near_duplicates", "magnitudes", "zeros_and_copies"])
@pytest.mark.parametrize("dtype", STORAGE)
def test_fused_path_is_exact_on_adversarial_data(kind, dtype):
    q, d, scale = _adversarial_case(kind, dtype)
    with topk_ip_options(path="fused"):
        a = topk_ip(q, d, 70, doc_scale=scale)
    assert_topk_exact(q[2:], d, 70, a[0][2:], a[1][2:], scale)


@pytest.mark.parametrize("kind", ["near_duplicates", "magnitudes", "nonfinite", "zeros_and_copies"])
@pytest.mark.parametrize("dtype", STORAGE)
def test_prefilter_path_is_bit_identical_to_fused_on_adversarial_data(kind, dtype):
    need_amx()
    q, d, scale = _adversarial_case(kind, dtype)
    with topk_ip_options(path="fused"):
        a = topk_ip(q, d, 70, doc_scale=scale)
    b = _prefilter(q, d, 70, scale, tile_n=64)
    assert torch.equal(a[1], b[1]), (
        f"ids differ in rows {torch.nonzero((a[1] != b[1]).any(1)).flatten().tolist()}"
    )
    assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", STORAGE)
def test_prefilter_path_matches_brute_force_on_every_simd_path(isa, dtype):
    need_isa(isa)
    q, d, scale = _make(33, 2500, 100, dtype, seed=17)
    out = _prefilter(q, d, 25, scale, isa=isa, tile_n=96)
    assert_topk_exact(q, d, 25, *out, scale)
    with topk_ip_options(path="fused", isa=isa):
        fused = topk_ip(q, d, 25, doc_scale=scale)
    assert torch.equal(out[0], fused[0]) and torch.equal(out[1], fused[1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Q,N,D,k", [SHAPES[3], SHAPES[4], (300, 9000, 128, 100)])
def test_large_q_paths_match_brute_force(Q, N, D, k, path):
    if path == "prefilter":
        need_amx()
    q, d, _ = _make(Q, N, D, torch.float32, seed=18)
    with topk_ip_options(path=path):
        s, i = topk_ip(q, d, k)
    assert_topk_exact(q, d, k, s, i)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", STORAGE)
def test_duplicate_docs_tie_to_lower_id(isa, dtype):
    need_isa(isa)
    g = torch.Generator().manual_seed(7)
    D, groups, copies = 37, 40, 5
    base = torch.randn(groups, D, generator=g)
    if dtype == torch.int8:
        base = (base * 40).round().clamp(-127, 127)
    owner = torch.randperm(groups * copies, generator=g) % groups  # doc id -> which base vector
    docs = base[owner].to(dtype)
    scale = torch.full((groups * copies,), 0.25) if dtype == torch.int8 else None
    q = torch.randn(6, D, generator=g)
    k = 23  # cuts through a group of 5 copies
    with topk_ip_options(isa=isa, tile_n=9):
        s, i = topk_ip(q, docs, k, doc_scale=scale)
    # Expected: groups by fp64 score (they are far apart), ids ascending within a group, cut at k.
    b64 = _dequant64(base.to(dtype), None if scale is None else scale[:groups])
    g64 = q.double() @ b64.T
    tol = (D + 3) * U32 * float((q.double().abs() @ b64.abs().T).max())  # fp32 error bound of any score
    for r in range(q.shape[0]):
        order = torch.argsort(g64[r], descending=True)
        assert (g64[r][order][:-1] - g64[r][order][1:]).min() > 2 * tol, "test data must keep groups apart"
        want = torch.cat([torch.nonzero(owner == grp).flatten() for grp in order])[:k]  # nonzero is ascending
        assert i[r].tolist() == want.tolist(), f"query {r}: {i[r].tolist()} != {want.tolist()}"
        same = owner[i[r]][1:] == owner[i[r]][:-1]
        assert torch.equal(s[r][1:][same], s[r][:-1][same]), "copies of one doc must score identically"


def test_all_equal_scores_return_lowest_ids():
    q = torch.zeros(2, 8)
    d = torch.randn(300, 8)
    s, i = topk_ip(q, d, 17)
    assert i.tolist() == [list(range(17))] * 2 and bool((s == 0).all())


def test_nan_and_inf_doc_scores_rank_as_minus_infinity():
    d = torch.randn(6, 4)
    d[1] = float("nan")
    d[4, 0] = float("inf")  # q . d = +inf or -inf depending on the sign of q[0]
    q = torch.tensor([[-1.0, 0.5, 0.25, 0.0]])
    s, i = topk_ip(q, d, 6)
    _, ref_i = topk_ip_reference(q, d, 6)
    assert torch.isneginf(s[0, -2:]).all() and torch.isfinite(s[0, :-2]).all()
    assert i[0, -2:].tolist() == [1, 4], "NaN (id 1) and -inf (id 4) tie at -inf: lower id first"
    assert torch.equal(i, ref_i)


def test_k_equals_n_returns_a_full_permutation():
    q, d, _ = _make(3, 257, 11, torch.float32, seed=8)
    s, i = topk_ip(q, d, 257)
    assert all(sorted(r) == list(range(257)) for r in i.tolist())
    assert_topk_exact(q, d, 257, s, i)


def test_empty_queries_give_empty_results():
    s, i = topk_ip(torch.empty(0, 16), torch.randn(10, 16), 4)
    assert s.shape == (0, 4) and i.shape == (0, 4) and s.dtype == torch.float32 and i.dtype == torch.int64


def test_non_contiguous_inputs_give_the_contiguous_result():
    q, d, _ = _make(9, 1001, 64, torch.float32, seed=9)
    q_nc = q.T.contiguous().T  # same values, column-major strides
    d_wide = torch.randn(1001, 128)
    d_wide[:, ::2] = d
    d_nc = d_wide[:, ::2]
    assert not q_nc.is_contiguous() and not d_nc.is_contiguous()
    a, b = topk_ip(q, d, 10), topk_ip(q_nc, d_nc, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_matches_reference_twin():
    q, d, scale = _make(7, 2000, 48, torch.int8, seed=10)
    s, i = topk_ip(q, d, 15, doc_scale=scale)
    rs, ri = topk_ip_reference(q, d, 15, doc_scale=scale)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    assert_topk_exact(q, d, 15, s, i, scale)
    assert_topk_exact(q, d, 15, rs, ri, scale)  # the twin passes the same strict check


@pytest.mark.parametrize("dtype", STORAGE)
def test_chunked_torch_fallback_matches_brute_force(dtype):
    # The path for devices without a pyrag kernel and for sizes the CUDA kernel does not take (k > 4096).
    from pyrag.ops.topk_ip import _topk_ip_torch_chunked

    q, d, scale = _make(3, 9000, 24, dtype, seed=15)
    s, i = _topk_ip_torch_chunked(q, d, 4500, scale, chunk=2000)  # 5 chunks merged
    assert_topk_exact(q, d, 4500, s, i, scale)


def test_concurrent_calls_from_python_threads_agree():
    # The kernel releases the GIL; FlatIndex.search relies on concurrent calls being safe.
    from concurrent.futures import ThreadPoolExecutor

    q, d, _ = _make(64, 4000, 40, torch.float32, seed=19)
    want = topk_ip(q, d, 9)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: topk_ip(q[i::4], d, 9), range(4)))
    for i, (s, ids) in enumerate(outs):
        assert torch.equal(s, want[0][i::4]) and torch.equal(ids, want[1][i::4])


def _free_share_of_a_spinning_thread(work, seconds=0.6):
    """How much a Python thread that counts in a loop gets done while `work()` runs (repeated for `seconds`),
    relative to the same wall time with the main thread asleep: about 1 when work() releases the GIL and a core is
    free for the counter, a few % when it holds the GIL (the counter then runs only between calls)."""
    count, stop, started = [0], threading.Event(), threading.Event()

    def spin():
        started.set()
        while not stop.is_set():
            count[0] += 1

    def counted(body):
        c0, t0 = count[0], time.perf_counter()
        body()
        return (count[0] - c0) / (time.perf_counter() - t0)

    def repeat():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            work()

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    try:
        started.wait()
        idle = counted(lambda: time.sleep(seconds))
        busy = counted(repeat)
    finally:
        stop.set()
        th.join()
    return busy / idle


def test_kernel_releases_the_gil_while_it_runs():
    # One kernel thread leaves the second core to the counter. Measured on a 2-core machine at load 4: the counter
    # kept 0.39-0.57 of its idle rate during ~0.4 s calls, and 0.03-0.04 during a GIL-holding C call of that length
    # (sum(range(n))). Up to 3 tries, so a burst of load from elsewhere cannot fail it.
    q, d, _ = _make(512, 100_000, 128, torch.float32, seed=21)
    with topk_ip_options(path="fused", threads=1):
        topk_ip(q[:1], d, 10)  # warm-up: first touch of the docs' pages
        shares = []
        for _ in range(3):
            shares.append(_free_share_of_a_spinning_thread(lambda: topk_ip(q, d, 10)))
            if shares[-1] >= 0.2:
                break
    assert max(shares) >= 0.2, (
        f"a Python thread kept only {[round(x, 3) for x in shares]} of its idle rate while topk_ip ran: "
        "the kernel holds the GIL"
    )


# Run in a fresh interpreter, whose OpenMP thread pool starts empty. Peak memory is the process's VmHWM (peak RSS of
# its own address space), reset to the current RSS just before the search where Linux allows (/proc/self/clear_refs).
# Not ru_maxrss: exec() carries the parent's peak into it, so a child of a big pytest process starts at the parent's
# few hundred MB and could not show what one search adds.
_PROBE = r"""
import json, os
import torch
from pyrag.ops.topk_ip import topk_ip, topk_ip_options

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} line in /proc/self/status")

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass  # then VmHWM is the peak since exec: an upper bound on the search's peak (stricter, not laxer)

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
out = {}
# Forced thread counts: OpenMP runs a team of that many threads (the caller + workers it starts and keeps).
q, d = torch.randn(4, 16, generator=g), torch.randn(5000, 16, generator=g)
for t in (1, 6):
    with topk_ip_options(path="fused", split=1, threads=t):
        topk_ip(q, d, 5)
    out[f"tasks_after_threads_{t}"] = len(os.listdir("/proc/self/task"))
# Peak memory of one search, Q=300, N=70000, D=64 fp32: a [Q, N] fp32 score matrix would be 84 MB.
q, d = torch.randn(300, 64, generator=g), torch.randn(70000, 64, generator=g)
for path in ("fused", "auto"):
    with topk_ip_options(path=path):
        topk_ip(q, d[:2000], 100)  # warm-up: code, OpenMP team, allocator arenas
        reset_peak()
        before = status_kib("VmRSS")
        topk_ip(q, d, 100)
        out[path] = {"rss_before_kib": before, "peak_kib": status_kib("VmHWM")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_process_probe():
    if not Path("/proc/self/status").is_file() or not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc/self (not Linux): peak RSS and thread counts cannot be read")
    root = str(Path(pyrag.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert r.returncode == 0, f"probe process failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# "auto" is the AMX prefilter at 300 queries where AMX exists, and the fused kernel elsewhere.
@pytest.mark.parametrize("path", ["fused", "auto"])
def test_search_never_allocates_the_score_matrix(fresh_process_probe, path):
    m = fresh_process_probe[path]
    grew = (m["peak_kib"] - m["rss_before_kib"]) / 1024
    matrix = 300 * 70000 * 4 / 2**20
    assert grew < 30, (
        f"path={path}: peak RSS rose {grew:.1f} MiB above the RSS just before a Q=300, N=70000, D=64 search "
        f"(limit 30 MiB); a [Q, N] fp32 score matrix alone is {matrix:.1f} MiB"
    )


def test_forced_thread_count_reaches_openmp(fresh_process_probe):
    one, six = fresh_process_probe["tasks_after_threads_1"], fresh_process_probe["tasks_after_threads_6"]
    assert six - one >= 4, f"threads=6 left {six} OS threads, threads=1 left {one}: the option did not reach OpenMP"


def test_gradients_are_not_tracked():
    q = torch.randn(2, 8, requires_grad=True)
    s, i = topk_ip(q, torch.randn(20, 8), 3)
    assert not s.requires_grad and not i.requires_grad


# ---- bad input: a clear error naming the argument ----
BAD = [
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 9), 3), ValueError, r"same D"),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), 0), ValueError, r"k must be >= 1, got k=0"),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), -2), ValueError, r"k=-2"),
    (
        lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), 11),
        ValueError,
        r"k=11 exceeds the number of docs N=10",
    ),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), 2.0), TypeError, r"k must be an int"),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), True), TypeError, r"k must be an int"),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(0, 8), 1), ValueError, r"docs is empty"),
    (lambda: topk_ip(torch.randn(8), torch.randn(10, 8), 1), ValueError, r"queries must be 2-D"),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(1, 10, 8), 1), ValueError, r"docs must be 2-D"),
    (lambda: topk_ip(torch.randn(2, 0), torch.randn(10, 0), 1), ValueError, r"D must be >= 1"),
    (
        lambda: topk_ip(torch.ones(2, 8, dtype=torch.int32), torch.randn(10, 8), 1),
        TypeError,
        r"queries must be",
    ),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8).double(), 1), TypeError, r"docs must be"),
    (lambda: topk_ip([[1.0]], torch.randn(10, 1), 1), TypeError, r"queries must be a torch.Tensor"),
    (
        lambda: topk_ip(torch.randn(2, 8), torch.ones(10, 8, dtype=torch.int8), 1),
        ValueError,
        r"int8 docs need doc_scale",
    ),
    (
        lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8), 1, doc_scale=torch.ones(10)),
        ValueError,
        r"doc_scale is only for int8",
    ),
    (
        lambda: topk_ip(torch.randn(2, 8), torch.ones(10, 8, dtype=torch.int8), 1, doc_scale=torch.ones(9)),
        ValueError,
        r"doc_scale must be \[N\]",
    ),
    (
        lambda: topk_ip(
            torch.randn(2, 8),
            torch.ones(10, 8, dtype=torch.int8),
            1,
            doc_scale=torch.ones(10, dtype=torch.int64),
        ),
        TypeError,
        r"doc_scale must be a float",
    ),
    (lambda: topk_ip(torch.randn(2, 8), torch.randn(10, 8, device="meta"), 1), ValueError, r"one device"),
    (
        lambda: topk_ip(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.randn(5, 2), 1),
        ValueError,
        r"queries contain NaN or inf \(first in row 0",
    ),
    (
        lambda: topk_ip(torch.tensor([[0.0, 1.0], [1.0, float("-inf")]]), torch.randn(5, 2), 1),
        ValueError,
        r"queries contain NaN or inf \(first in row 1",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_integer_k_is_an_int():
    q, d, _ = _make(3, 50, 8, torch.float32)
    s, i = topk_ip(q, d, np.int64(4))
    assert_topk_exact(q, d, 4, s, i)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown topk_ip option"), topk_ip_options(tiles=3):
        pass
    with pytest.raises(ValueError, match="path must be"), topk_ip_options(path="mm"):
        pass
    # One level above the best this CPU has (3 on an AVX-512 CPU, which no CPU has): refused on every machine.
    over = best_cpu_isa() + 1
    with topk_ip_options(isa=over), pytest.raises(ValueError, match=f"isa={over} is not supported by this CPU"):
        topk_ip(torch.randn(1, 4), torch.randn(4, 4), 1)


# The kernel reports nothing about the plan it ran (tile size, partitions, threads): the options are shown to
# reach it by the values only it refuses (topk_ip_options passes them through unchecked) and, for threads, by the
# OpenMP team it starts (test_forced_thread_count_reaches_openmp).
@pytest.mark.parametrize("opt", [{"threads": -1}, {"tile_n": -1}, {"tile_n": 10 ** 12}, {"split": 3}, {"parts": -1}],
                         ids=str)
def test_out_of_range_forced_options_are_refused_by_the_kernel(opt):
    q, d, _ = _make(3, 50, 8, torch.float32)
    ((name, value),) = opt.items()
    with topk_ip_options(path="fused", **opt), pytest.raises(ValueError, match=f"topk_ip: bad options.*{name}={value}"):
        topk_ip(q, d, 4)
    # The same option in range runs, so the refusal came from that one value.
    with topk_ip_options(path="fused", **{name: {"threads": 1, "tile_n": 1, "split": 2, "parts": 1}[name]}):
        s, i = topk_ip(q, d, 4)
    assert_topk_exact(q, d, 4, s, i)


# ---- torch integration ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_opcheck(dtype):
    q, d, scale = _make(3, 50, 16, dtype, seed=11)
    torch.library.opcheck(torch.ops.pyrag.topk_ip.default, (q, d, 5, scale))


def test_torch_compile_fullgraph():
    def f(q, d):
        s, i = pyrag.topk_ip(q, d, 5)
        return s * 2, i + 1

    q, d, _ = _make(4, 300, 24, torch.float32, seed=12)
    cs, ci = torch.compile(f, fullgraph=True)(q, d)
    s, i = topk_ip(q, d, 5)
    assert torch.equal(cs, s * 2) and torch.equal(ci, i + 1)


# ---- CUDA ----
cuda = pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")


SLEEP_CYCLES = 1 << 28  # ~0.15 s of GPU clock: far longer than an op's host-side work once its kernels are loaded


def run_with_default_stream_blocked(fn):
    """fn() -> tensors, run on a side stream while the default stream is held by a sleep kernel; returns copies of
    the outputs taken on the side stream as soon as fn returns (so a kernel launched on the wrong stream shows).

    topk_ip syncs the host on the current stream (its NaN check on the queries) before it launches, so every input
    the side stream wrote is ready by then whichever stream the kernel uses: input readiness cannot expose a wrong
    stream. The outputs can: a kernel launched on the default stream would queue behind the sleep, and the copies
    made on the side stream would hold whatever the fresh output memory held, not the results."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # inputs made on the default stream are ready for the side one
    torch.cuda._sleep(SLEEP_CYCLES)  # on the default stream
    blocked = torch.cuda.Event()
    blocked.record()  # completes when the sleep ends
    with torch.cuda.stream(side):
        outs = [t.clone() for t in fn()]  # stream-ordered after fn's kernels on the side stream
    side.synchronize()
    assert not blocked.query(), "the default stream's sleep ended before the side stream finished: raise SLEEP_CYCLES"
    torch.cuda.synchronize()
    return outs


@cuda
@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize(
    "Q,N,D,k", [(1, 1, 7, 1), (3, 1001, 769, 10), (17, 70000, 128, 100), (300, 1001, 7, 1001)]
)
def test_cuda_matches_brute_force_on_a_side_stream(Q, N, D, k, dtype):
    q, d, scale = _make(Q, N, D, dtype, seed=13)
    qc, dc = q.cuda(), d.cuda()
    sc = None if scale is None else scale.cuda()
    topk_ip(qc, dc, k, doc_scale=sc)  # warm-up on the default stream: kernels loaded, GEMM path probed
    torch.cuda.synchronize()
    s, i = run_with_default_stream_blocked(lambda: topk_ip(qc, dc, k, doc_scale=sc))
    assert s.device.type == "cuda"
    assert_topk_exact(q, d, k, s.cpu(), i.cpu(), scale)


def duplicated_docs_case(nq):
    """fp32 queries [nq, 64] and fp16 docs [3000, 64], each one of 600 distinct rows (owner: which)."""
    g = torch.Generator().manual_seed(14)
    base = torch.randn(600, 64, generator=g)
    owner = torch.randperm(3000, generator=g) % 600
    return torch.randn(nq, 64, generator=g), base[owner].half(), owner


def assert_duplicates_in_id_order(owner, s, i):
    """Neighbours in a result that are copies of one doc have equal scores and ascending ids."""
    same = owner[i][:, 1:] == owner[i][:, :-1]
    assert torch.equal(s[:, 1:][same], s[:, :-1][same]) and bool((i[:, 1:][same] > i[:, :-1][same]).all())


@cuda
def test_cuda_large_k_and_duplicates():
    q, d, owner = duplicated_docs_case(5)
    s, i = topk_ip(q.cuda(), d.cuda(), 2048)
    s, i = s.cpu(), i.cpu()
    assert_topk_exact(q, d, 2048, s, i)
    assert_duplicates_in_id_order(owner, s, i)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Q,N,D,k", [(3, 5000, 64, 10), (70, 20000, 768, 100), (65, 3001, 40, 7)])
def test_cuda_half_queries_take_the_exact_single_part_path(Q, N, D, k, dtype):
    # Queries already in the docs' dtype skip the split into parts: still exact against fp64 on the given values.
    q, d, _ = _make(Q, N, D, dtype, seed=15)
    qh = q.to(dtype)
    s, i = topk_ip(qh.cuda(), d.cuda(), k)
    assert_topk_exact(qh.float(), d, k, s.cpu(), i.cpu())


@cuda
@pytest.mark.parametrize("Q,N,D,k", [(2, 70000, 32, 4096), (1, 200000, 16, 100)])
def test_cuda_many_chunks_merge_in_several_levels(Q, N, D, k):
    # Hundreds of doc chunks per query: the candidate lists are merged over several levels (2 lists per block at
    # k = 4096), which must keep exactly the k best.
    q, d, _ = _make(Q, N, D, torch.float32, seed=16)
    s, i = topk_ip(q.cuda(), d.cuda(), k)
    assert_topk_exact(q, d, k, s.cpu(), i.cpu())


SELECTS = ["block", "warp"]  # the two kernels that fold GEMM score chunks into the candidate lists


def tie_heavy_case(nq, nd):
    """fp16 queries [nq, 32] and docs [nd, 32] of small integers (exact scores, ties everywhere: 700 distinct docs
    duplicated), every 97th doc NaN."""
    g = torch.Generator().manual_seed(23)
    base = torch.randint(-3, 4, (700, 32), generator=g).to(torch.float16)
    d = base[torch.randint(0, 700, (nd,), generator=g)]
    d[::97] = float("nan")
    q = torch.randint(-2, 3, (nq, 32), generator=g).to(torch.float16)
    return q, d


def gemm_case(n_docs, dtype, qdtype):
    """40 queries (fp32, or the docs' dtype when qdtype is None) and n_docs fp16/bf16 docs of D=96."""
    q, d, _ = _make(40, n_docs, 96, dtype, seed=17)
    q = q * 3e3 if dtype == torch.float16 else q  # fp16 query parts need the power-of-two rescale to stay finite
    return (q if qdtype is not None else q.to(dtype)), d


@cuda
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qdtype", [torch.float32, None])  # None: queries in the docs' dtype (one exact part)
@pytest.mark.parametrize("chunk", [0, 1000, 333])  # 0: one chunk; else several, the last one short (333: unaligned)
def test_cuda_gemm_path_over_chunks(dtype, qdtype, chunk, select):
    qq, d = gemm_case(5000, dtype, qdtype)
    with topk_ip_options(cuda_path="gemm", cuda_chunk=chunk, cuda_select=select):
        s, i = topk_ip(qq.cuda(), d.cuda(), 64)
    assert_topk_exact(qq.float(), d, 64, s.cpu(), i.cpu())


@cuda
@pytest.mark.parametrize("k", [1, 100, 4096])
def test_cuda_select_kernels_agree_bit_for_bit(k):
    # Ties everywhere (integer-valued scores, duplicated docs), NaN docs, many chunks: both selection kernels must
    # return exactly the same scores and ids as each other and as the fused kernel's exact order.
    q, d = tie_heavy_case(70, 9000)
    out = {}
    for select in SELECTS:
        with topk_ip_options(cuda_path="gemm", cuda_chunk=1024, cuda_select=select):
            out[select] = [t.cpu() for t in topk_ip(q.cuda(), d.cuda(), k)]
    with topk_ip_options(cuda_path="fused"):
        ref = [t.cpu() for t in topk_ip(q.cuda(), d.cuda(), k)]
    for select in SELECTS:
        assert torch.equal(out[select][1], ref[1]), f"{select}: ids differ from the fused kernel"
        assert torch.equal(out[select][0].nan_to_num(), ref[0].nan_to_num()), f"{select}: scores differ"


def test_cuda_select_option_is_checked():
    with pytest.raises(ValueError, match="cuda_select"), topk_ip_options(cuda_select="thread"):
        pass


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_tensor_core_path_still_exact(dtype):
    # The fused WMMA kernel (used where torch.mm has no fp32 output) stays tested.
    q, d, _ = _make(70, 20000, 200, dtype, seed=18)
    with topk_ip_options(cuda_path="fused"):
        s, i = topk_ip(q.cuda(), d.cuda(), 100)
    assert_topk_exact(q, d, 100, s.cpu(), i.cpu())


def test_cuda_path_option_is_checked():
    with pytest.raises(ValueError, match="cuda_path"), topk_ip_options(cuda_path="cublas"):
        pass


@cuda
@pytest.mark.parametrize("select", SELECTS)
def test_cuda_gemm_path_with_k_larger_than_the_chunk(select):
    # every chunk holds fewer docs than k: the lists carry candidates over many chunks before the first cut
    q, d, _ = _make(20, 3000, 40, torch.float16, seed=19)
    with topk_ip_options(cuda_path="gemm", cuda_chunk=128, cuda_select=select):
        s, i = topk_ip(q.cuda(), d.cuda(), 500)
    assert_topk_exact(q, d, 500, s.cpu(), i.cpu())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Q,N,D,k", [(1, 200000, 768, 100), (2, 70000, 129, 10), (8, 20000, 64, 1000)])
def test_cuda_sketch_path_is_bit_identical_on_a_side_stream(Q, N, D, k, dtype):
    from pyrag.ops.sketch import make_sketch

    q, d, _ = _make(Q, N, D, torch.float32, seed=24)
    qc, dc = q.cuda(), d.to(dtype).cuda()
    sk = make_sketch(dc)
    want = topk_ip(qc, dc, k)
    topk_ip(qc, dc, k, sketch=sk)  # warm-up on the default stream
    torch.cuda.synchronize()
    s, i = run_with_default_stream_blocked(lambda: topk_ip(qc, dc, k, sketch=sk))
    assert torch.equal(i, want[1]) and torch.equal(s, want[0])
    assert_topk_exact(q, d.to(dtype), k, s.cpu(), i.cpu())
    if k <= 100:  # blocks' lists get cut (a threshold exists) after 2k docs; the k=1000 case's chunks are shorter
        # the sketch decides which rows are read: bounds that rule every doc out once a threshold exists change the
        # result (so the sketch path really ran)
        lying = sk._replace(scale=torch.zeros_like(sk.scale), norm=torch.zeros_like(sk.norm),
                            res=torch.zeros_like(sk.res))
        assert not torch.equal(topk_ip(qc, dc, k, sketch=lying)[1], want[1])


def test_cuda_chunk_option_is_checked():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cuda_chunk"), topk_ip_options(cuda_chunk=bad):
            pass
