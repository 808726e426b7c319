"""Plain-torch reference of every pyrag op: the ground truth for tests and benchmarks, and the fallback
wherever a compiled kernel is missing (e.g. a device pyrag has no kernel for). Written for clarity, not speed:
these functions build the full intermediates that the fused kernels avoid."""

from __future__ import annotations

import torch

# ---- RAG marginalisation losses (owned by pyrag/ops/rag_loss.py) ----
# Computed in fp32 (fp64 when the logits are fp64, for ground truth); they materialise [B, K, T, V] log-probs.


def _rag_acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rag_marginal_nll_reference(
    logits: torch.Tensor,
    log_prior: torch.Tensor,
    target: torch.Tensor,
    nll_mask: torch.Tensor,
    smooth_mask: torch.Tensor,
    *,
    mode: str,
    epsilon: float,
) -> torch.Tensor:
    """Per-question marginal NLL with label smoothing; twin of pyrag.ops.rag_loss.rag_marginal_nll.

    logits [B, K, T, V]; log_prior [B, K] or [B, K, T] (token mode; may hold -inf); target [B, T] int64
    (any value where both masks are 0); nll_mask, smooth_mask [B, T] bool. With l = log_softmax_v(logits):
      sequence: LL = logsumexp_k(p + sum_t m l[y]),        S = logsumexp_k(V p + sum_t s sum_v l)
      token:    LL = sum_t m logsumexp_k(p + l[y]),        S = sum_t s sum_v logsumexp_k(p + l)
    Returns loss [B] = -(1 - epsilon) LL - (epsilon / V) S (fp32, or fp64 for fp64 logits).
    """
    B, K, T, V = logits.shape
    acc = _rag_acc_dtype(logits)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    lp = torch.log_softmax(logits.to(acc), dim=-1)  # [B, K, T, V]
    prior = log_prior.to(acc)
    y = torch.where(nll_mask, target, torch.zeros_like(target))  # ignored positions may hold anything
    ly = lp.gather(-1, y[:, None, :, None].expand(B, K, T, 1)).squeeze(-1)  # [B, K, T]
    ly = torch.where(nll_mask[:, None, :], ly, zero)
    smooth = None
    if mode == "sequence":
        ll = torch.logsumexp(prior + ly.sum(-1), dim=1)  # [B]
        if epsilon > 0:
            sl = torch.where(smooth_mask[:, None, :], lp.sum(-1), zero).sum(-1)  # [B, K]
            smooth = torch.logsumexp(sl + V * prior, dim=1)
    elif mode == "token":
        p = prior if prior.dim() == 3 else prior[:, :, None]  # [B, K, T] or [B, K, 1]
        ll = torch.where(nll_mask, torch.logsumexp(p + ly, dim=1), zero).sum(-1)  # [B]
        if epsilon > 0:
            st = torch.logsumexp(p[..., None] + lp, dim=1).sum(-1)  # [B, T]
            smooth = torch.where(smooth_mask, st, zero).sum(-1)
    else:
        raise ValueError(f"mode must be 'sequence' or 'token', got {mode=!r}")
    loss = -(1.0 - epsilon) * ll
    if smooth is not None:  # skipped at epsilon 0 so an infinite S cannot turn 0 * inf into NaN
        loss = loss - (epsilon / V) * smooth
    return loss


def rag_token_marginal_reference(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """logsumexp_k(log_prior[b, k] + log_softmax_v(logits)[b, k, t, v]) -> [B, T, V] (HF's
    RagTokenForGeneration.marginalize). logits [B, K, T, V]; log_prior [B, K] (or [B, K, T])."""
    acc = _rag_acc_dtype(logits)
    lp = torch.log_softmax(logits.to(acc), dim=-1)
    p = log_prior.to(acc)
    p = p[:, :, None, None] if p.dim() == 2 else p[..., None]
    return torch.logsumexp(p + lp, dim=1)


def _rag_user_loss_reference(mode, logits, doc_scores, target, ignore_index, epsilon, reduction):
    B, K = doc_scores.shape[:2]
    T = target.shape[1]
    z = logits.reshape(B, K, T, logits.shape[-1])
    log_prior = torch.log_softmax(doc_scores.to(_rag_acc_dtype(doc_scores)), dim=1)  # over k (per t if 3-D)
    mask = target != ignore_index
    loss = rag_marginal_nll_reference(z, log_prior, target, mask, mask, mode=mode, epsilon=epsilon)
    if mode == "sequence":  # a question with no counted target contributes nothing (see losses.drop_empty_questions)
        loss = torch.where(mask.any(dim=1), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def rag_sequence_loss_reference(logits, doc_scores, target, *, ignore_index=-100, epsilon=0.0, reduction="mean"):
    """Twin of pyrag.rag_sequence_loss: logits [B*K, T, V] or [B, K, T, V], doc_scores [B, K] (unnormalised),
    target [B, T] with ignore_index; reduction "none" -> [B], "sum", "mean" (over questions)."""
    return _rag_user_loss_reference("sequence", logits, doc_scores, target, ignore_index, epsilon, reduction)


def rag_token_loss_reference(logits, doc_scores, target, *, ignore_index=-100, epsilon=0.0, reduction="mean"):
    """Twin of pyrag.rag_token_loss: as rag_sequence_loss_reference, doc_scores may also be [B, K, T]
    (per-token scores, log_softmax over k at each t)."""
    return _rag_user_loss_reference("token", logits, doc_scores, target, ignore_index, epsilon, reduction)


def rag_token_marginal_logprobs_reference(step_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """Twin of pyrag.rag_token_marginal_logprobs: step_logits [B*K, V] or [B*K, T, V], doc_scores [B, K]
    -> [B, V] or [B, T, V]."""
    B, K = doc_scores.shape
    V = step_logits.shape[-1]
    z = step_logits.reshape(B, K, -1, V)
    out = rag_token_marginal_reference(z, torch.log_softmax(doc_scores.to(_rag_acc_dtype(doc_scores)), dim=1))
    return out[:, 0] if step_logits.dim() == 2 else out  # [B, 1, V] -> [B, V] for one decoding step


# ---- top-k inner-product search (owned by pyrag/ops/topk_ip.py) ----
def topk_ip_reference(
    queries: torch.Tensor, docs: torch.Tensor, k: int, *, doc_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search, the twin of `pyrag.topk_ip` (same semantics and arguments, less the
    `sketch`, which never changes topk_ip's results).

    queries [Q, D] float, docs [N, D] float or int8 (then doc_scale [N]: score = (q . docs[i]) * doc_scale[i]),
    1 <= k <= N. Returns (scores [Q, k] fp32 sorted descending, ids [Q, k] int64), ties -> lower id; a NaN score
    (NaN/inf in the data) ranks as -inf. Builds the whole [Q, N] score matrix in fp32:
    `torch.topk(queries.float() @ docs.float().T, k)` with a deterministic tie order.
    """
    if not 1 <= k <= docs.shape[0]:
        raise ValueError(f"k must be in [1, N]: k={k}, N={docs.shape[0]}")
    scores = queries.float() @ docs.float().T
    if doc_scale is not None:
        scores = scores * doc_scale.float()[None, :]
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    # A stable descending sort keeps equal scores in id order, which is the tie rule torch.topk does not promise.
    scores, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :k].contiguous(), ids[:, :k].contiguous()
