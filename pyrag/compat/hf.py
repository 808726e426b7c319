"""HF-transformers-compatible RAG losses on pyrag's fused ops: the exact maths (quirks included) of
RagSequenceForGeneration.get_nll, RagTokenForGeneration.get_nll and RagTokenForGeneration.marginalize."""

from __future__ import annotations

import math
import numbers

import torch

from ..ops.rag_loss import rag_marginal_nll, rag_token_marginal

__all__ = ["hf_rag_sequence_nll", "hf_rag_token_marginalize", "hf_rag_token_nll"]

# float64 runs the plain-torch reference (pyrag.reference), as in the user API: HF models in .double() keep working.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _log_prior(doc_scores: torch.Tensor, seq_logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the passages in fp32 (the kernels' precision), fp64 where either input is fp64."""
    wide = torch.float64 in (doc_scores.dtype, seq_logits.dtype)
    return torch.log_softmax(doc_scores.to(torch.float64 if wide else torch.float32), dim=1)


def _hf_dtype(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.dtype:
    """The dtype HF's result has: that of log_softmax(seq_logits) combined with log_softmax(doc_scores), asked of
    torch on empty tensors so autocast's rule for the device applies (CUDA autocast runs log_softmax in fp32, so HF
    returns an fp32 loss from bf16 logits there)."""
    def lsm(x):
        return torch.log_softmax(x.new_empty((0,)), dim=-1).dtype
    return torch.promote_types(lsm(seq_logits), lsm(doc_scores))


def _scalar(x):
    """HF also takes 0-d tensors for n_docs and epsilon (e.g. read from a config tensor): their Python value."""
    return x.item() if isinstance(x, torch.Tensor) and x.dim() == 0 else x


def hf_rag_sequence_nll(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, *,
                        pad_token_id: int, bos_token_id: int | None = None, n_docs: int,
                        reduce_loss: bool = False, epsilon: float = 0.0,
                        exclude_bos_score: bool = False) -> torch.Tensor:
    """RAG-Sequence NLL exactly as transformers' ``RagSequenceForGeneration.get_nll``, fused.

    seq_logits [B*K, T, V] (fp32/bf16/fp16; K = n_docs), doc_scores [B, K] unnormalised, target [B, T] the
    *decoder inputs* (HF shifts them left and appends pad_token_id). Returns loss [B] (or a scalar when
    reduce_loss), in the dtype HF would return (that of its log_softmax outputs: the inputs' promoted dtype, or
    fp32 under CUDA autocast).

    HF's quirks, reproduced:
      - y = cat(target[:, 1:], pad); positions where y == pad_token_id contribute nothing (nll and smoothing).
      - the passage log-prior log_softmax(doc_scores) is added at target position 1 only, so a sequence gets
        no prior when T == 1 or when its y[:, 1] is padding (then HF's logsumexp over passages sums the
        unweighted likelihoods).
      - exclude_bos_score drops position 0 from the nll term (never from smoothing) only when bos_token_id is
        not None and *every* row has y[:, 0] == bos_token_id.
      - smoothing S = logsumexp_k(sum_t sum_v (l + prior at t=1)); loss = (1-eps)*nll + (eps/V)*(-S);
        reduce_loss sums over the batch.

    Replaces (plain torch, builds several [B, K, T, V] tensors)::

        lp = log_softmax(seq_logits, -1).view(B, K, T, V); lp[:, :, 1] += log_softmax(doc_scores, 1)[..., None]
        ll = lp.gather(-1, y)  masked, summed over t, logsumexp over k; smooth likewise over lp.sum(-1)

    Differences from HF: with epsilon == 0 a non-finite smoothing sum (logits with -inf) gives HF NaN
    (0 * inf); pyrag skips the unused term and returns the finite loss. epsilon must lie in [0, 1) (HF computes
    any value, which outside that range is no longer label smoothing). Higher-order gradients (create_graph)
    are computed by the plain-torch reference.
    """
    B, K, T, V, y, out_dtype = _prepare(seq_logits, doc_scores, target, pad_token_id, bos_token_id, n_docs,
                                        epsilon)
    not_pad = y.ne(pad_token_id)
    nll_mask = not_pad
    if exclude_bos_score and bos_token_id is not None:
        # HF's use_bos is a batch-wide all(); kept as a tensor so no host sync is needed.
        use_bos = y[:, 0].eq(bos_token_id).all()
        first = torch.zeros_like(not_pad)
        first[:, 0] = use_bos
        nll_mask = not_pad & ~first
    log_prior = _log_prior(doc_scores, seq_logits)
    # The prior rides on position 1: absent when T == 1 or when that position is padding. Gated with where
    # (not a multiply) so a -inf prior of a gated-off row never turns into NaN.
    gate = not_pad[:, 1:2] if T >= 2 else torch.zeros(B, 1, dtype=torch.bool, device=y.device)
    log_prior = torch.where(gate, log_prior, torch.zeros((), dtype=log_prior.dtype, device=log_prior.device))
    loss = rag_marginal_nll(_as_bktv(seq_logits, B, K, T, V), log_prior, y, nll_mask, not_pad,
                            mode="sequence", epsilon=float(epsilon))
    if reduce_loss:
        loss = loss.sum()
    return loss.to(out_dtype)


def hf_rag_token_nll(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, *,
                     pad_token_id: int, bos_token_id: int | None = None, n_docs: int,
                     reduce_loss: bool = False, epsilon: float = 0.0,
                     exclude_bos_score: bool = False) -> torch.Tensor:
    """RAG-Token NLL exactly as transformers' ``RagTokenForGeneration.get_nll``, fused.

    seq_logits [B*K, T, V] (fp32/bf16/fp16; K = n_docs), doc_scores [B, K] unnormalised, target [B, T]
    (HF's RagTokenForGeneration.forward passes the labels; get_nll shifts them left and appends pad).
    Returns loss [B] (or a scalar when reduce_loss) in the dtype HF would return (see hf_rag_sequence_nll).

    Computes, with y = cat(target[:, 1:], pad) and m = (y != pad_token_id)::

        r[b,t,v] = logsumexp_k(log_softmax(doc_scores)[b,k] + log_softmax(seq_logits)[b,k,t,v])  (marginalize)
        loss[b]  = -(1-eps) * sum_t m r[b,t,y] - (eps/V) * sum_t m sum_v r[b,t,v]

    ``bos_token_id`` and ``exclude_bos_score`` are accepted only so both hf_* functions share one signature:
    the installed transformers' RagTokenForGeneration.get_nll has no BOS exclusion, so neither changes the
    result (HF-identical behaviour). Differences from HF: as hf_rag_sequence_nll (finite loss where HF's
    unused smoothing term would be 0 * inf = NaN).
    """
    del bos_token_id, exclude_bos_score  # HF's RAG-Token loss ignores BOS (see docstring)
    B, K, T, V, y, out_dtype = _prepare(seq_logits, doc_scores, target, pad_token_id, None, n_docs, epsilon)
    not_pad = y.ne(pad_token_id)
    log_prior = _log_prior(doc_scores, seq_logits)
    loss = rag_marginal_nll(_as_bktv(seq_logits, B, K, T, V), log_prior, y, not_pad, not_pad,
                            mode="token", epsilon=float(epsilon))
    if reduce_loss:
        loss = loss.sum()
    return loss.to(out_dtype)


def hf_rag_token_marginalize(seq_logits: torch.Tensor, doc_scores: torch.Tensor, *, n_docs: int) -> torch.Tensor:
    """``RagTokenForGeneration.marginalize``, fused: seq_logits [B*K, T, V] (or [B*K, V], one step) and
    doc_scores [B, K] -> [B, T, V] (T = 1 for 2-D input, as HF's view gives) =
    logsumexp_k(log_softmax(doc_scores, 1)[b,k] + log_softmax(seq_logits, -1)[b,k,t,v]),
    in the dtype HF's would have (see hf_rag_sequence_nll)."""
    _check_logits(seq_logits, allowed_dims=(2, 3))
    K = _check_n_docs(_scalar(n_docs), seq_logits)
    B, V = seq_logits.shape[0] // K, seq_logits.shape[-1]
    T = seq_logits.shape[1] if seq_logits.dim() == 3 else 1
    _check_doc_scores(doc_scores, seq_logits, B, K)
    log_prior = _log_prior(doc_scores, seq_logits)
    out = rag_token_marginal(_as_bktv(seq_logits, B, K, T, V), log_prior)
    return out.to(_hf_dtype(seq_logits, doc_scores))


# ---- input hygiene (HF would fail deep inside a view/gather, or silently mis-shape; we name the argument) ----

def _prepare(seq_logits, doc_scores, target, pad_token_id, bos_token_id, n_docs, epsilon):
    """Checks every argument and returns (B, K, T, V, y, out_dtype) with y [B, T] int64 the left-shifted target."""
    _check_logits(seq_logits, allowed_dims=(3,))
    K = _check_n_docs(_scalar(n_docs), seq_logits)
    epsilon = _scalar(epsilon)
    N, T, V = seq_logits.shape
    B = N // K
    _check_doc_scores(doc_scores, seq_logits, B, K)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of token ids [B, T], got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got {target.dtype=}")
    if target.shape != (B, T):
        raise ValueError(f"target must be [B, T] = [{B}, {T}] to match seq_logits [B*K, T, V] with n_docs={K}; "
                         f"got {target.shape=} ({seq_logits.shape=})")
    if target.device != seq_logits.device:
        raise ValueError(f"target and seq_logits must be on one device, got {target.device=} and "
                         f"{seq_logits.device=}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an int (HF appends it after the left shift), got {pad_token_id=}")
    if not 0 <= pad_token_id < V:
        raise ValueError(f"pad_token_id must be a token id in [0, V={V}), got {pad_token_id=}")
    if bos_token_id is not None and (isinstance(bos_token_id, bool) or not isinstance(bos_token_id, numbers.Integral)):
        raise TypeError(f"bos_token_id must be an int or None, got {bos_token_id=}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or math.isnan(epsilon):
        raise TypeError(f"epsilon must be a real number (label smoothing), got {epsilon=}")
    if not 0.0 <= epsilon < 1.0:  # HF computes any value; outside [0, 1) it is no longer label smoothing
        raise ValueError(f"epsilon must be in [0, 1) (label smoothing), got {epsilon=}")
    # HF gathers at every shifted position (padding included), so any id outside [0, V) is an error there too;
    # target[:, 0] is dropped by the shift and may hold anything.
    shifted = target[:, 1:]
    if shifted.numel() and bool(((shifted < 0) | (shifted >= V)).any()):
        bad = ((shifted < 0) | (shifted >= V)).nonzero()[0]
        b, t = int(bad[0]), int(bad[1]) + 1
        raise ValueError(f"target ids must lie in [0, V={V}); target[{b}, {t}] = {int(target[b, t])}")
    y = torch.cat([shifted, target.new_full((B, 1), pad_token_id)], dim=1).long()
    return B, K, T, V, y, _hf_dtype(seq_logits, doc_scores)


def _check_logits(seq_logits, allowed_dims):
    if not isinstance(seq_logits, torch.Tensor):
        raise TypeError(f"seq_logits must be a torch.Tensor, got {type(seq_logits).__name__}")
    if seq_logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"seq_logits must be float32, float16, bfloat16 or float64, got {seq_logits.dtype=}")
    if seq_logits.dim() not in allowed_dims:
        want = " or ".join({2: "[B*K, V]", 3: "[B*K, T, V]"}[d] for d in allowed_dims)
        raise ValueError(f"seq_logits must be {want}, got {seq_logits.shape=}")
    if seq_logits.shape[-1] == 0:
        raise ValueError(f"seq_logits needs a non-empty vocabulary dimension, got {seq_logits.shape=}")


def _check_n_docs(n_docs, seq_logits) -> int:
    if isinstance(n_docs, bool) or not isinstance(n_docs, numbers.Integral) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs=}")
    if seq_logits.shape[0] % n_docs:
        raise ValueError(f"seq_logits.shape[0] = B*K must be divisible by n_docs={n_docs}, "
                         f"got {seq_logits.shape=}")
    return int(n_docs)


def _check_doc_scores(doc_scores, seq_logits, B, K):
    if not isinstance(doc_scores, torch.Tensor):
        raise TypeError(f"doc_scores must be a torch.Tensor [B, K], got {type(doc_scores).__name__}")
    if not doc_scores.dtype.is_floating_point:
        raise TypeError(f"doc_scores must be floating point, got {doc_scores.dtype=}")
    if doc_scores.shape != (B, K):
        raise ValueError(f"doc_scores must be [B, K] = [{B}, {K}] (seq_logits {tuple(seq_logits.shape)} with "
                         f"n_docs={K}), got {doc_scores.shape=}")
    if doc_scores.device != seq_logits.device:
        raise ValueError(f"doc_scores and seq_logits must be on one device, got {doc_scores.device=} and "
                         f"{seq_logits.device=}")


def _as_bktv(seq_logits, B, K, T, V):
    """HF's [B*K, T, V] as the op's [B, K, T, V] view (a copy only when the caller's tensor is strided)."""
    return seq_logits.reshape(B, K, T, V).contiguous()
