"""torch custom ops of the fused RAG marginalisation (pyrag::rag_marginal_nll, pyrag::rag_token_marginal and their
backward ops) over csrc/rag_loss_*; `rag_marginal_nll` / `rag_token_marginal` are the wrappers the user API calls."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._common import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    device_guard,
    kernels_for,
    num_threads,
    ptr,
    simulating,
    stream,
)

MODES = {"sequence": 0, "token": 1}
# The ops call the mode argument "kind": opcheck's internals reserve the parameter name "mode".


def _aux_shape(mode: str, B: int, K: int, T: int) -> tuple[int, ...]:
    """Shape of the posteriors the forward saves: [B, K] for sequence, [B, K, T] for token."""
    return (B, K) if mode == "sequence" else (B, K, T)


def _launch(t: Tensor, fn, *args):
    """Calls a kernel entry point with the CPU thread count, or on t's device and current CUDA stream (in the CUDA
    simulator, pyrag._ext.simulate_cuda, its only stream, 0)."""
    if t.device.type == "cpu" and not simulating(t):
        return fn(*args, num_threads())
    with device_guard(t):  # the stream belongs to t's device, which must be current at launch
        return fn(*args, stream(t))


def _dims(logits: Tensor, log_prior: Tensor) -> tuple:
    B, K, T, V = logits.shape
    return B, K, T, V, log_prior.dim() == 3


# ---- marginal NLL: forward op ----


@torch.library.custom_op("pyrag::rag_marginal_nll", mutates_args=())
def _nll_forward(
    logits: Tensor,
    log_prior: Tensor,
    target: Tensor,
    nll_mask: Tensor,
    smooth_mask: Tensor,
    kind: str,
    epsilon: float,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [B] fp32, lse [B,K,T], w, u) with w, u the posteriors backward needs ([B,K] or [B,K,T])."""
    B, K, T, V, per_token = _dims(logits, log_prior)
    new = {"dtype": torch.float32, "device": logits.device}
    loss = torch.empty(B, **new)
    lse = torch.empty(B, K, T, **new)
    w = torch.empty(_aux_shape(kind, B, K, T), **new)
    u = torch.empty(_aux_shape(kind, B, K, T), **new)
    scratch = torch.empty(2 * B * K * T + B * T, **new)
    mod = kernels_for(logits)
    args = (
        DTYPE_CODES[logits.dtype],
        ptr(logits),
        ptr(log_prior),
        ptr(target),
        ptr(nll_mask),
        ptr(smooth_mask),
        B,
        K,
        T,
        V,
        per_token,
        MODES[kind],
        float(epsilon),
        ptr(loss),
        ptr(lse),
        ptr(w),
        ptr(u),
        ptr(scratch),
    )
    bad = _launch(logits, mod.rag_nll_forward, *args)
    if (
        bad is not None and bad >= 0
    ):  # the CPU kernel checks targets (CUDA gives NaN; the user API checks first)
        b, t = divmod(bad, T)
        raise ValueError(
            f"target[{b}, {t}] = {int(target[b, t])} is outside [0, V={V}) at a position the loss counts"
        )
    return loss, lse, w, u


@_nll_forward.register_fake
def _(logits, log_prior, target, nll_mask, smooth_mask, kind, epsilon, inplace_backward):
    torch._check(logits.dim() == 4, lambda: f"logits must be [B, K, T, V], got {logits.shape=}")
    B, K, T, _V = logits.shape
    torch._check(log_prior.shape[:2] == (B, K), lambda: f"log_prior must be [B, K], got {log_prior.shape=}")
    torch._check(target.shape == (B, T), lambda: f"target must be [B, T], got {target.shape=}")
    torch._check(nll_mask.shape == (B, T) and smooth_mask.shape == (B, T), lambda: "masks must be [B, T]")
    new = {"dtype": torch.float32}
    return (
        logits.new_empty(B, **new),
        logits.new_empty((B, K, T), **new),
        logits.new_empty(_aux_shape(kind, B, K, T), **new),
        logits.new_empty(_aux_shape(kind, B, K, T), **new),
    )


# ---- marginal NLL: backward ops (functional, and in-place into the logits buffer) ----


def _nll_backward_into(
    out, grad_loss, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, kind, epsilon
):
    B, K, T, V, per_token = _dims(logits, log_prior)
    mod = kernels_for(logits)
    args = (
        DTYPE_CODES[logits.dtype],
        ptr(grad_loss),
        ptr(logits),
        ptr(log_prior),
        ptr(target),
        ptr(nll_mask),
        ptr(smooth_mask),
        B,
        K,
        T,
        V,
        per_token,
        MODES[kind],
        float(epsilon),
        ptr(lse),
        ptr(w),
        ptr(u),
        ptr(out),
    )
    _launch(logits, mod.rag_nll_backward, *args)


@torch.library.custom_op("pyrag::rag_marginal_nll_backward", mutates_args=())
def _nll_backward(
    grad_loss: Tensor,
    logits: Tensor,
    log_prior: Tensor,
    target: Tensor,
    nll_mask: Tensor,
    smooth_mask: Tensor,
    lse: Tensor,
    w: Tensor,
    u: Tensor,
    kind: str,
    epsilon: float,
) -> Tensor:
    """dL/dlogits [B, K, T, V] in the logits' dtype, written once by the kernel."""
    out = torch.empty_like(logits)
    _nll_backward_into(
        out, grad_loss, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, kind, epsilon
    )
    return out


@_nll_backward.register_fake
def _(grad_loss, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, kind, epsilon):
    torch._check(
        grad_loss.shape == (logits.shape[0],), lambda: f"grad_loss must be [B], got {grad_loss.shape=}"
    )
    return torch.empty_like(logits)


@torch.library.custom_op("pyrag::rag_marginal_nll_backward_", mutates_args=("logits",))
def _nll_backward_inplace(
    grad_loss: Tensor,
    logits: Tensor,
    log_prior: Tensor,
    target: Tensor,
    nll_mask: Tensor,
    smooth_mask: Tensor,
    lse: Tensor,
    w: Tensor,
    u: Tensor,
    kind: str,
    epsilon: float,
) -> None:
    """As rag_marginal_nll_backward, but overwrites logits with dL/dlogits (saves a logits-sized buffer)."""
    _nll_backward_into(
        logits, grad_loss, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, kind, epsilon
    )


@_nll_backward_inplace.register_fake
def _(grad_loss, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, kind, epsilon):
    return None


def _prior_grad(g: Tensor, w: Tensor, u: Tensor, mode: str, epsilon: float, V: int, prior_dim: int) -> Tensor:
    """dL/dlog_prior from the saved posteriors (O(B*K*T) torch ops, any device)."""
    if mode == "sequence":  # -g ((1-eps) w + eps u)
        return -g[:, None] * ((1.0 - epsilon) * w + epsilon * u)
    gp = -g[:, None, None] * ((1.0 - epsilon) * w + (epsilon / V) * u)  # [B, K, T]
    return gp if prior_dim == 3 else gp.sum(-1)


def _nll_setup_context(ctx, inputs, output):
    logits, log_prior, target, nll_mask, smooth_mask, mode, epsilon, inplace_backward = inputs  # mode: "kind"
    _, lse, w, u = output
    ctx.mark_non_differentiable(lse, w, u)
    ctx.save_for_backward(logits, log_prior, target, nll_mask, smooth_mask, lse, w, u)
    ctx.mode, ctx.epsilon, ctx.inplace = mode, epsilon, inplace_backward


def _differentiable_vjp(ctx, ref_fn, grad_out, *inputs):
    """Backward under create_graph=True (double backward, gradient penalties): the fused backward's outputs are
    built from saved posteriors that autograd treats as constants, so their own derivatives would be silently
    wrong. Instead recompute the plain-torch reference from the saved inputs and differentiate it with
    create_graph, at the reference's memory cost, only in this mode. inputs[:2] are (logits, log_prior)."""
    want = [i for i in range(2) if ctx.needs_input_grad[i]]
    with torch.enable_grad():
        out = ref_fn(*inputs)
        got = torch.autograd.grad(out, [inputs[i] for i in want], grad_out, create_graph=True)
    grads = [None, None]
    for i, g in zip(want, got):
        grads[i] = g
    return grads


def _nll_autograd_backward(ctx, grad_loss, _glse, _gw, _gu):
    logits, log_prior, target, nll_mask, smooth_mask, lse, w, u = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: grad mode is off in a plain backward
        grads = _differentiable_vjp(
            ctx,
            lambda z, p: reference.rag_marginal_nll_reference(
                z, p, target, nll_mask, smooth_mask, mode=ctx.mode, epsilon=ctx.epsilon
            ),
            grad_loss,
            logits,
            log_prior,
        )
        return (*grads, None, None, None, None, None, None)
    g = grad_loss.float().contiguous()  # the grad of a sum arrives as an expanded, stride-0 tensor
    grad_logits = grad_prior = None
    if ctx.needs_input_grad[0]:
        args = (g, logits, log_prior, target, nll_mask, smooth_mask, lse, w, u, ctx.mode, ctx.epsilon)
        # The in-place variant is an eager-mode memory saving; traced graphs use the functional op.
        if ctx.inplace and not torch.compiler.is_compiling():
            torch.ops.pyrag.rag_marginal_nll_backward_(*args)
            grad_logits = logits
        else:
            grad_logits = torch.ops.pyrag.rag_marginal_nll_backward(*args)
    if ctx.needs_input_grad[1]:
        grad_prior = _prior_grad(g, w, u, ctx.mode, ctx.epsilon, logits.shape[-1], log_prior.dim())
    return grad_logits, grad_prior, None, None, None, None, None, None


torch.library.register_autograd(
    "pyrag::rag_marginal_nll", _nll_autograd_backward, setup_context=_nll_setup_context
)


# ---- token marginal ----


@torch.library.custom_op("pyrag::rag_token_marginal", mutates_args=())
def _marginal_forward(logits: Tensor, log_prior: Tensor) -> tuple[Tensor, Tensor]:
    """-> (out [B, T, V] fp32 = logsumexp_k(p + log_softmax_v(logits)), lse [B, K, T])."""
    B, K, T, V, per_token = _dims(logits, log_prior)
    out = torch.empty(B, T, V, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B, K, T, dtype=torch.float32, device=logits.device)
    mod = kernels_for(logits)
    args = (DTYPE_CODES[logits.dtype], ptr(logits), ptr(log_prior), B, K, T, V, per_token, ptr(out), ptr(lse))
    _launch(logits, mod.rag_token_marginal_forward, *args)
    return out, lse


@_marginal_forward.register_fake
def _(logits, log_prior):
    torch._check(logits.dim() == 4, lambda: f"logits must be [B, K, T, V], got {logits.shape=}")
    B, K, T, V = logits.shape
    torch._check(log_prior.shape[:2] == (B, K), lambda: f"log_prior must be [B, K], got {log_prior.shape=}")
    return (
        logits.new_empty((B, T, V), dtype=torch.float32),
        logits.new_empty((B, K, T), dtype=torch.float32),
    )


@torch.library.custom_op("pyrag::rag_token_marginal_backward", mutates_args=())
def _marginal_backward(
    grad_out: Tensor, logits: Tensor, log_prior: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (dL/dlogits [B, K, T, V] in the logits' dtype, dL/dlog_prior per token [B, K, T] fp32)."""
    B, K, T, V, per_token = _dims(logits, log_prior)
    grad_logits = torch.empty_like(logits)
    grad_prior = torch.empty(B, K, T, dtype=torch.float32, device=logits.device)
    mod = kernels_for(logits)
    args = (
        DTYPE_CODES[logits.dtype],
        ptr(grad_out),
        ptr(logits),
        ptr(log_prior),
        B,
        K,
        T,
        V,
        per_token,
        ptr(out),
        ptr(lse),
        ptr(grad_logits),
        ptr(grad_prior),
    )
    _launch(logits, mod.rag_token_marginal_backward, *args)
    return grad_logits, grad_prior


@_marginal_backward.register_fake
def _(grad_out, logits, log_prior, out, lse):
    B, K, T, _V = logits.shape
    return torch.empty_like(logits), logits.new_empty((B, K, T), dtype=torch.float32)


def _marginal_setup_context(ctx, inputs, output):
    logits, log_prior = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, log_prior, out, lse)


def _marginal_autograd_backward(ctx, grad_out, _glse):
    logits, log_prior, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True (see _differentiable_vjp)
        return tuple(
            _differentiable_vjp(ctx, reference.rag_token_marginal_reference, grad_out, logits, log_prior)
        )
    grad_logits, grad_prior = torch.ops.pyrag.rag_token_marginal_backward(
        grad_out.float().contiguous(), logits, log_prior, out, lse
    )
    if log_prior.dim() == 2:
        grad_prior = grad_prior.sum(-1)
    return (grad_logits if ctx.needs_input_grad[0] else None), (
        grad_prior if ctx.needs_input_grad[1] else None
    )


torch.library.register_autograd(
    "pyrag::rag_token_marginal", _marginal_autograd_backward, setup_context=_marginal_setup_context
)


# ---- wrappers (the op-level API of CONTRACTS.md) ----


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_common(logits: Tensor, log_prior: Tensor, token_only_3d: bool) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise ValueError(f"logits must be a [B, K, T, V] tensor, got logits.shape={_shape(logits)}")
    if logits.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be float32/bfloat16/float16, got {logits.dtype=}")
    B, K, T, V = logits.shape
    if V < 1 or K < 1:
        raise ValueError(
            f"logits needs K >= 1 passages and V >= 1 classes, got logits.shape={_shape(logits)}"
        )
    if not isinstance(log_prior, Tensor) or not log_prior.is_floating_point():
        raise TypeError(
            f"log_prior must be a float tensor, got {getattr(log_prior, 'dtype', type(log_prior))}"
        )
    ok = tuple(log_prior.shape) == (B, K) or (token_only_3d and tuple(log_prior.shape) == (B, K, T))
    if not ok:
        want = "[B, K] or [B, K, T]" if token_only_3d else "[B, K]"
        raise ValueError(
            f"log_prior must be {want} = {(B, K)} / {(B, K, T)}, got log_prior.shape={_shape(log_prior)}"
        )
    if log_prior.device != logits.device:
        raise ValueError(f"log_prior is on {log_prior.device}, logits on {logits.device}")


def rag_marginal_nll(
    logits: Tensor,
    log_prior: Tensor,
    target: Tensor,
    nll_mask: Tensor,
    smooth_mask: Tensor,
    *,
    mode: str,
    epsilon: float,
    inplace_backward: bool = False,
) -> Tensor:
    """Per-question marginal NLL with HF-style label smoothing -> loss [B] fp32 (fused, differentiable).

    logits [B, K, T, V] fp32/bf16/fp16 (fp64 runs the plain-torch reference); log_prior fp32 [B, K], or
    [B, K, T] in token mode (entries may be -inf); target [B, T] int64 (any value where both masks are 0);
    nll_mask, smooth_mask [B, T] bool; mode "sequence" | "token". With l = log_softmax_v(logits):
      sequence: LL[b] = logsumexp_k(p + sum_t m l[y]);  S[b] = logsumexp_k(V p + sum_t s sum_v l)
      token:    LL[b] = sum_t m logsumexp_k(p + l[y]);  S[b] = sum_t s sum_v logsumexp_k(p + l)
    loss[b] = -(1 - epsilon) LL[b] - (epsilon / V) S[b]. Gradients reach logits (in their dtype) and log_prior.
    inplace_backward=True writes dL/dlogits into the logits' own buffer during backward (eager mode), which
    destroys the logits' values but saves a logits-sized allocation.
    Replaces reference.rag_marginal_nll_reference, which builds the [B, K, T, V] log-probs several times.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'sequence' or 'token', got {mode=!r}")
    _check_common(logits, log_prior, token_only_3d=mode == "token")
    if not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon=}")
    B, _K, T, _V = logits.shape
    for name, x in (("target", target), ("nll_mask", nll_mask), ("smooth_mask", smooth_mask)):
        if not isinstance(x, Tensor) or tuple(x.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got {name}.shape={_shape(x)}")
        if x.device != logits.device:
            raise ValueError(f"{name} is on {x.device}, logits on {logits.device}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor, got {target.dtype=}")
    if kernels_for(logits) is None or logits.dtype == torch.float64:
        return reference.rag_marginal_nll_reference(
            logits, log_prior, target, nll_mask.bool(), smooth_mask.bool(), mode=mode, epsilon=float(epsilon)
        )
    loss, _, _, _ = torch.ops.pyrag.rag_marginal_nll(
        logits.contiguous(),
        log_prior.float().contiguous(),
        target.long().contiguous(),
        nll_mask.bool().contiguous(),
        smooth_mask.bool().contiguous(),
        mode,
        float(epsilon),
        bool(inplace_backward),
    )
    return loss


def rag_token_marginal(logits: Tensor, log_prior: Tensor) -> Tensor:
    """logsumexp_k(log_prior[b, k] + log_softmax_v(logits)[b, k, t, v]) -> [B, T, V] fp32, fused and
    differentiable (HF's RagTokenForGeneration.marginalize). logits [B, K, T, V]; log_prior fp32 [B, K]
    (or [B, K, T]). Replaces reference.rag_token_marginal_reference."""
    _check_common(logits, log_prior, token_only_3d=True)
    if kernels_for(logits) is None or logits.dtype == torch.float64:
        return reference.rag_token_marginal_reference(logits, log_prior)
    out, _ = torch.ops.pyrag.rag_token_marginal(logits.contiguous(), log_prior.float().contiguous())
    return out
