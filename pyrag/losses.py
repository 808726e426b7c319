"""User-facing RAG marginalisation losses (torch.nn.functional style plus nn.Module twins): RAG-Sequence and
RAG-Token marginal NLL and the RAG-Token next-token marginal, all on the fused ops of pyrag.ops.rag_loss."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from .ops._common import FLOAT_DTYPES
from .ops.rag_loss import rag_marginal_nll, rag_token_marginal

_REDUCTIONS = ("none", "sum", "mean")


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_float(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32/bfloat16/float16), got {name}.dtype={x.dtype}"
        )


def _check_epsilon(epsilon) -> None:
    """Label smoothing: a real number (Python or numpy scalar) in [0, 1)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be a float in [0, 1), got {epsilon=!r}")


def _prepare(mode, logits, doc_scores, target, ignore_index, epsilon, reduction):
    """Validates the user arguments and returns (logits [B,K,T,V], log_prior fp32, target int64, mask [B,T])."""
    _check_float("logits", logits)
    _check_float("doc_scores", doc_scores)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class ids, got {target.dtype=}")
    if logits.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be float32/bfloat16/float16 (or float64), got {logits.dtype=}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction=!r}")
    _check_epsilon(epsilon)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int (the label value to skip), got {ignore_index=!r}")
    for name, x in (("doc_scores", doc_scores), ("target", target)):
        if x.device != logits.device:
            raise ValueError(
                f"{name} is on {x.device} but logits is on {logits.device}; move them to one device"
            )
    if doc_scores.dim() == 3 and mode == "sequence":
        raise ValueError(
            f"doc_scores must be [B, K] for rag_sequence_loss (per-token [B, K, T] priors are RAG-Token only), "
            f"got doc_scores.shape={_shape(doc_scores)}"
        )
    if doc_scores.dim() not in (2, 3):
        raise ValueError(
            f"doc_scores must be [B, K] (or [B, K, T] for token mode), got doc_scores.shape={_shape(doc_scores)}"
        )
    if target.dim() != 2:
        raise ValueError(f"target must be [B, T], got target.shape={_shape(target)}")
    B, K = doc_scores.shape[:2]
    if K < 1:
        raise ValueError(f"doc_scores needs at least one passage, got doc_scores.shape={_shape(doc_scores)}")
    if logits.dim() == 3:
        if logits.shape[0] % K != 0 or logits.shape[0] // K != B:
            raise ValueError(
                f"logits [B*K, T, V] must have B*K = {B}*{K} = {B * K} rows for doc_scores.shape={_shape(doc_scores)}, "
                f"got logits.shape={_shape(logits)}"
                + (" (not divisible by K)" if logits.shape[0] % K else "")
            )
        z = logits.reshape(B, K, logits.shape[1], logits.shape[2])
    elif logits.dim() == 4:
        if tuple(logits.shape[:2]) != (B, K):
            raise ValueError(
                f"logits [B, K, T, V] must start with {(B, K)} (doc_scores), got logits.shape={_shape(logits)}"
            )
        z = logits
    else:
        raise ValueError(f"logits must be [B*K, T, V] or [B, K, T, V], got logits.shape={_shape(logits)}")
    T, V = z.shape[2], z.shape[3]
    if V < 1:
        raise ValueError(f"logits needs at least one class, got logits.shape={_shape(logits)}")
    if tuple(target.shape) != (B, T):
        raise ValueError(
            f"target must be [B, T] = {(B, T)} to match logits and doc_scores, got target.shape={_shape(target)}"
        )
    if doc_scores.dim() == 3 and doc_scores.shape[2] != T:
        raise ValueError(
            f"per-token doc_scores must be [B, K, T] = {(B, K, T)}, got doc_scores.shape={_shape(doc_scores)}"
        )
    mask = target != ignore_index
    if not torch.compiler.is_compiling():  # data-dependent checks (one host sync); traced graphs skip them
        bad = mask & ((target < 0) | (target >= V))
        no_doc = torch.isneginf(doc_scores).all(dim=1)  # [B] or [B, T]: log_softmax over k would be NaN
        if bool(torch.stack([bad.any(), no_doc.any()]).any()):
            if bool(bad.any()):
                b, t = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"target[{b}, {t}] = {int(target[b, t])} is outside [0, V={V}) and is not {ignore_index=}"
                )
            where = tuple(int(i) for i in no_doc.nonzero()[0])
            raise ValueError(
                f"doc_scores has no finite passage score for question/step {where}: every entry is -inf"
            )
    # over k (per t for [B, K, T] scores); fp32 for the kernels, fp64 kept for fp64 ground-truth runs
    log_prior = torch.log_softmax(
        doc_scores.to(torch.float64 if doc_scores.dtype == torch.float64 else torch.float32), dim=1
    )
    return z, log_prior, target, mask


def drop_empty_questions(loss: Tensor, mask: Tensor) -> Tensor:
    """RAG-Sequence: a question with no counted target position (all ignore_index, e.g. batch padding) gets loss 0
    and no gradient. The op's smoothing term S = logsumexp_k(V p + sum over no tokens) would otherwise keep the
    prior and push the retriever towards confident passage scores for a question that has no answer; HF adds the
    prior at an answer position and masks it with that position. (Its LL is 0 anyway; RAG-Token's S and LL are
    sums over the counted positions, so 0 already.)"""
    return torch.where(mask.any(dim=1), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def rag_sequence_loss(
    logits: Tensor,
    doc_scores: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    epsilon: float = 0.0,
    reduction: str = "mean",
    inplace_backward: bool = False,
) -> Tensor:
    """RAG-Sequence marginal NLL: -log sum_k p(z_k|x) prod_t p(y_t|x, z_k, y_<t), fused.

    logits [B*K, T, V] (HF's layout, passages of a question adjacent) or [B, K, T, V], fp32/bf16/fp16;
    doc_scores [B, K] unnormalised passage scores (log_softmax over k inside, as HF does); target [B, T]
    labels aligned with the logits, ignore_index positions contribute nothing (a question with every position
    ignored: loss 0 and no gradient, with smoothing too). epsilon: label smoothing as
    HF transformers defines it (the exact formula: pyrag/reference.py). reduction "none" -> [B], "sum", "mean" (over questions).
    Gradients reach logits and doc_scores. inplace_backward=True writes dL/dlogits into the logits buffer
    in backward (eager mode; the logits' values are destroyed) to save a logits-sized allocation.

    Plain torch (what it replaces; see reference.rag_sequence_loss_reference):
        l = log_softmax(logits.view(B, K, T, V), -1); ly = l.gather(-1, y).squeeze(-1) * mask
        loss = -logsumexp(log_softmax(doc_scores, 1) + ly.sum(-1), 1)
    """
    z, log_prior, target, mask = _prepare(
        "sequence", logits, doc_scores, target, ignore_index, epsilon, reduction
    )
    loss = rag_marginal_nll(
        z,
        log_prior,
        target,
        mask,
        mask,
        mode="sequence",
        epsilon=float(epsilon),
        inplace_backward=inplace_backward,
    )
    return _reduce(drop_empty_questions(loss, mask), reduction)


def rag_token_loss(
    logits: Tensor,
    doc_scores: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    epsilon: float = 0.0,
    reduction: str = "mean",
    inplace_backward: bool = False,
) -> Tensor:
    """RAG-Token marginal NLL: -sum_t log sum_k p(z_k|x) p(y_t|x, z_k, y_<t), fused.

    Arguments as rag_sequence_loss, and doc_scores may also be [B, K, T]: per-token passage scores,
    normalised with log_softmax over k separately at every t (entries may be -inf for a passage not
    available at that step; at least one per (b, t) must be finite).

    Plain torch (see reference.rag_token_loss_reference):
        l = log_softmax(logits.view(B, K, T, V), -1); ly = l.gather(-1, y).squeeze(-1)
        loss = -(logsumexp(log_softmax(doc_scores, 1)[..., None] + ly, 1) * mask).sum(-1)
    """
    z, log_prior, target, mask = _prepare(
        "token", logits, doc_scores, target, ignore_index, epsilon, reduction
    )
    loss = rag_marginal_nll(
        z,
        log_prior,
        target,
        mask,
        mask,
        mode="token",
        epsilon=float(epsilon),
        inplace_backward=inplace_backward,
    )
    return _reduce(loss, reduction)


def rag_token_marginal_logprobs(step_logits: Tensor, doc_scores: Tensor) -> Tensor:
    """The RAG-Token next-token distribution log sum_k p(z_k|x) p(v|x, z_k, y_<t), fused (HF's
    RagTokenForGeneration.marginalize).

    step_logits [B*K, V] (one decoding step) or [B*K, T, V]; doc_scores [B, K] unnormalised.
    Returns fp32 [B, V] or [B, T, V] (fp64 for fp64 inputs, computed by the plain-torch reference).
    Differentiable w.r.t. both inputs.
    Plain torch: logsumexp(log_softmax(doc_scores, 1)[:, :, None, None] + log_softmax(logits, -1), 1).
    """
    _check_float("step_logits", step_logits)
    _check_float("doc_scores", doc_scores)
    if step_logits.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"step_logits must be float32/bfloat16/float16 (or float64), got {step_logits.dtype=}")
    if doc_scores.dim() != 2:
        raise ValueError(f"doc_scores must be [B, K], got doc_scores.shape={_shape(doc_scores)}")
    if doc_scores.device != step_logits.device:
        raise ValueError(f"doc_scores is on {doc_scores.device} but step_logits is on {step_logits.device}")
    B, K = doc_scores.shape
    if step_logits.dim() not in (2, 3) or K < 1 or step_logits.shape[0] != B * K:
        raise ValueError(
            f"step_logits must be [B*K, V] or [B*K, T, V] with B*K = {B * K} rows for "
            f"doc_scores.shape={_shape(doc_scores)}, got step_logits.shape={_shape(step_logits)}"
        )
    if step_logits.shape[-1] < 1:
        raise ValueError(f"step_logits needs at least one class, got step_logits.shape={_shape(step_logits)}")
    if B == 0:  # nothing to marginalise (the kernels' [B, K, T, V] view of zero rows has no T)
        acc = torch.float64 if step_logits.dtype == torch.float64 else torch.float32
        shape = (0, step_logits.shape[-1]) if step_logits.dim() == 2 else (0, *step_logits.shape[1:])
        return step_logits.new_zeros(shape, dtype=acc) + doc_scores.sum() * 0 + step_logits.sum() * 0
    check_some_finite_score(doc_scores)
    acc = torch.float64 if doc_scores.dtype == torch.float64 else torch.float32
    return marginal_with_log_prior(step_logits, torch.log_softmax(doc_scores.to(acc), dim=1))


def check_some_finite_score(doc_scores: Tensor) -> None:
    """Every question [B, K] needs a passage with a score above -inf (else its prior is NaN). Reads the scores back
    to the host: a GPU sync, so loops check once."""
    if not torch.compiler.is_compiling() and bool(torch.isneginf(doc_scores).all(dim=1).any()):
        b = int(torch.isneginf(doc_scores).all(dim=1).nonzero()[0, 0])
        raise ValueError(f"doc_scores has no finite passage score for question {b}: every entry is -inf")


def marginal_with_log_prior(step_logits: Tensor, log_prior: Tensor) -> Tensor:
    """rag_token_marginal_logprobs given the passage log-prior log_softmax(doc_scores) [B, K] instead of the
    scores, without the checks: for decoding loops, which check and normalise the scores once rather than at
    every step (the -inf check reads the scores back to the host, a GPU sync per step)."""
    B, K = log_prior.shape
    out = rag_token_marginal(step_logits.reshape(B, K, -1, step_logits.shape[-1]), log_prior)
    return out[:, 0] if step_logits.dim() == 2 else out


class _RagLoss(nn.Module):
    _fn = None

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        epsilon: float = 0.0,
        reduction: str = "mean",
        inplace_backward: bool = False,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction=!r}")
        _check_epsilon(epsilon)
        self.ignore_index, self.epsilon, self.reduction = ignore_index, float(epsilon), reduction
        self.inplace_backward = inplace_backward

    def forward(self, logits: Tensor, doc_scores: Tensor, target: Tensor) -> Tensor:
        return type(self)._fn(
            logits,
            doc_scores,
            target,
            ignore_index=self.ignore_index,
            epsilon=self.epsilon,
            reduction=self.reduction,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, epsilon={self.epsilon}, reduction={self.reduction!r}"


class RagSequenceLoss(_RagLoss):
    """nn.Module twin of rag_sequence_loss: RagSequenceLoss(epsilon=0.1)(logits, doc_scores, target)."""

    _fn = staticmethod(rag_sequence_loss)


class RagTokenLoss(_RagLoss):
    """nn.Module twin of rag_token_loss: RagTokenLoss(epsilon=0.1)(logits, doc_scores, target)."""

    _fn = staticmethod(rag_token_loss)
