"""Fused RAG-Sequence / RAG-Token losses and the token marginal against the plain-torch reference: three-way
tolerance (fp64 ground truth / reference in the test dtype / kernel), forward and gradients, DESIGN.md's worked
examples, every SIMD path of the CPU kernels, and the same checks on CUDA (non-default stream) where available."""

from __future__ import annotations

import math

import pytest
import torch

import pyrag
from pyrag import rag_sequence_loss, rag_token_loss, rag_token_marginal_logprobs
from pyrag import reference as ref

CUDA = pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="no CUDA kernels / GPU")
LOSSES = {
    "sequence": (rag_sequence_loss, ref.rag_sequence_loss_reference),
    "token": (rag_token_loss, ref.rag_token_loss_reference),
}
# Extra error the kernel may have beyond the reference's own, relative to the ground truth's magnitude.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(B, K, T, V, *, dtype=torch.float32, device="cpu", per_token=False, pad=True, scale=3.0):
    """Random HF-layout logits [B*K, T, V], doc_scores [B, K] (or [B, K, T]), targets with padding and one
    all-padding question."""
    g = torch.Generator().manual_seed(B * 1000 + K * 100 + T * 10 + V)
    z = (torch.randn(B * K, T, V, generator=g) * scale).to(dtype)
    s = torch.randn(B, K, T, generator=g) if per_token else torch.randn(B, K, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    if pad:
        y[0, T - T // 3 :] = -100  # right padding
        if B > 1:
            y[1] = -100  # a question with no target at all
    return z.to(device), s.to(device), y.to(device)


def run(fn, z, s, y, gout, **kw):
    """Loss and gradients (logits, doc_scores) for upstream gradient gout."""
    z = z.detach().requires_grad_()
    s = s.detach().requires_grad_()
    loss = fn(z, s, y, **kw)
    gz, gs = torch.autograd.grad(loss, (z, s), gout)
    return loss.detach(), gz, gs


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_three_way(mode, z, s, y, *, epsilon, reduction="none", atol_scale=1.0):
    """Kernel error vs fp64 ground truth (of the same, upcast inputs), for the loss and both gradients (bounds in
    check_three_way)."""
    fn, ref_fn = LOSSES[mode]
    kw = {"epsilon": epsilon, "reduction": reduction}
    B = s.shape[0]
    gout = torch.randn(
        B if reduction == "none" else (), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    ).to(z.device)
    truth = run(ref_fn, z.double(), s.double(), y, gout, **kw)
    kern = run(fn, z, s, y, gout.float(), **kw)
    check_three_way(mode, z, s, y, gout, kw, truth, kern, atol_scale)


def check_three_way(mode, z, s, y, gout, kw, truth, kern, atol_scale=1.0):
    """assert_three_way's check of (loss, grad logits, grad doc_scores) of the kernel against the fp64 truth: grad
    logits within the plain-torch reference's error in the logits' dtype + that dtype's tolerance; the loss and grad
    doc_scores (fp32 outputs, fp32 accumulation) within the reference's error on the same inputs upcast to fp32
    (nothing unless the inputs are extreme, e.g. logits of 1e4 whose fp32 ulp is 1e-3) + the fp32 tolerance."""
    _, ref_fn = LOSSES[mode]
    ref_dtype = run(ref_fn, z, s, y, gout.float(), **kw)
    ref_fp32 = run(ref_fn, z.float(), s, y, gout.float(), **kw) if z.dtype != torch.float32 else ref_dtype
    names = ("loss", "grad logits", "grad doc_scores")
    for name, t, r, r32, k in zip(names, truth, ref_dtype, ref_fp32, kern):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert torch.isfinite(k).all(), name
        in_dtype = name == "grad logits"
        tol = TOL[z.dtype if in_dtype else torch.float32] * atol_scale * max(1.0, t.abs().max().item())
        e_k, e_r = max_err(k, t), max_err(r if in_dtype else r32, t)
        assert e_k <= e_r + tol, f"{mode} {name}: kernel err {e_k:.3g} > reference err {e_r:.3g} + {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode,per_token", [("sequence", False), ("token", False), ("token", True)])
def test_rag_loss_three_way_ragged_shape(mode, per_token, epsilon, dtype):
    z, s, y = make_inputs(3, 5, 7, 1001, dtype=dtype, per_token=per_token)
    assert_three_way(mode, z, s, y, epsilon=epsilon)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_rag_loss_reductions_match_reference(mode, reduction):
    z, s, y = make_inputs(3, 2, 5, 33)
    assert_three_way(mode, z, s, y, epsilon=0.1, reduction=reduction)
    fn, _ = LOSSES[mode]
    per_q = fn(z, s, y, reduction="none")
    out = fn(z, s, y, reduction=reduction)
    want = {"none": per_q, "sum": per_q.sum(), "mean": per_q.sum() / 3}[reduction]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_rag_loss_three_way_bart_vocabulary(mode, dtype):
    z, s, y = make_inputs(3, 5, 7, 50265, dtype=dtype)
    assert_three_way(mode, z, s, y, epsilon=0.1, reduction="mean")


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_cpu_simd_path_matches_reference(isa, dtype):
    from pyrag import _ext

    used = _ext.cpu.rag_loss_set_isa(isa)
    try:
        if used < isa:  # reported by `pytest -ra`, not passed silently on the lower level
            pytest.skip(f"this CPU lacks the {['baseline', 'AVX2', 'AVX-512'][isa]} loss kernels")
        assert used == isa
        z, s, y = make_inputs(2, 3, 5, 1037, dtype=dtype, per_token=True)
        for mode in ("sequence", "token"):
            for epsilon in (0.0, 0.1):
                assert_three_way(mode, z, s if mode == "token" else s[..., 0], y, epsilon=epsilon)
        zz = z[:, 0]
        got = rag_token_marginal_logprobs(zz, s[..., 0])
        want = ref.rag_token_marginal_logprobs_reference(zz.double(), s[..., 0].double())
        assert max_err(got, want) <= 1e-4 * want.abs().max().item()
    finally:
        _ext.cpu.rag_loss_set_isa(-1)


def test_results_do_not_depend_on_thread_count():
    z, s, y = make_inputs(3, 4, 6, 301)
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run(rag_token_loss, z, s, y, torch.ones(()), epsilon=0.1))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def check_token_marginal(steps, dtype):
    """The token marginal (one step [B*K, V] or steps [B*K, T, V]) and its gradients against the fp64 reference,
    within the reference's own error in dtype + TOL (also run on the CUDA code in tests/test_cuda_sim.py)."""
    B, K, V = 3, 4, 1001
    z, s, _ = make_inputs(B, K, steps or 1, V, dtype=dtype, pad=False)
    step = z[:, 0] if steps is None else z  # [B*K, V] or [B*K, T, V]
    gout = torch.randn((B, V) if steps is None else (B, steps, V), dtype=torch.float64)

    def grads(fn, zz, ss, g):
        zz = zz.detach().requires_grad_()
        ss = ss.detach().requires_grad_()
        out = fn(zz, ss)
        return (out.detach(), *torch.autograd.grad(out, (zz, ss), g))

    truth = grads(ref.rag_token_marginal_logprobs_reference, step.double(), s.double(), gout)
    refd = grads(ref.rag_token_marginal_logprobs_reference, step, s, gout.float())
    kern = grads(rag_token_marginal_logprobs, step, s, gout.float())
    assert kern[0].dtype == torch.float32 and kern[0].shape == truth[0].shape
    for name, t, r, k in zip(("out", "grad logits", "grad doc_scores"), truth, refd, kern):
        tol = TOL[dtype] * max(1.0, t.abs().max().item())
        assert max_err(k, t) <= max_err(r, t) + tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("steps", [None, 4])
def test_token_marginal_logprobs_three_way(steps, dtype):
    check_token_marginal(steps, dtype)


# ---- DESIGN.md worked examples ----


def _logits_with_target_probs(probs, V=8):
    """Rows of logits whose softmax gives probability p to class 0 and spreads 1-p over the other V-1."""
    rows = []
    for p in probs:
        row = torch.full((V,), (1.0 - p) / (V - 1), dtype=torch.float64)
        row[0] = p
        rows.append(row.log())
    return torch.stack(rows)  # [T, V]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_worked_example_rag_sequence(dtype):
    doc1, doc2 = [0.9, 0.8, 0.9, 0.8], [0.9, 0.8, 0.9, 0.2]
    z = torch.stack([_logits_with_target_probs(doc1), _logits_with_target_probs(doc2)]).to(
        dtype
    )  # [B*K=2, 4, V]
    s = torch.tensor([[0.6, 0.4]], dtype=torch.float64).log().to(dtype)
    y = torch.zeros(1, 4, dtype=torch.long)
    p = 0.6 * 0.9 * 0.8 * 0.9 * 0.8 + 0.4 * 0.9 * 0.8 * 0.9 * 0.2
    assert p == pytest.approx(0.36288, abs=1e-12)
    loss = rag_sequence_loss(z, s, y)
    assert loss.item() == pytest.approx(-math.log(0.36288), rel=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_worked_example_rag_token_per_token_priors(dtype):
    priors = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.55, 0.45], [0.6, 0.4]], dtype=torch.float64)  # [T, K]
    probs = [[0.9, 0.7], [0.85, 0.8], [0.9, 0.85], [0.8, 0.7]]  # [T, K]
    z = torch.stack([_logits_with_target_probs([p[k] for p in probs]) for k in range(2)]).to(dtype)
    s = priors.T.log()[None].to(dtype)  # [B=1, K=2, T=4]
    y = torch.zeros(1, 4, dtype=torch.long)
    marginals = (priors * torch.tensor(probs, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(marginals, torch.tensor([0.8, 0.83, 0.8775, 0.76], dtype=torch.float64))
    p = marginals.prod().item()
    assert p == pytest.approx(0.44282, abs=1e-5)
    loss = rag_token_loss(z, s, y)
    assert loss.item() == pytest.approx(-math.log(p), rel=1e-12 if dtype == torch.float64 else 1e-6)


# ---- CUDA (skipped cleanly without a GPU) ----


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode,per_token", [("sequence", False), ("token", False), ("token", True)])
def test_rag_loss_cuda_three_way_on_side_stream(mode, per_token, epsilon, dtype):
    # The kernels must run on the current stream. The loss syncs the host on it (its target checks) before they
    # launch, so inputs are ready whichever stream a kernel uses; what shows a wrong stream is when outputs are
    # written. The default stream is held by a sleep kernel while loss and gradients run on a side stream and are
    # copied there at once: a kernel launched on the default stream would run after the sleep, so the copies would
    # not hold its results. The 3-way check (assert_three_way's) then runs on those copies.
    z, s, y = make_inputs(3, 5, 7, 50265, dtype=dtype, per_token=per_token, device="cuda")
    fn, ref_fn = LOSSES[mode]
    kw = {"epsilon": epsilon, "reduction": "mean"}
    gout = torch.tensor(0.75, dtype=torch.float64, device="cuda")
    run(fn, z, s, y, gout.float(), **kw)  # warm-up on the default stream: kernels loaded
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(1 << 28)  # ~0.15 s on the default stream, far longer than the host-side work below
    blocked = torch.cuda.Event()
    blocked.record()
    with torch.cuda.stream(side):
        kern = [t.clone() for t in run(fn, z, s, y, gout.float(), **kw)]
    side.synchronize()
    assert not blocked.query(), "the default stream's sleep ended before the side stream finished: raise it"
    torch.cuda.synchronize()
    truth = run(ref_fn, z.double(), s.double(), y, gout, **kw)
    check_three_way(mode, z, s, y, gout, kw, truth, kern)


@CUDA
@pytest.mark.parametrize("K", [5, 17])  # 17 > 16 runs the passage-chunk loop of the smoothing kernel
def test_rag_loss_cuda_matches_cpu_kernel(K):
    z, s, y = make_inputs(3, K, 7, 1001, per_token=True)
    for mode in ("sequence", "token"):
        fn, _ = LOSSES[mode]
        ss = s if mode == "token" else s[..., 0]
        cpu = run(fn, z, ss, y, torch.ones(3), epsilon=0.1, reduction="none")
        gpu = run(
            fn, z.cuda(), ss.cuda(), y.cuda(), torch.ones(3, device="cuda"), epsilon=0.1, reduction="none"
        )
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("steps", [None, 3])
def test_token_marginal_cuda_on_side_stream(steps):
    # As above: the default stream sleeps while forward and backward run on a side stream and their outputs are
    # copied there at once; a kernel launched on the default stream would leave the copies without its results.
    B, K, V = 3, 12 + 5, 50265  # K > 16 exercises the passage-chunk loop of the backward kernel
    z, s, _ = make_inputs(B, K, steps or 1, V, pad=False, device="cuda")
    step = z[:, 0] if steps is None else z
    g = torch.randn((B, V) if steps is None else (B, steps, V), generator=torch.Generator().manual_seed(2)).cuda()

    def forward_backward():
        zz, ss = step.detach().requires_grad_(), s.detach().requires_grad_()
        out = rag_token_marginal_logprobs(zz, ss)
        return (out.detach(), *torch.autograd.grad(out, (zz, ss), g))

    forward_backward()  # warm-up on the default stream: kernels loaded
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(1 << 28)  # ~0.15 s on the default stream
    blocked = torch.cuda.Event()
    blocked.record()
    with torch.cuda.stream(side):
        out, gz, gs = [t.clone() for t in forward_backward()]
    side.synchronize()
    assert not blocked.query(), "the default stream's sleep ended before the side stream finished: raise it"
    torch.cuda.synchronize()
    zd, sd = step.double().requires_grad_(), s.double().requires_grad_()
    want = ref.rag_token_marginal_logprobs_reference(zd, sd)
    wz, ws = torch.autograd.grad(want, (zd, sd), g.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gz.double(), wz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs.double(), ws, rtol=1e-4, atol=1e-3)
