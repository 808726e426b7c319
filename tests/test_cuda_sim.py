"""The CUDA kernels' code, run on the CPU by the CUDA simulator (pyrag._ext.simulate_cuda, csrc/sim/): the same
host code, launches, shared memory and warp protocols as on a GPU, checked against the references that the GPU
tests use (tests/test_rag_loss.py, tests/test_topk_ip.py), on shapes small enough for one core. Each kind of kernel
also runs with threads and blocks taking turns in reverse and shuffled order: a result that changed would be a race.

This does not replace the GPU run (timing, the memory model, real tensor cores and cuBLAS are not simulated); it
makes every CI run execute the CUDA code paths a GPU machine is needed to time."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from test_rag_loss import LOSSES, assert_three_way, check_token_marginal, make_inputs, max_err, run
from test_rag_loss_edge import check_nan_propagation
from test_topk_ip import (
    SELECTS,
    _make,
    assert_duplicates_in_id_order,
    assert_topk_exact,
    duplicated_docs_case,
    gemm_case,
    tie_heavy_case,
)

from pyrag import _ext, rag_token_marginal_logprobs
from pyrag.ops.topk_ip import topk_ip, topk_ip_options

# The simulator is built with pyrag._C_cuda on Linux (wherever CMake finds the CUDA toolkit, as on CI): without the
# CUDA module there is nothing to simulate; with it on Linux, a missing simulator fails the tests instead of skipping.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pyrag._C_cuda") is None or not sys.platform.startswith("linux"),
    reason="the CUDA simulator is built with pyrag._C_cuda (CUDA toolkit found) on Linux only",
)

ORDERS = ["forward", "reverse", "shuffle"]


def sim_run(fn, order="forward", sms=4, expect=None):
    """fn() inside the simulator; asserts kernels really ran there (not the CPU kernels or a torch fallback) and,
    with expect, that a kernel launch whose "kernel in host function" name contains that text was among them."""
    with _ext.simulate_cuda(order=order, seed=5, sms=sms) as mod:
        before = mod.sim_stats()["kernels"]
        out = fn()
        after = mod.sim_stats()["kernels"]
    ran = [name for name, n in after.items() if n > before.get(name, 0)]
    assert ran, "no kernel went through the simulator"
    if expect is not None:
        assert any(expect in name for name in ran), f"no {expect} launch among {ran}"
    return out


def same(a, b):
    """Bitwise equality of (nested) outputs, NaN equal to NaN."""
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# ---- the simulator itself ----


def _selftest(name, threads=64, smem=0, order="forward"):
    out = torch.full((max(threads * 6, 256),), -1, dtype=torch.int64)  # the WMMA self-test writes 256
    with _ext.simulate_cuda(order=order, seed=1) as mod:
        mod.selftest(name, out.data_ptr(), threads, smem)
    return out


def test_simulated_collectives_follow_cuda():
    assert _selftest("block_sum", threads=256)[:2].tolist() == [sum(range(256))] * 2
    got = _selftest("collectives").view(64, 6)
    for t in range(64):
        lane = t % 32
        match = 0xF << (lane // 4 * 4)
        up = lane - 1 if lane >= 1 else lane
        down = lane + 3 if lane + 3 < 32 else lane
        assert got[t].tolist() == [0xAAAAAAAA, match, up, down, 1, 0], t


def test_simulator_reports_a_deadlock_instead_of_hanging():
    # lane 3 waits at a barrier, its warp-mates in a shuffle that names it; warp 2 exits, warp 1 is stuck
    with pytest.raises(RuntimeError, match="deadlock, 32 of 64 threads wait forever"):
        _selftest("deadlock")


def test_exited_lanes_do_not_hold_back_a_collective():
    # sm_70+: a full-mask shuffle completes without the lanes that have exited; reading one gives an undefined value
    got = _selftest("exited_lane")[:64].tolist()
    for t in range(64):
        if t == 3:
            continue
        assert got[t] == (-1 if t == 2 else t ^ 1), t


@pytest.mark.parametrize("order", ORDERS)
def test_disjoint_collectives_and_active_masks(order):
    got = _selftest("disjoint", order=order)[:64].tolist()
    assert got == [(t % 32) ^ 1 if t % 32 < 16 else (t % 32) ^ 2 for t in range(64)]
    # converged lanes aggregate: __match_any_sync(__activemask(), lane / 8) sees 8 lanes per value
    assert _selftest("activemask", order=order)[:64].tolist() == [8] * 64


def test_static_shared_memory_starts_as_garbage():
    assert _selftest("static_garbage")[:64].tolist() == [1] * 64


def test_wmma_product_and_its_alignment_rule():
    import numpy as np

    i, k = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    a = (i + 2 * k) % 5 - 2
    b = (3 * i + k) % 7 - 3  # b[k][j] with the row index first
    assert _selftest("wmma", threads=32)[:256].tolist() == (a @ b).reshape(-1).tolist()
    with pytest.raises(RuntimeError, match="256-bit aligned"):
        _selftest("wmma_misaligned", threads=32)


def test_simulator_reports_shared_memory_overruns_and_bad_launches():
    with pytest.raises(RuntimeError, match="past the 1024 bytes of dynamic shared memory"):
        _selftest("smem_overrun", smem=1024)
    _selftest("smem_launch", smem=1024)  # the same kernel within its memory is fine
    with pytest.raises(RuntimeError, match="invalid argument"):  # > 48 KiB without cudaFuncSetAttribute
        _selftest("smem_launch", smem=64 << 10)
    with pytest.raises(RuntimeError, match="invalid configuration"):
        _selftest("block_sum", threads=2048)


def test_thread_order_exposes_a_race():
    outs = {order: _selftest("race", order=order)[:64] for order in ORDERS}
    assert len({tuple(o.tolist()) for o in outs.values()}) > 1, outs


def test_simulate_cuda_checks_its_arguments():
    with pytest.raises(ValueError, match="order"), _ext.simulate_cuda(order="backwards"):
        pass
    with pytest.raises(ValueError, match="sms"), _ext.simulate_cuda(sms=0):
        pass
    with pytest.raises(ValueError, match="seed"), _ext.simulate_cuda(seed=-1):
        pass
    with _ext.simulate_cuda(), pytest.raises(RuntimeError, match="already active"), _ext.simulate_cuda():
        pass
    assert _ext.current_sim() is None


# ---- fused losses (csrc/rag_loss_cuda.cu) ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode,per_token", [("sequence", False), ("token", False), ("token", True)])
def test_losses_three_way(mode, per_token, epsilon, dtype):
    z, s, y = make_inputs(3, 5, 7, 1001, dtype=dtype, per_token=per_token)
    sim_run(lambda: assert_three_way(mode, z, s, y, epsilon=epsilon))


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_losses_bart_vocabulary_and_reductions(mode):
    z, s, y = make_inputs(2, 3, 5, 50265, dtype=torch.bfloat16)
    for reduction in ("none", "mean"):
        sim_run(lambda r=reduction: assert_three_way(mode, z, s, y, epsilon=0.1, reduction=r))


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_losses_agree_with_the_cpu_kernels_in_every_order(mode):
    fn, _ = LOSSES[mode]
    z, s, y = make_inputs(3, 4, 6, 301, per_token=mode == "token")
    gout = torch.randn(3)
    cpu = run(fn, z, s, y, gout, epsilon=0.1, reduction="none")
    outs = [sim_run(lambda: run(fn, z, s, y, gout, epsilon=0.1, reduction="none"), order=order) for order in ORDERS]
    for o in outs:
        for a, b in zip(o, cpu):
            assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())
    assert all(same(o, outs[0]) for o in outs[1:]), "the result depends on the order threads run: a race"


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_losses_inplace_backward(mode):
    fn, _ = LOSSES[mode]
    z, s, y = make_inputs(2, 3, 4, 257)
    want = run(fn, z, s, y, torch.ones(2), reduction="none")

    def inplace():
        zz = z.clone().requires_grad_()
        ss = s.clone().requires_grad_()
        loss = fn(zz, ss, y, inplace_backward=True, reduction="none")
        gz, gs = torch.autograd.grad(loss, (zz, ss), torch.ones(2))
        return loss.detach(), gz, gs

    got = sim_run(inplace)
    for a, b in zip(got, want):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_nan_logits_give_nan_where_the_reference_does(mode, epsilon):
    # The CUDA kernels' NaN propagation (lse_push / lse_merge), through the CPU test's own checks.
    sim_run(lambda: check_nan_propagation(mode, epsilon, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("steps", [None, 4])
def test_token_marginal(steps, dtype):
    sim_run(lambda: check_token_marginal(steps, dtype), expect="marginal_fwd_kernel")


@pytest.mark.parametrize("order", ORDERS)
def test_token_marginal_does_not_depend_on_thread_order(order):
    z, s, _ = make_inputs(3, 4, 1, 1001, pad=False)
    step, g = z[:, 0], torch.randn(3, 1001)

    def grads():
        zz, ss = step.clone().requires_grad_(), s.clone().requires_grad_()
        out = rag_token_marginal_logprobs(zz, ss)
        return (out.detach(), *torch.autograd.grad(out, (zz, ss), g))

    want = sim_run(grads)
    assert same(sim_run(grads, order=order, expect="marginal_bwd_kernel"), want)


# ---- top-k search (csrc/topk_ip_cuda.cu) ----

STORAGE = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _search(q, d, k, scale=None, order="forward", sms=4, sketch=None, expect=None, **options):
    with topk_ip_options(**options):
        return sim_run(lambda: topk_ip(q, d, k, doc_scale=scale, sketch=sketch), order=order, sms=sms, expect=expect)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
@pytest.mark.parametrize(
    "Q,N,D,k",
    # 1-8 queries: Gemv (warp-per-doc streaming); 9+: register tiles (fp32/int8) or tensor cores (fp16/bf16)
    [(1, 1, 7, 1), (2, 1001, 769, 10), (3, 1001, 129, 100), (17, 3000, 128, 100), (65, 700, 7, 700)],
)
def test_fused_search_exact(Q, N, D, k, dtype):
    q, d, scale = _make(Q, N, D, dtype, seed=13)
    producer = "Gemv" if Q <= 8 else "Wmma" if dtype in (torch.float16, torch.bfloat16) else "Simt"
    s, i = _search(q, d, k, scale, cuda_path="fused", expect=f"P = {producer}<")
    assert_topk_exact(q, d, k, s, i, scale)


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("Q", [2, 17])  # Gemv; Simt (fp32) or Wmma (fp16)
def test_fused_search_does_not_depend_on_thread_order(Q, dtype, order):
    q, d, scale = _make(Q, 2000, 40, dtype, seed=3)
    want = _search(q, d, 50, scale, cuda_path="fused")
    assert same(_search(q, d, 50, scale, order=order, cuda_path="fused"), want)


def test_large_k_and_duplicates():
    q, d, owner = duplicated_docs_case(3)
    s, i = _search(q, d, 2048)
    assert_topk_exact(q, d, 2048, s, i)
    assert_duplicates_in_id_order(owner, s, i)


@pytest.mark.parametrize("sms", [1, 64])
def test_many_chunks_merge_in_several_levels(sms):
    # Many doc chunks per query (sms=64: hundreds of blocks over the docs): the candidate lists are merged over
    # several levels, which must keep exactly the k best; sms=1 gives few chunks with long lists.
    q, d, _ = _make(2, 30000, 16, torch.float32, seed=16)
    s, i = _search(q, d, 1000, sms=sms)
    assert_topk_exact(q, d, 1000, s, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_queries_take_the_exact_single_part_path(dtype):
    q, d, _ = _make(20, 1500, 64, dtype, seed=15)
    qh = q.to(dtype)
    s, i = _search(qh, d, 10, cuda_path="fused")
    assert_topk_exact(qh.float(), d, 10, s, i)



@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qdtype", [torch.float32, None])  # None: queries in the docs' dtype (one exact part)
@pytest.mark.parametrize("chunk", [0, 1000, 333])  # 0: one chunk; else several, the last one short (333: unaligned)
def test_gemm_path_over_chunks(dtype, qdtype, chunk, select):
    qq, d = gemm_case(3000, dtype, qdtype)
    kernel = "select_warp_kernel" if select == "warp" else "search_kernel<Scores>"
    s, i = _search(qq, d, 64, cuda_path="gemm", cuda_chunk=chunk, cuda_select=select, expect=kernel)
    assert_topk_exact(qq.float(), d, 64, s, i)


@pytest.mark.parametrize("k", [1, 100, 2048])
def test_select_kernels_agree_bit_for_bit(k):
    # Ties everywhere (integer-valued scores, duplicated docs), NaN docs, many chunks: both selection kernels must
    # return exactly the fused kernel's scores and ids, in every thread order.
    q, d = tie_heavy_case(20, 5000)
    want = _search(q, d, k, cuda_path="fused")
    for select in SELECTS:
        for order in ORDERS:
            got = _search(q, d, k, order=order, cuda_path="gemm", cuda_chunk=1024, cuda_select=select)
            assert torch.equal(got[1], want[1]), f"{select}, {order}: ids differ from the fused kernel"
            assert same(got[0], want[0]), f"{select}, {order}: scores differ"


@pytest.mark.parametrize("select", SELECTS)
def test_gemm_path_with_k_larger_than_the_chunk(select):
    q, d, _ = _make(12, 2000, 40, torch.float16, seed=19)
    s, i = _search(q, d, 500, cuda_path="gemm", cuda_chunk=128, cuda_select=select)
    assert_topk_exact(q, d, 500, s, i)


def test_nan_docs_rank_last():
    q, d, _ = _make(5, 400, 24, torch.float32, seed=21)
    d[::3] = float("nan")
    s, i = _search(q, d, 300)
    finite = s.isfinite()
    assert bool((i[finite] % 3 != 0).all())  # every real score beats a NaN doc
    want_s, want_i = topk_ip(q, d, 300)  # the CPU kernel (another summation order: scores to rounding)
    assert torch.equal(i, want_i) and torch.equal(s.isfinite(), want_s.isfinite())
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)


# ---- the int8 sketch path (SketchGemv: few queries over float docs that carry a sketch) ----


def _sketch_case(Q, N, D, dtype, seed):
    from pyrag.ops.sketch import make_sketch

    q, d, _ = _make(Q, N, D, torch.float32, seed=seed)
    d = d.to(dtype)
    return q, d, make_sketch(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    # Q = 1, 2, 3 (a padded query tile of 4), 8; D unaligned for 16-byte code loads (7, 129) or aligned (64)
    "Q,N,D,k", [(1, 3000, 64, 10), (2, 5000, 129, 100), (3, 2000, 7, 5), (8, 1500, 48, 300)],
)
def test_sketch_path_is_bit_identical_to_the_plain_kernel(Q, N, D, k, dtype):
    q, d, sk = _sketch_case(Q, N, D, dtype, seed=31)
    want = _search(q, d, k, cuda_path="fused")
    got = _search(q, d, k, cuda_path="fused", sketch=sk, expect="SketchGemv<")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert_topk_exact(q, d, k, *got)


def test_sketch_path_reads_the_sketch():
    # Bounds that rule every doc out once a threshold exists must change the result (so the sketch is really what
    # decides which rows are read); the honest sketch gives the exact result. Reverse order: a race would show.
    q, d, sk = _sketch_case(2, 4000, 32, torch.float16, seed=32)
    want = _search(q, d, 20, cuda_path="fused")
    lying = sk._replace(scale=torch.zeros_like(sk.scale), norm=torch.zeros_like(sk.norm), res=torch.zeros_like(sk.res))
    assert not torch.equal(_search(q, d, 20, sketch=lying)[1], want[1])
    for order in ("reverse", "shuffle"):
        assert same(_search(q, d, 20, order=order, sketch=sk, expect="SketchGemv<"), want)


def test_sketch_path_with_ties_and_huge_rows():
    # Duplicated rows (ties broken by the lower id) and rows far beyond the others' norm: still bit-identical.
    from pyrag.ops.sketch import make_sketch

    g = torch.Generator().manual_seed(33)
    base = torch.randn(300, 40, generator=g)
    d = base[torch.randint(0, 300, (3000,), generator=g)]
    d[::501] *= 1e4
    d = d.half()
    sk = make_sketch(d)
    q = torch.randn(4, 40, generator=g)
    want = _search(q, d, 150, cuda_path="fused")
    assert same(_search(q, d, 150, sketch=sk, expect="SketchGemv<"), want)


def test_sketch_path_is_skipped_for_queries_too_large_for_it():
    # A query whose int8-code sums could overflow fp32 gets no bound: the plain kernel runs, results stay exact.
    q, d, sk = _sketch_case(1, 500, 16, torch.float32, seed=34)
    q = q * 1e36
    s, i = _search(q, d, 10, sketch=sk, expect="P = Gemv<")
    assert_topk_exact(q, d, 10, s, i)


def test_flat_index_sketch_in_the_simulator():
    from pyrag.index import FlatIndex

    g = torch.Generator().manual_seed(35)
    x = torch.randn(2500, 48, generator=g)
    plain, sk = FlatIndex(48, "float16"), FlatIndex(48, "float16", sketch=True)
    plain.add(x)
    sk.add(x)
    q = torch.randn(3, 48, generator=g)
    want = sim_run(lambda: plain.search(q, 25))
    got = sim_run(lambda: sk.search(q, 25), expect="SketchGemv<")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


# ---- a RAG model end to end: retrieval, the fused loss and decoding through the CUDA code ----


@pytest.fixture(scope="module")
def tiny_rag(tmp_path_factory):
    from test_rag_model import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("sim_rag"), n=16, n_docs=3)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rag_model_forward_backward_and_decoding_match_the_cpu_kernels(tiny_rag, mode):
    # The model's own calls (its strides, dtypes, K, the KB search) into the CUDA host code and kernels give what the
    # CPU kernels give: the same retrieved passages, losses and parameter gradients to fp32 rounding, the same
    # generated answers. The model is on the CPU either way; only the kernels differ.
    from pyrag.models.rag import RagSequence, RagToken

    base, _, qa, kb = tiny_rag
    model = (RagToken if mode == "token" else RagSequence)(base.question_encoder, base.generator, kb, n_docs=3)
    qs, ans = [r["question"] for r in qa[:4]], [r["answers"][0] for r in qa[:4]]

    def step():
        model.zero_grad(set_to_none=True)
        out = model(qs, ans, reduction="none", epsilon=0.1)
        out.loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    want, want_g = step()
    got, got_g = sim_run(step, expect="row_grad_kernel")
    assert got.rows.tolist() == want.rows.tolist()
    torch.testing.assert_close(got.per_question_loss, want.per_question_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.doc_posterior, want.doc_posterior, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == want_g.keys() and len(want_g) > 10
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)
    kw = {"num_beams": 1, "max_new_tokens": 6} if mode == "token" else {"num_beams": 2, "max_new_tokens": 6}
    want_gen = model.generate(qs, **kw)
    # RAG-Token decodes on the fused token marginal; RAG-Sequence re-scores hypotheses with the fused loss
    got_gen = sim_run(lambda: model.generate(qs, **kw),
                      expect="marginal_fwd_kernel" if mode == "token" else "row_stats_kernel")
    assert got_gen.answers == want_gen.answers


@pytest.mark.parametrize("case", ["negative", "clustered"])
def test_sketch_path_where_the_bound_decides(case, monkeypatch):
    # Random data rarely puts a top-k doc near a block's threshold, so two properties need data of their own:
    # negative: every score < 0, so a block must rescore every doc until its list has a threshold (before that the
    #   threshold is not 0); clustered: scores closer together than the int8 codes can tell apart, in ascending
    #   order in one block (so the threshold is near the final k-th score when the best docs come): only the
    #   bound's error terms keep the true top k.
    from pyrag.ops.sketch import make_sketch

    g = torch.Generator().manual_seed(38)
    if case == "negative":
        q, d = torch.rand(2, 32, generator=g) + 0.1, -torch.rand(3000, 32, generator=g).half()
    else:
        monkeypatch.setenv("PYRAG_TOPK_CUDA_BLOCKS_PER_SM", "1")
        base = torch.randn(32, generator=g)
        q, d = torch.randn(1, 32, generator=g), base + 1e-3 * torch.randn(3000, 32, generator=g)
        d = d[torch.argsort(q[0] @ d.T)]
    sk = make_sketch(d)
    if case == "clustered":  # some true top-10 doc's int8 score is below the 10th exact score: the slack matters
        exact, approx = q[0] @ d.T, (q[0] @ sk.codes.float().T) * sk.scale
        assert bool((approx[-10:] < exact[-10]).any())
    want = _search(q, d, 10, sms=1, cuda_path="fused")
    assert same(_search(q, d, 10, sms=1, sketch=sk, expect="SketchGemv<"), want)
