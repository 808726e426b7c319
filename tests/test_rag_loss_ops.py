"""The torch-op plumbing of the fused RAG losses: torch.library.opcheck on every op, torch.compile(fullgraph=True)
forward and backward, no [B,K,T,V]-sized tensor saved for backward, and the in-place gradient option."""

from __future__ import annotations

import pytest
import torch
from test_rag_loss import LOSSES, make_inputs

import pyrag
from pyrag import rag_sequence_loss, rag_token_loss, rag_token_marginal_logprobs

B, K, T, V = 2, 3, 4, 37


def _op_inputs(per_token=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, K, T, V, generator=g).to(dtype).requires_grad_()
    lp = torch.log_softmax(
        torch.randn(B, K, T, generator=g) if per_token else torch.randn(B, K, generator=g), 1
    )
    y = torch.randint(0, V, (B, T), generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    return z, lp.detach().requires_grad_(), y, m, m.clone()


@pytest.mark.parametrize(
    "mode,per_token,dtype",
    [("sequence", False, torch.float32), ("token", False, torch.bfloat16), ("token", True, torch.float32)],
    ids=str,
)
def test_opcheck_marginal_nll_and_its_backward_ops(mode, per_token, dtype):
    z, lp, y, m, sm = _op_inputs(per_token, dtype)
    torch.library.opcheck(torch.ops.pyrag.rag_marginal_nll.default, (z, lp, y, m, sm, mode, 0.1, False))
    with torch.no_grad():
        _, lse, w, u = torch.ops.pyrag.rag_marginal_nll(z, lp, y, m, sm, mode, 0.1, False)
    g = torch.randn(B)
    args = (g, z.detach(), lp.detach(), y, m, sm, lse, w, u, mode, 0.1)
    torch.library.opcheck(torch.ops.pyrag.rag_marginal_nll_backward.default, args)
    inplace_args = (g, z.detach().clone(), *args[2:])
    torch.library.opcheck(torch.ops.pyrag.rag_marginal_nll_backward_.default, inplace_args)


@pytest.mark.parametrize("per_token", [False, True])
def test_opcheck_token_marginal_and_its_backward(per_token):
    z, lp, *_ = _op_inputs(per_token)
    torch.library.opcheck(torch.ops.pyrag.rag_token_marginal.default, (z, lp))
    with torch.no_grad():
        out, lse = torch.ops.pyrag.rag_token_marginal(z, lp)
    args = (torch.randn_like(out), z.detach(), lp.detach(), out, lse)
    torch.library.opcheck(torch.ops.pyrag.rag_token_marginal_backward.default, args)


def test_compile_fullgraph_forward_and_backward_of_every_user_api():
    # aot_eager runs dynamo's fullgraph capture, fake-tensor propagation and AOT autograd (everything a custom op
    # must support); inductor's C++ codegen of the surrounding torch ops adds minutes on a 2-core runner.
    z, s, y = make_inputs(2, 3, 5, 41)
    s3 = torch.randn(2, 3, 5)

    def f(z, s, s3, y):
        return (
            rag_sequence_loss(z, s, y, epsilon=0.1)
            + rag_token_loss(z, s3, y, reduction="sum")
            + rag_token_marginal_logprobs(z[:, 0], s).logsumexp(-1).sum()
            + rag_token_marginal_logprobs(z, s)[:, 1:].exp().sum()
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (f, compiled):
        zz, ss, ss3 = (t.detach().requires_grad_() for t in (z, s, s3))
        loss = fn(zz, ss, ss3, y)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (zz, ss, ss3))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_compiled_inplace_backward_falls_back_to_the_functional_gradient():
    z, s, y = make_inputs(2, 3, 4, 17)

    def f(z, s, y):
        return rag_token_loss(z, s, y, epsilon=0.1, inplace_backward=True)

    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(zc, s, y).backward()
    rag_token_loss(ze, s, y, epsilon=0.1).backward()
    torch.testing.assert_close(zc.grad, ze.grad)
    assert torch.equal(zc.detach(), z)  # traced graphs keep the logits intact


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_forward_saves_no_logits_sized_tensor(mode, epsilon):
    Bq, Kq, Tq, Vq = 3, 4, 5, 997
    z, s, y = make_inputs(Bq, Kq, Tq, Vq, per_token=mode == "token")
    z.requires_grad_()
    s.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = LOSSES[mode][0](z, s, y, epsilon=epsilon)
    logits_storage = z.untyped_storage().data_ptr()
    big = [
        tuple(t.shape)
        for t in saved
        if t.untyped_storage().data_ptr() != logits_storage and t.numel() > 4 * Bq * Kq * Tq
    ]
    assert not big, f"saved for backward: {big}"
    assert any(t.untyped_storage().data_ptr() == logits_storage for t in saved)  # the logits themselves
    loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("mode,per_token", [("sequence", False), ("token", False), ("token", True)])
def test_inplace_backward_writes_the_gradient_into_the_logits(mode, per_token, epsilon, dtype):
    Bq, Kq, Tq, H, Vq = 2, 3, 5, 8, 301
    g = torch.Generator().manual_seed(3)
    h = torch.randn(Bq * Kq * Tq, H, generator=g).to(dtype)
    W = torch.randn(H, Vq, generator=g).to(dtype)
    s = torch.randn((Bq, Kq, Tq) if per_token else (Bq, Kq), generator=g)
    y = torch.randint(0, Vq, (Bq, Tq), generator=g)
    y[0, -2:] = -100
    fn = LOSSES[mode][0]
    results = []
    for inplace in (False, True):
        WW, ss = W.clone().requires_grad_(), s.clone().requires_grad_()
        logits = (h @ WW).view(Bq * Kq, Tq, Vq)  # a non-leaf, as from a generator's lm_head
        if not inplace:
            logits.retain_grad()
        loss = fn(logits, ss, y, epsilon=epsilon, inplace_backward=inplace)
        loss.backward()
        dlogits = logits.detach() if inplace else logits.grad  # in place: the buffer now holds dL/dlogits
        results.append((loss.detach(), WW.grad, ss.grad, dlogits))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_backward_on_a_leaf_gives_the_same_gradient():
    z, s, y = make_inputs(2, 3, 4, 50)
    zf = z.clone().requires_grad_()
    rag_token_loss(zf, s, y, epsilon=0.1).backward()
    zi = z.clone().requires_grad_()
    rag_token_loss(zi, s, y, epsilon=0.1, inplace_backward=True).backward()
    torch.testing.assert_close(zi.grad, zf.grad, rtol=0, atol=0)
    assert not torch.equal(zi.detach(), z)  # documented: the logits' values are destroyed


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="no CUDA kernels / GPU")
def test_inplace_backward_on_cuda_side_stream():
    z, s, y = make_inputs(2, 3, 4, 1001, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for mode in ("sequence", "token"):
            zf, zi = z.clone().requires_grad_(), z.clone().requires_grad_()
            LOSSES[mode][0](zf, s, y, epsilon=0.1).backward()
            LOSSES[mode][0](zi, s, y, epsilon=0.1, inplace_backward=True).backward()
            torch.testing.assert_close(zi.grad, zf.grad, rtol=0, atol=0)
    torch.cuda.synchronize()


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="no CUDA kernels / GPU")
def test_opcheck_on_cuda():
    z, lp, y, m, sm = (t.cuda() for t in _op_inputs(True))
    z = z.detach().requires_grad_()
    lp = lp.detach().requires_grad_()
    for mode in ("sequence", "token"):
        prior = lp if mode == "token" else lp[..., 0].detach().requires_grad_()
        torch.library.opcheck(
            torch.ops.pyrag.rag_marginal_nll.default, (z, prior, y, m, sm, mode, 0.1, False)
        )
    torch.library.opcheck(torch.ops.pyrag.rag_token_marginal.default, (z, lp))
