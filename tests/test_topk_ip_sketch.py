"""The int8 sketch prefilter of the CPU top-k kernel (pyrag.ops.sketch, csrc/topk_ip_cpu.cpp SketchPass): its
results must be bit-identical to the fused path's on every shape, dtype, SIMD level and adversarial input, and the
bounds it rests on must hold."""

from __future__ import annotations

import pytest
import torch
from test_topk_ip import (
    ISA_NAMES,
    ISAS,
    SHAPES,
    _adversarial_docs,
    _make,
    assert_topk_exact,
    need_amx,
    need_isa,
)

from pyrag.ops.sketch import Sketch, make_sketch
from pyrag.ops.topk_ip import cpu_has_amx, topk_ip, topk_ip_options

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
HAS_AMX = cpu_has_amx()
# The two kernels that read a sketch: SIMD int8 scores ("sketch") and, on AMX CPUs, the AMX prefilter ("prefilter";
# its cases skip with the reason on CPUs without AMX).
SKETCH_PATHS = ["sketch", "prefilter"]


def _both(q, d, k, path="sketch", **opts):
    """(fused result, result through the sketch on `path`) with the same options."""
    if path == "prefilter":
        need_amx()
    with topk_ip_options(path="fused", **opts):
        a = topk_ip(q, d, k)
    with topk_ip_options(path=path, **opts):
        b = topk_ip(q, d, k, sketch=make_sketch(d))
    return a, b


def _assert_same(a, b):
    assert torch.equal(a[1], b[1]), f"ids differ in rows {torch.nonzero((a[1] != b[1]).any(1)).flatten().tolist()}"
    assert torch.equal(a[0], b[0]), "scores differ"


@pytest.mark.parametrize("path", SKETCH_PATHS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("Q,N,D,k", [s for s in SHAPES if s[0] < 300] + [(12, 5000, 64, 5000), (300, 1001, 128, 10)])
def test_sketch_path_is_bit_identical_to_fused_and_exact(Q, N, D, k, dtype, path):
    q, d, _ = _make(Q, N, D, dtype, seed=31)
    a, b = _both(q, d, k, path=path)
    _assert_same(a, b)
    assert_topk_exact(q, d, k, *b)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_sketch_path_on_every_simd_path(isa, dtype):
    need_isa(isa)
    q, d, _ = _make(6, 2500, 100, dtype, seed=32)
    _assert_same(*_both(q, d, 25, isa=isa, tile_n=96))


@pytest.mark.parametrize("path", SKETCH_PATHS)
@pytest.mark.parametrize(
    "opts",
    [{"tile_n": 7, "split": 1, "parts": 5}, {"tile_n": 24, "split": 2, "threads": 3},
     {"split": 1, "parts": 64, "threads": 2}],
    ids=["tiny-tiles", "query-split", "many-parts"],
)
def test_sketch_path_with_forced_tiles_partitions_and_threads(opts, path):
    q, d, _ = _make(9 if path == "sketch" else 40, 3001, 33, torch.float32, seed=33)
    _assert_same(*_both(q, d, 40, path=path, **opts))


@pytest.mark.parametrize("path", SKETCH_PATHS)
@pytest.mark.parametrize("kind", ["near_duplicates", "magnitudes", "zeros_and_copies"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_sketch_path_is_bit_identical_on_adversarial_data(kind, dtype, path):
    """Near-duplicates tie within the int8 error (most docs become candidates), magnitudes from 1e-30 to 1e30 with
    a 1e20 query overflow fp32 (the overflow guard), zero rows and exact copies tie exactly (id order); a spiky
    query loses most of itself to int8 quantisation (the VNNI scores' query residual)."""
    g = torch.Generator().manual_seed(34)
    d, _ = _adversarial_docs(kind, dtype, g)
    q = torch.randn(8 if path == "sketch" else 40, d.shape[1], generator=g)
    q[0] *= 1e-20
    q[1] *= 1e20
    q[2, 0] *= 1e4  # one spike: int8 quantisation of this query (VNNI scores) zeroes every other entry
    a, b = _both(q, d, 70, path=path, tile_n=64)
    assert torch.equal(a[1], b[1]), f"ids differ in rows {torch.nonzero((a[1] != b[1]).any(1)).flatten().tolist()}"
    assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())


@pytest.mark.parametrize("path", ["prefilter", "auto"])
def test_huge_queries_over_small_rows_keep_the_exact_top_k_with_amx(path):
    if path == "prefilter":
        need_amx()
    # AMX over the codes sums bf16(q) . codes, and codes reach 127 however small the row: with |q| ~ 2^124 those sums
    # overflow although every |q||d| is finite. Such queries must leave the sketch (same result as fused).
    D, N, eps = 64, 100, 1e-3
    q = torch.full((16, D), 2.0**121)
    d = torch.full((N, D), -eps)
    d[N - 1] = 0
    d[N - 1, :2] = -eps  # doc 99 is the best
    with topk_ip_options(path="fused"):
        a = topk_ip(q, d, 3)
    with topk_ip_options(path=path):
        b = topk_ip(q, d, 3, sketch=make_sketch(d))
    _assert_same(a, b)
    assert int(b[1][0, 0]) == N - 1


def test_huge_query_falls_back_to_the_fused_path():
    # |q| * 127 * sqrt(D) beyond 2^120 could overflow the int8 scores: the kernel must search without the sketch.
    q, d, _ = _make(2, 2000, 16, torch.float32, seed=35)
    q[1] *= 1e35
    _assert_same(*_both(q, d, 10))


def test_rows_too_long_for_the_error_analysis_take_the_fused_path():
    # D >= 2^22 makes D * 2^-24 too large for the bound's g = D u / (1 - D u): the kernel must not trust it.
    g = torch.Generator().manual_seed(39)
    D = 1 << 22
    q = torch.randn(1, D, generator=g)
    d = torch.randn(6, D, generator=g).to(torch.bfloat16)
    d[5] = q[0].to(torch.bfloat16)  # clearly the best doc, last
    a, b = _both(q, d, 2)
    _assert_same(a, b)
    assert int(b[1][0, 0]) == 5


def _corrupt(sk: Sketch) -> Sketch:
    """A sketch that claims every doc scores ~0 within a zero error: trusting it drops the real top k."""
    return Sketch(torch.zeros_like(sk.codes), sk.scale, torch.full_like(sk.norm, 1e-30), torch.zeros_like(sk.res))


def test_auto_path_consults_the_sketch_where_documented():
    """Through a deliberately wrong sketch: results change exactly when the sketch is read -- on the default path
    with up to 12 queries, and beyond that on AMX CPUs (never on the fused path)."""
    q, d, _ = _make(60, 20000, 32, torch.float32, seed=36)
    q = q + 3 * d[:1]  # every query's top k is far above zero, so a sketch saying "all ~0" prunes them
    bad = _corrupt(make_sketch(d))
    ref = topk_ip(q, d, 10)
    for n in (1, 12, 13, 60):
        i = topk_ip(q[:n], d, 10, sketch=bad)[1]
        read = n <= 12 or HAS_AMX
        assert torch.equal(i, ref[1][:n]) != read, f"{n} queries: sketch read={not torch.equal(i, ref[1][:n])}"
    with topk_ip_options(path="fused"):
        assert torch.equal(topk_ip(q[:1], d, 10, sketch=bad)[1], ref[1][:1])


@pytest.mark.parametrize("dtype", FLOATS)
def test_make_sketch_bounds_hold(dtype):
    g = torch.Generator().manual_seed(37)
    span = 3 if dtype == torch.float16 else 20  # fp16 overflows past 65504
    d = (torch.randn(3000, 77, generator=g) * torch.logspace(-span, span, 3000)[:, None]).to(dtype)
    d[5] = 0
    sk = make_sketch(d)
    x = d.double()
    assert sk.codes.dtype == torch.int8 and sk.codes.shape == d.shape
    assert all(t.dtype == torch.float32 and t.shape == (3000,) and t.is_contiguous() for t in sk[1:])
    deq = sk.codes.double() * sk.scale.double()[:, None]
    assert bool((sk.norm.double() >= x.norm(dim=1)).all())
    assert bool((sk.res.double() >= (x - deq).norm(dim=1)).all())
    # Tight as well as safe: within 1e-6 relative of the fp64 values, and far below the norm for int8 codes.
    assert bool((sk.norm.double() <= x.norm(dim=1) * (1 + 1e-6) + 1e-300).all())
    assert float(((x - deq).norm(dim=1) / x.norm(dim=1).clamp_min(1e-300)).max()) < 0.02
    assert float(sk.norm[5]) == 0.0 and float(sk.res[5]) == 0.0


def test_make_sketch_of_empty_docs():
    sk = make_sketch(torch.empty(0, 8))
    assert sk.codes.shape == (0, 8) and all(t.shape == (0,) for t in sk[1:])


def test_make_sketch_refuses_bad_docs():
    with pytest.raises(ValueError, match="NaN or inf.*row 3"):
        d = torch.randn(10, 4)
        d[3, 1] = float("inf")
        make_sketch(d)
    with pytest.raises(ValueError, match="2-D float32/float16/bfloat16"):
        make_sketch(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        make_sketch([[1.0]])


def test_bad_sketch_arguments_are_refused():
    q, d, _ = _make(2, 100, 8, torch.float32)
    sk = make_sketch(d)
    with pytest.raises(TypeError, match="sketch must be a pyrag.ops.sketch.Sketch"):
        topk_ip(q, d, 5, sketch=(sk.codes, sk.scale, sk.norm, sk.res))
    with pytest.raises(ValueError, match=r"sketch.codes must be int8 \[100, 8\]"):
        topk_ip(q, d, 5, sketch=sk._replace(codes=sk.codes[:50]))
    with pytest.raises(ValueError, match=r"sketch.res must be float32 \[100\]"):
        topk_ip(q, d, 5, sketch=sk._replace(res=sk.res.double()))
    q8, d8, scale = _make(2, 100, 8, torch.int8)
    with pytest.raises(ValueError, match="sketch is for float docs"):
        topk_ip(q8, d8, 5, doc_scale=scale, sketch=sk)
    with topk_ip_options(path="sketch"), pytest.raises(ValueError, match="path=sketch needs a sketch"):
        topk_ip(q, d, 5)
    with pytest.raises(ValueError, match="path must be one of"), topk_ip_options(path="sketchy"):
        pass


def test_sketch_of_a_non_contiguous_view_is_used_as_given():
    q, d, _ = _make(3, 500, 16, torch.float32, seed=38)
    sk = make_sketch(d)
    wide = Sketch(torch.cat([sk.codes, sk.codes], 1)[:, :16], sk.scale, sk.norm, sk.res)  # non-contiguous codes
    _assert_same(topk_ip(q, d, 7, sketch=sk), topk_ip(q, d, 7, sketch=wide))
