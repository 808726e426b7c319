"""Edge cases and input hygiene of the fused RAG losses: all-padding questions, T=1, K=1, -inf and +-1e4 logits,
equal and -inf passage scores (finite, correct forward and gradients), and clear errors for bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES
from test_rag_loss import LOSSES, assert_three_way, make_inputs, run

from pyrag import (
    RagSequenceLoss,
    RagTokenLoss,
    rag_sequence_loss,
    rag_token_loss,
    rag_token_marginal_logprobs,
)
from pyrag.ops.rag_loss import rag_marginal_nll

MODES = ["sequence", "token"]


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
def test_all_padding_question_contributes_zero_loss_and_gradient(mode, epsilon):
    z, s, y = make_inputs(3, 4, 5, 64)
    y[2] = -100
    fn, _ = LOSSES[mode]
    loss, gz, gs = run(fn, z, s, y, torch.ones(3), epsilon=epsilon, reduction="none")
    # Questions 1 and 2 have no targets: no loss and no gradient, with smoothing too (RAG-Sequence's op-level
    # S = logsumexp_k(V p_k + sum over no tokens) would keep the prior; the user API drops such questions).
    assert torch.all(loss[1:] == 0)
    assert loss[0].item() > 0.0
    gz = gz.view(3, 4, 5, 64)
    assert torch.all(gz[1:] == 0)
    assert torch.all(gs[1:] == 0) if mode == "sequence" else torch.all(gs[1:].abs() < 1e-7)
    assert_three_way(mode, z, s, y, epsilon=epsilon)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,K,T,V", [(2, 3, 1, 50), (3, 1, 4, 50), (1, 1, 1, 7)])
def test_single_step_and_single_passage(mode, B, K, T, V):
    z, s, y = make_inputs(B, K, T, V, pad=False)
    for eps in (0.0, 0.1):
        assert_three_way(mode, z, s, y, epsilon=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_negative_infinity_and_huge_logits(mode, dtype):
    B, K, T, V = 2, 3, 5, 300
    z, s, y = make_inputs(B, K, T, V, dtype=dtype)
    z = z.view(B, K, T, V).clone()
    z[..., 7] = 1e4  # a dominating class ...
    z[:, :, 1, 7] = -1e4  # ... very unlikely at one step
    z[:, 0, :, 11:40] = float("-inf")  # passage 0 cannot produce these classes at all
    y[0, 2] = 7  # targets on the huge logits
    y[1, 1] = 7
    y[:, 3] = torch.where(y[:, 3] == -100, y[:, 3], torch.tensor(12))  # a class passage 0 gives -inf
    z = z.view(B * K, T, V)
    assert_three_way(mode, z, s, y, epsilon=0.0)
    if mode == "token":  # smoothing stays finite: some passage gives every class a finite log-prob
        assert_three_way(mode, z, s, y, epsilon=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_equal_passage_scores(mode):
    z, s, y = make_inputs(2, 4, 5, 80)
    assert_three_way(mode, z, torch.zeros_like(s), y, epsilon=0.1)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
def test_all_but_one_passage_score_negative_infinity(mode, epsilon):
    B, K, T, V = 2, 4, 5, 80
    z, _, y = make_inputs(B, K, T, V)
    s = torch.full((B, K), float("-inf"))
    s[:, 2] = 0.3
    loss, gz, gs = run(LOSSES[mode][0], z, s, y, torch.ones(B), epsilon=epsilon, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gz).all() and torch.isfinite(gs).all()
    assert torch.all(gz.view(B, K, T, V)[:, [0, 1, 3]] == 0)  # passages with zero prior get no gradient
    # With one passage left both losses are that passage's (smoothed) token NLL.
    only = z.view(B, K, T, V)[:, 2:3].reshape(B, T, V)
    single = LOSSES[mode][0](only, torch.zeros(B, 1), y, epsilon=epsilon, reduction="none")
    torch.testing.assert_close(loss, single)
    assert_three_way(mode, z, s, y, epsilon=epsilon)


def test_per_token_scores_with_negative_infinity_entries():
    B, K, T, V = 2, 3, 6, 90
    z, s, y = make_inputs(B, K, T, V, per_token=True)
    s[:, 0, ::2] = float("-inf")  # passage 0 only available at odd steps
    s[0, 1, 1] = float("-inf")
    for eps in (0.0, 0.1):
        assert_three_way("token", z, s, y, epsilon=eps)


def test_module_twins_match_functions():
    z, s, y = make_inputs(2, 3, 4, 20)
    torch.testing.assert_close(RagSequenceLoss(epsilon=0.1)(z, s, y), rag_sequence_loss(z, s, y, epsilon=0.1))
    torch.testing.assert_close(
        RagTokenLoss(reduction="sum")(z, s, y), rag_token_loss(z, s, y, reduction="sum")
    )
    y2 = y.masked_fill(y == -100, 5)
    torch.testing.assert_close(
        RagTokenLoss(ignore_index=5)(z, s, y2), rag_token_loss(z, s, y2, ignore_index=5)
    )
    with pytest.raises(ValueError, match="reduction"):
        RagTokenLoss(reduction="avg")


# ---- bad input ----

B, K, T, V = 2, 3, 4, 11


def _good():
    return torch.randn(B * K, T, V), torch.randn(B, K), torch.randint(0, V, (B, T))


@pytest.mark.parametrize("fn", [rag_sequence_loss, rag_token_loss])
def test_bad_shapes_name_the_argument(fn):
    z, s, y = _good()
    with pytest.raises(ValueError, match=r"logits.*\(24, 11\)"):
        fn(z.view(-1, V), s, y)  # wrong rank
    with pytest.raises(ValueError, match=r"doc_scores.*\(2,\)"):
        fn(z, s[:, 0], y)
    with pytest.raises(ValueError, match=r"not divisible by K.*|logits.shape=\(7, 4, 11\).*not divisible"):
        fn(torch.randn(7, T, V), s, y)
    with pytest.raises(ValueError, match=r"logits.*\(9, 4, 11\)"):
        fn(torch.randn(9, T, V), s, y)  # divisible by K but not B*K
    with pytest.raises(ValueError, match=r"target.*\(2, 5\)"):
        fn(z, s, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target.*\(8,\)"):
        fn(z, s, y.view(-1))
    with pytest.raises(ValueError, match=r"logits.*\(3, 3, 4, 11\)"):
        fn(torch.randn(3, K, T, V), s, y)


@pytest.mark.parametrize("fn", [rag_sequence_loss, rag_token_loss])
def test_bad_types_values_and_devices(fn):
    z, s, y = _good()
    with pytest.raises(TypeError, match="logits.*int64"):
        fn(z.long(), s, y)
    with pytest.raises(TypeError, match="target.*float32"):
        fn(z, s, y.float())
    y_bad = y.clone()
    y_bad[1, 2] = V
    with pytest.raises(ValueError, match=r"target\[1, 2\] = 11 is outside \[0, V=11\)"):
        fn(z, s, y_bad)
    y_bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"target\[1, 2\] = -1"):
        fn(z, s, y_bad)
    y_bad[1, 2] = -100  # ignored positions may hold anything
    fn(z, s, y_bad)
    s_bad = s.clone()
    s_bad[1] = float("-inf")
    with pytest.raises(ValueError, match=r"doc_scores has no finite passage score for question/step \(1,\)"):
        fn(z, s_bad, y)
    with pytest.raises(ValueError, match="doc_scores is on meta"):
        fn(z, s.to("meta"), y)
    with pytest.raises(ValueError, match="target is on meta"):
        fn(z, s, y.to("meta"))
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        fn(z, s, y, reduction="avg")
    for eps in (1.0, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="epsilon"):
            fn(z, s, y, epsilon=eps)
        with pytest.raises(ValueError, match="epsilon"):
            (RagSequenceLoss if fn is rag_sequence_loss else RagTokenLoss)(epsilon=eps)
    with pytest.raises(TypeError, match="ignore_index=None"):
        fn(z, s, y, ignore_index=None)
    # numpy scalars are numbers too (e.g. an epsilon read from a config array)
    torch.testing.assert_close(fn(z, s, y, epsilon=np.float32(0.25)), fn(z, s, y, epsilon=0.25))


def test_per_token_scores_rejected_for_sequence_loss():
    z, s, y = _good()
    with pytest.raises(ValueError, match=r"doc_scores.*RAG-Token only.*\(2, 3, 4\)"):
        rag_sequence_loss(z, s[..., None].expand(B, K, T), y)
    with pytest.raises(ValueError, match=r"doc_scores.*\(2, 3, 5\)"):
        rag_token_loss(z, torch.randn(B, K, T + 1), y)


def test_token_marginal_bad_inputs():
    z, s, _ = _good()
    with pytest.raises(ValueError, match=r"step_logits.*\(5, 11\)"):
        rag_token_marginal_logprobs(torch.randn(5, V), s)
    with pytest.raises(ValueError, match=r"doc_scores.*\(2, 3, 4\)"):
        rag_token_marginal_logprobs(z[:, 0], torch.randn(B, K, T))
    with pytest.raises(TypeError, match="step_logits"):
        rag_token_marginal_logprobs(z[:, 0].long(), s)
    with pytest.raises(ValueError, match="doc_scores has no finite passage score for question 0"):
        rag_token_marginal_logprobs(z[:, 0], torch.full((B, K), float("-inf")))
    with pytest.raises(ValueError, match=r"step_logits.*\(6, 0\)"):
        rag_token_marginal_logprobs(torch.randn(B * K, 0), s)
    # no questions: an empty result of the right shape (the losses accept B = 0 too), still differentiable
    for step in (torch.randn(0, V, requires_grad=True), torch.randn(0, T, V, requires_grad=True)):
        out = rag_token_marginal_logprobs(step, torch.randn(0, K))
        assert out.shape == (0, *step.shape[1:]) and out.dtype == torch.float32
        out.sum().backward()
        assert step.grad.shape == step.shape


def test_op_level_errors_name_the_argument():
    z = torch.randn(B, K, T, V)
    lp = torch.log_softmax(torch.randn(B, K), 1)
    y = torch.randint(0, V, (B, T))
    m = torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        rag_marginal_nll(z, lp, y, m, m, mode="seq", epsilon=0.0)
    with pytest.raises(ValueError, match=r"log_prior.*\(2, 3, 4\)"):
        rag_marginal_nll(z, lp[..., None].expand(B, K, T), y, m, m, mode="sequence", epsilon=0.0)
    with pytest.raises(ValueError, match=r"nll_mask.*\(2, 5\)"):
        rag_marginal_nll(z, lp, y, torch.ones(B, T + 1, dtype=torch.bool), m, mode="token", epsilon=0.0)
    y[0, 1] = 99
    with pytest.raises(ValueError, match=r"target\[0, 1\] = 99"):  # checked by the CPU kernel itself
        rag_marginal_nll(z, lp, y, m, m, mode="token", epsilon=0.0)


def check_nan_propagation(mode, epsilon, device):
    """A NaN logit makes its question's loss and gradients NaN (and its token marginal row), the other questions
    untouched (also run on the CUDA code in tests/test_cuda_sim.py)."""
    fn, ref_fn = LOSSES[mode]
    B, K, T, V = 3, 4, 5, 37
    g = torch.Generator().manual_seed(7)
    s = torch.randn(B, K, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    for where in ("one", "all"):
        z = torch.randn(B * K, T, V, generator=g)
        if where == "one":
            z[K + 2, 1, 5] = float("nan")  # question 1
        else:
            z[K:2 * K] = float("nan")
        zz = z.to(device).requires_grad_()
        loss = fn(zz, s.to(device), y.to(device), epsilon=epsilon, reduction="none")
        loss.sum().backward()
        want = ref_fn(z, s, y, epsilon=epsilon, reduction="none")
        assert torch.isnan(want[1]) and torch.isnan(loss[1].cpu()), (where, loss)
        keep = torch.tensor([0, 2])
        torch.testing.assert_close(loss.detach().cpu()[keep], want[keep], rtol=1e-5, atol=1e-5)
        grad = zz.grad.cpu().view(B, K, T, V)
        assert torch.isnan(grad[1]).any() and torch.isfinite(grad[keep]).all(), where
    # the token marginal used in decoding
    z = torch.randn(B * K, V, generator=g)
    z[K + 1, 3] = float("nan")
    out = rag_token_marginal_logprobs(z.to(device), s.to(device)).cpu()
    assert torch.isnan(out[1]).all() and torch.isfinite(out[keep]).all()


# every CPU SIMD level, and the CUDA kernels where there are some (SIMD levels mean nothing there)
NAN_TARGETS = [("cpu", 0), ("cpu", 1), ("cpu", 2)] + [(d, None) for d in DEVICES if d != "cpu"]


@pytest.mark.parametrize("device,isa", NAN_TARGETS, ids=[f"{d}-{i}" if i is not None else d for d, i in NAN_TARGETS])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
def test_nan_logits_give_nan_where_the_reference_does(mode, epsilon, isa, device):
    # A NaN logit makes its row's log_softmax NaN: the question's loss and gradients are NaN, as in the reference,
    # never read as an all -inf row (which gave inf loss and zero gradients when every logit was NaN); the other
    # questions are untouched.
    from pyrag import _ext

    if device == "cpu":
        used = _ext.cpu.rag_loss_set_isa(isa)
        if used < isa:
            _ext.cpu.rag_loss_set_isa(-1)
            pytest.skip("this CPU lacks that SIMD level")
    try:
        check_nan_propagation(mode, epsilon, device)
    finally:
        if device == "cpu":
            _ext.cpu.rag_loss_set_isa(-1)


def _penalty_grads(fn, z, s, *args, **kw):
    """Gradients of a gradient penalty |dL/dz|^2 + |dL/ds|^2 (a second derivative through fn) w.r.t. z and s."""
    z = z.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out = fn(z, s, *args, **kw)
    gz, gs = torch.autograd.grad(out.sum() if out.dim() else out, (z, s), create_graph=True)
    return torch.autograd.grad((gz.float() ** 2).sum() + (gs.float() ** 2).sum(), (z, s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
def test_second_derivatives_match_the_reference(mode, epsilon, device):
    # backward(create_graph=True) must not differentiate the fused backward's saved posteriors as constants (which
    # gave silently wrong second derivatives through doc_scores): the fp32 fused path against fp64 ground truth.
    z, s, y = make_inputs(3, 4, 5, 37, device=device)
    fn, _ = LOSSES[mode]
    got = _penalty_grads(fn, z, s, y, epsilon=epsilon, reduction="sum")
    want = _penalty_grads(fn, z.double(), s.double(), y, epsilon=epsilon, reduction="sum")
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-3  # the penalty really depends on both inputs
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    # the token marginal of decoding
    got = _penalty_grads(rag_token_marginal_logprobs, z[:, 0], s)
    want = _penalty_grads(rag_token_marginal_logprobs, z[:, 0].double(), s.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
