"""RagSequence / RagToken: a trainable question encoder, a frozen knowledge base (stored passage vectors + index)
and an HF generator, trained through pyrag's fused marginal losses; HF's "external retrieval" path (precomputed
context_input_ids + doc_scores) for one-to-one comparison; batched decoding; save/load (the KB referenced by path)."""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..kb_io import atomic_dir
from ..losses import check_some_finite_score
from .decoding import DecodeSettings, rag_sequence_decode, rag_token_decode
from .generator import CausalGenerator, InputFormat, Seq2SeqGenerator, _check_texts, load_generator
from .lean_activations import lean_activations

__all__ = ["CONFIG_NAME", "RagGeneration", "RagModel", "RagOutput", "RagSequence", "RagToken"]

CONFIG_NAME = "pyrag_rag.json"
FORMAT = "pyrag-rag"
VERSION = 1
_REDUCTIONS = ("mean", "sum", "none")


@dataclass
class RagOutput:
    """loss: reduced as asked (scalar, or [B] for "none"); per_question_loss [B]; doc_scores [B, K] (q . d, with
    gradient to the question encoder); doc_posterior [B, K] = p(z_k | x, y) ∝ p(z_k|x) prod_t p(y_t|x,z_k,y_<t)
    (no gradient; None when not asked for); logits [B*K, T, V], or None when they were never built whole (over
    model.head_chunk_bytes, 128 MiB by default, the loss projects a few questions at a time); rows [B, K] KB rows
    and the passages' ids,
    titles, texts (None on the precomputed-context path)."""

    loss: torch.Tensor
    per_question_loss: torch.Tensor
    doc_scores: torch.Tensor
    doc_posterior: torch.Tensor | None
    logits: torch.Tensor
    rows: torch.Tensor | None = None
    ids: list | None = None
    titles: list | None = None
    texts: list | None = None


@dataclass
class RagGeneration:
    """answers (decoded text), sequences [B, L] token ids (decoder prompt included, pad-padded), lengths [B],
    scores [B] = log p(answer | question), marginal over the passages, summed over the answer's tokens (RagToken:
    sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y_<t) -- greedy sums the model's log-probs; beam search, like HF's, sums
    them after the logits processors, so a forced BOS/EOS counts 0 -- and beam search also reports HF's
    length-normalised beam score (sequences_scores) in extra["beam_scores"]. RagSequence: log sum_k
    p(z_k|x) p(y|x,z_k), "thorough" with the first forced BOS excluded as HF's exclude_bos_score; "fast" decoding
    counts only the passages whose beam held y, with p(y|x,z_k) that beam's own log-likelihood, BOS included, so
    its scores are not comparable with thorough's), doc_scores / doc_prior [B, K] (p(z|x)), and the passages used: rows [B, K], ids,
    titles, texts."""

    answers: list[str]
    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    doc_scores: torch.Tensor
    doc_prior: torch.Tensor
    rows: torch.Tensor | None = None
    ids: list | None = None
    titles: list | None = None
    texts: list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class _Retrieved:
    q: torch.Tensor
    doc_scores: torch.Tensor
    rows: torch.Tensor
    ids: list
    titles: list
    texts: list


def _check_context(ctx_ids, ctx_mask, doc_scores) -> tuple[int, int]:
    """HF's precomputed path: context_input_ids / context_attention_mask [B*K, L] token ids and mask, doc_scores
    [B, K] with at least one finite score per question and no NaN / +inf (-inf marks a passage to ignore).
    Returns (B, K)."""
    for name, t in (("context_input_ids", ctx_ids), ("context_attention_mask", ctx_mask), ("doc_scores", doc_scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if doc_scores.dim() != 2 or not doc_scores.is_floating_point():
        raise ValueError(f"doc_scores must be a float tensor [B, K], got {doc_scores.shape=} {doc_scores.dtype=}")
    B, K = doc_scores.shape
    if ctx_ids.dim() != 2 or ctx_ids.shape[0] != B * K or ctx_mask.shape != ctx_ids.shape:
        raise ValueError(f"context_input_ids / context_attention_mask must be [B*K, L] = [{B * K}, L] for "
                         f"{doc_scores.shape=}, got {ctx_ids.shape=} {ctx_mask.shape=}")
    if ctx_ids.is_floating_point() or ctx_ids.dtype == torch.bool:
        raise TypeError(f"context_input_ids must hold integer token ids, got {ctx_ids.dtype=}")
    bad = torch.isnan(doc_scores) | torch.isposinf(doc_scores)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"doc_scores[{b}, {k}] = {doc_scores[b, k].item()}: scores must be finite (or -inf to "
                         f"leave a passage out)")
    check_some_finite_score(doc_scores)
    return B, K


class RagModel(nn.Module):
    """Shared base of RagToken and RagSequence (mode "token" | "sequence").

    question_encoder: a pyrag Encoder (trainable; tokenize(), forward(ids, mask) -> [B, D]); generator: a
    Seq2SeqGenerator or CausalGenerator; kb: a KnowledgeBase (frozen: its stored vectors give the passage side of
    the scores, so only the question encoder learns) or None for the precomputed-context path only."""

    mode = "base"

    def __init__(self, question_encoder: nn.Module | None, generator: Seq2SeqGenerator | CausalGenerator, kb=None,
                 *, n_docs: int = 5, label_smoothing: float = 0.0, exclude_bos_score: bool = False,
                 generation: dict | None = None):
        super().__init__()
        if self.mode not in ("token", "sequence"):
            raise TypeError("use RagToken or RagSequence (or RagModel.from_pretrained)")
        if not isinstance(generator, (Seq2SeqGenerator, CausalGenerator)):
            raise TypeError(f"generator must be a Seq2SeqGenerator or CausalGenerator (see load_generator), got "
                            f"{type(generator).__name__}")
        if not isinstance(n_docs, int) or n_docs < 1:
            raise ValueError(f"n_docs must be a positive int, got {n_docs=}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing=}")
        self.question_encoder = question_encoder
        self.generator = generator
        self.n_docs = n_docs
        self.label_smoothing = float(label_smoothing)
        self.exclude_bos_score = bool(exclude_bos_score)
        self.generation = dict(generation or {})
        # logits larger than this are never built whole: the loss projects a few questions at a time (see _logits).
        # Each chunk's logits sit on top of all activations at the start of backward; 128 MiB keeps BART-large's
        # K=10, 40-token chunks to one question each (~0.6 GiB less peak than 512 MiB; each chunk's GEMM is still
        # [K*T, d] x [d, V], large enough to keep the GPU busy)
        self.head_chunk_bytes = 128 << 20
        # training forwards keep fewer activations for backward, same numbers (lean_activations.py); False: plain
        # autograd (it costs a few microseconds of Python per torch call, which only tiny models notice)
        self.use_lean_activations = True
        self.kb = None
        if kb is not None:
            self.set_kb(kb)

    # ---- construction ----
    @classmethod
    def from_parts(cls, question_encoder, generator, kb, n_docs: int = 5, *, tokenizer=None,
                   generator_kind: str | None = None, title_sep: str = " / ", doc_sep: str = " // ",
                   prefix: str | None = None, max_combined_length: int = 300, max_answer_length: int | None = None,
                   answer_prompt: str = " answer:", **kwargs) -> RagModel:
        """Assemble a model. question_encoder: an Encoder, or None for a trainable copy of the KB's encoder;
        generator: a local HF directory (AutoModelForSeq2SeqLM / AutoModelForCausalLM, with its tokenizer) or
        a model object plus tokenizer=...; kb: a KnowledgeBase, its directory, or None (precomputed contexts
        only). The input format fields mean what HF's RagConfig fields of the same names mean; prefix
        defaults to the generator config's `prefix` (as HF's retriever takes it)."""
        if kb is not None and not hasattr(kb, "search"):
            from ..kb import KnowledgeBase

            kb = KnowledgeBase.open(kb)
        if question_encoder is None:
            if kb is None:
                raise ValueError("question_encoder=None needs a kb to copy the encoder from")
            question_encoder = copy.deepcopy(kb.encoder)
        fmt = InputFormat(title_sep=title_sep, doc_sep=doc_sep, prefix=prefix,
                          max_combined_length=max_combined_length, answer_prompt=answer_prompt)
        gen = load_generator(generator, tokenizer, fmt, generator_kind, max_answer_length=max_answer_length)
        if prefix is None:  # as HF's retriever: the generator config's prefix (T5 task prefixes)
            gen.fmt.prefix = getattr(gen.model.config, "prefix", None)
        return cls(question_encoder, gen, kb, n_docs=n_docs, **kwargs)

    def set_kb(self, kb) -> None:
        """Attach a knowledge base, checking that the question encoder fits it (dimension, pooling, norm)."""
        if not hasattr(kb, "search") or not hasattr(kb, "dim"):
            raise TypeError(f"kb must be a KnowledgeBase, got {type(kb).__name__}")
        qe = self.question_encoder
        qdim = getattr(qe, "dim", None)
        if qdim is not None and qdim != kb.dim:
            raise ValueError(f"KB/encoder mismatch: the question encoder gives {qdim}-dim vectors, the knowledge "
                             f"base {getattr(kb, 'path', '')} holds {kb.dim}-dim passage vectors")
        rec = (getattr(kb, "meta", None) or {}).get("question_encoder") or {}
        for key in ("pooling", "normalize"):
            if key in rec and hasattr(qe, key) and getattr(qe, key) != rec[key]:
                raise ValueError(f"KB/encoder mismatch: the knowledge base {getattr(kb, 'path', '')} was built for "
                                 f"a question encoder with {key}={rec[key]!r}, this one has "
                                 f"{key}={getattr(qe, key)!r}")
        self.kb = kb

    # ---- retrieval ----
    def _k(self, n_docs: int | None) -> int:
        K = self.n_docs if n_docs is None else n_docs
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"n_docs must be a positive int, got {K!r}")
        if self.kb is not None and K > len(self.kb):
            raise ValueError(f"n_docs={K} is larger than the knowledge base ({len(self.kb)} passages)")
        return K

    def retrieve(self, questions: list[str], n_docs: int | None = None) -> _Retrieved:
        """Encode the questions (with gradient), take the top-K passages from the KB, and score them as q . d
        against the stored passage vectors, so the scores carry the question encoder's gradient."""
        if self.kb is None:
            raise ValueError("this model has no knowledge base: pass kb= (or use context_input_ids + doc_scores)")
        if self.question_encoder is None:
            raise ValueError("this model has no question encoder")
        questions = _check_texts("questions", questions)
        K = self._k(n_docs)
        toks = self.question_encoder.tokenize(questions)
        q = self.question_encoder(toks["input_ids"], toks["attention_mask"]).float()  # [B, D]
        with torch.no_grad():
            dev = getattr(self.kb.index, "device", q.device)
            res = self.kb.search(q.detach().to(dev), K)
        vecs = res.vectors.to(device=q.device, dtype=torch.float32)  # [B, K, D]
        with torch.autocast(q.device.type, enabled=False):  # scores in fp32 even under bf16 autocast
            doc_scores = torch.einsum("bd,bkd->bk", q, vecs)
        return _Retrieved(q, doc_scores, res.rows.to(q.device), res.ids, res.titles, res.texts)

    # ---- training forward ----
    def forward(self, questions: list[str] | None = None, answers: list[str] | None = None, *,
                context_input_ids: torch.Tensor | None = None, context_attention_mask: torch.Tensor | None = None,
                doc_scores: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                n_docs: int | None = None, epsilon: float | None = None, exclude_bos_score: bool | None = None,
                reduction: str = "mean", return_posterior: bool = True, inplace_backward: bool = False) -> RagOutput:
        """Marginal negative log-likelihood of the answers.

        Text path: forward(questions [B], answers [B]) retrieves K passages per question, builds the B*K
        generator inputs "title / text // question" (padded to the batch's longest row) and the answer targets
        (BART: <s> answer </s> after the decoder start token), and returns the fused RAG loss.
        HF path (precomputed, as HF's RagSequenceForGeneration / RagTokenForGeneration forward with
        context_input_ids): context_input_ids / context_attention_mask [B*K, L], doc_scores [B, K] (with grad),
        labels [B, T] = HF's decoder inputs (they start with the decoder start token; targets are labels shifted
        left, pad masked) — same loss as HF's get_nll, including its exclude_bos_score rule (sequence mode).
        epsilon: label smoothing (default: the model's); reduction: "mean" | "sum" | "none" (over questions).
        inplace_backward=True lets the fused loss write its gradient into the logits' buffer during backward (one
        [B*K, T, V] allocation less; RagOutput.logits is garbage after backward then)."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction=!r}")
        # keeps fewer activations for backward (shared autocast casts, no GELU outputs), same numbers: lean_activations.py
        with lean_activations(self.generator.device) if self.use_lean_activations else nullcontext():
            return self._forward(questions, answers, context_input_ids, context_attention_mask, doc_scores, labels,
                                 n_docs, epsilon, exclude_bos_score, reduction, return_posterior, inplace_backward)

    def _forward(self, questions, answers, context_input_ids, context_attention_mask, doc_scores, labels, n_docs,
                 epsilon, exclude_bos_score, reduction, return_posterior, inplace_backward) -> RagOutput:
        eps = self.label_smoothing if epsilon is None else float(epsilon)
        excl = self.exclude_bos_score if exclude_bos_score is None else bool(exclude_bos_score)
        gen = self.generator
        if context_input_ids is not None or labels is not None or doc_scores is not None:
            return self._forward_precomputed(context_input_ids, context_attention_mask, doc_scores, labels, eps,
                                             excl, reduction, return_posterior, inplace_backward)
        if questions is None or answers is None:
            raise ValueError("forward needs questions and answers (or context_input_ids, doc_scores and labels)")
        questions = _check_texts("questions", questions)
        answers = _check_texts("answers", answers)
        if len(questions) != len(answers):
            raise ValueError(f"questions and answers differ in length: {len(questions)=} {len(answers)=}")
        dec_in, target = gen.encode_answers(answers)  # [B, T]
        r = self.retrieve(questions, n_docs)
        K = r.doc_scores.shape[1]
        ids, mask = gen.build_inputs(questions, r.titles, r.texts)
        logits = self._logits(ids, mask, dec_in.repeat_interleave(K, dim=0), K)  # [B*K, T, V] or (hidden, head)
        valid = target != -100
        nll_mask = valid.clone()
        if excl and gen.bos_token_id is not None:
            nll_mask[:, 0] &= target[:, 0] != gen.bos_token_id
        log_prior = torch.log_softmax(r.doc_scores, dim=1)
        out = self._loss(logits, log_prior, target.clamp(min=0), nll_mask, valid, eps, reduction, return_posterior,
                         inplace_backward)
        out.doc_scores = r.doc_scores
        out.rows, out.ids, out.titles, out.texts = r.rows, r.ids, r.titles, r.texts
        return out

    def _forward_precomputed(self, ctx_ids, ctx_mask, doc_scores, labels, eps, excl, reduction, posterior,
                             inplace_backward=False):
        if ctx_ids is None or ctx_mask is None or doc_scores is None or labels is None:
            raise ValueError("the precomputed path needs context_input_ids, context_attention_mask, doc_scores and "
                             "labels together")
        gen = self.generator
        if not isinstance(gen, Seq2SeqGenerator):
            raise TypeError("the precomputed-context path (HF's) is for seq2seq generators")
        B, K = _check_context(ctx_ids, ctx_mask, doc_scores)
        gen.check_lengths(ctx_ids)
        if labels.dim() != 2 or labels.shape[0] != B:
            raise ValueError(f"labels must be [B, T] with B={B}, got {labels.shape=}")
        if bool((labels < 0).any()):
            raise ValueError("labels are HF's decoder inputs: token ids padded with the pad token, not -100")
        pad = gen.pad_token_id
        logits = self._logits(ctx_ids, ctx_mask.bool(), labels.repeat_interleave(K, dim=0), K)
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], pad)], 1)
        valid = target != pad
        nll_mask = valid.clone()
        log_prior = torch.log_softmax(doc_scores.float(), dim=1)
        if self.mode == "sequence":
            bos = gen.bos_token_id
            if excl and bos is not None and bool((target[:, 0] == bos).all()):
                nll_mask[:, 0] = False
            # HF adds the passage prior to the token at position 1, so it vanishes where that position is padding
            has_prior = valid[:, 1:2] if target.shape[1] > 1 else torch.zeros_like(valid[:, :1])
            log_prior = torch.where(has_prior, log_prior, torch.zeros_like(log_prior))
        elif excl and gen.bos_token_id is not None:
            nll_mask[:, 0] &= target[:, 0] != gen.bos_token_id
        out = self._loss(logits, log_prior, target, nll_mask, valid, eps, reduction, posterior, inplace_backward)
        out.doc_scores = doc_scores
        return out

    def _logits(self, ids, mask, dec, K):
        """The logits [B*K, T, V], or (decoder hidden [B*K, T, d], head) when they would take more than
        head_chunk_bytes (then the loss projects a few questions at a time and recomputes them in backward)."""
        gen = self.generator
        N, T = dec.shape
        if N * T * gen.vocab_size * 4 > self.head_chunk_bytes and isinstance(gen, Seq2SeqGenerator):
            split = gen.decoder_hidden(ids, mask, dec)
            if split is not None:
                return split
        return gen(ids, mask, dec)

    def _loss(self, logits, log_prior, target, nll_mask, smooth_mask, eps, reduction, posterior,
              inplace_backward=False) -> RagOutput:
        from ..ops.rag_loss import rag_marginal_nll

        B, K = log_prior.shape
        T = target.shape[1]
        if isinstance(logits, tuple):
            per_q, post = self._chunked_loss(*logits, log_prior, target, nll_mask, smooth_mask, eps, posterior)
            logits = None
        else:
            z = logits.reshape(B, K, T, logits.shape[-1])
            per_q = rag_marginal_nll(z, log_prior.contiguous(), target, nll_mask, smooth_mask, mode=self.mode,
                                     epsilon=eps, inplace_backward=inplace_backward)
            post = _sequence_posterior(logits, target, nll_mask, log_prior) if posterior else None
        loss = per_q if reduction == "none" else (per_q.sum() if reduction == "sum" else per_q.mean())
        return RagOutput(loss=loss, per_question_loss=per_q, doc_scores=log_prior, doc_posterior=post,
                         logits=logits)

    def _chunked_loss(self, hidden, head, log_prior, target, nll_mask, smooth_mask, eps, posterior):
        """The fused loss over a few questions at a time: each chunk's logits are made from the decoder hidden
        states, used, and dropped; backward recomputes them (activation checkpointing), so at most one chunk of
        [b, K, T, V] logits exists at any time instead of all B of them."""
        from torch.utils.checkpoint import checkpoint

        from ..ops.rag_loss import rag_marginal_nll

        B, K = log_prior.shape
        T = target.shape[1]
        V = self.generator.vocab_size
        step = max(1, self.head_chunk_bytes // max(1, K * T * V * 4))
        mode = self.mode

        def chunk(h, prior, y, m, sm):
            z = head(h)  # [b*K, T, V]
            b = prior.shape[0]
            loss = rag_marginal_nll(z.reshape(b, K, T, V), prior.contiguous(), y, m, sm, mode=mode, epsilon=eps,
                                    inplace_backward=True)  # z lives only inside this chunk
            ll = _token_ll(z, y, m, K) if posterior else torch.zeros(b, K, device=z.device)
            return loss, ll

        losses, lls = [], []
        for s in range(0, B, step):
            e = min(B, s + step)
            args = (hidden[s * K:e * K], log_prior[s:e], target[s:e], nll_mask[s:e], smooth_mask[s:e])
            loss, ll = checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args)
            losses.append(loss)
            lls.append(ll)
        per_q = torch.cat(losses)
        post = torch.softmax(log_prior.detach().float() + torch.cat(lls), dim=1) if posterior else None
        return per_q, post

    @torch.no_grad()
    def passage_posterior(self, questions: list[str], answers: list[str], n_docs: int | None = None) -> RagOutput:
        """forward without gradient: the retrieved passages with p(z|x) (softmax of doc_scores) and p(z|x,y)."""
        was = self.training
        self.eval()
        try:
            return self.forward(questions, answers, n_docs=n_docs, reduction="none")
        finally:
            self.train(was)

    # ---- generation ----
    def _settings(self, max_new_tokens: int, min_new_tokens: int, overrides: dict) -> DecodeSettings:
        gen = self.generator
        gcfg = getattr(gen.model, "generation_config", None)
        p0 = gen.decoder_prompt(1).shape[1]
        base = {"forced_bos_token_id": None, "forced_eos_token_id": None, "length_penalty": 1.0,
                "early_stopping": False, "no_repeat_ngram_size": 0}
        if isinstance(gen, Seq2SeqGenerator) and gcfg is not None:
            for key in base:
                v = getattr(gcfg, key, None)
                if v is not None:
                    base[key] = v
        base.update(self.generation)
        unknown = set(overrides) - set(base)
        if unknown:
            raise TypeError(f"generate got unknown settings {sorted(unknown)}; known: {sorted(base)}")
        base.update(overrides)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int)
                or not 0 <= min_new_tokens <= max_new_tokens):
            raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], got "
                             f"{min_new_tokens!r}")
        return DecodeSettings(max_length=p0 + max_new_tokens, min_length=p0 + min_new_tokens if min_new_tokens else 0,
                              eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                              no_repeat_ngram_size=int(base["no_repeat_ngram_size"] or 0), **{
                                  k: base[k] for k in ("forced_bos_token_id", "forced_eos_token_id",
                                                       "length_penalty", "early_stopping")})

    @torch.no_grad()
    def generate(self, questions: list[str] | None = None, *, num_beams: int = 4, max_new_tokens: int = 32,
                 min_new_tokens: int = 0, n_docs: int | None = None, decoding: str | None = None,
                 context_input_ids: torch.Tensor | None = None, context_attention_mask: torch.Tensor | None = None,
                 doc_scores: torch.Tensor | None = None, **settings) -> RagGeneration:
        """Answer B questions at once: retrieve n_docs passages each (may differ from training), decode.

        RagToken: greedy (num_beams=1) or beam search over the marginal next-token distribution.
        RagSequence: decoding="thorough" (beam per passage, every hypothesis re-scored under all passages) or
        "fast" (no re-scoring). Or give context_input_ids [B*K, L], context_attention_mask and doc_scores [B, K]
        instead of questions (HF's precomputed path). settings: forced_bos_token_id, forced_eos_token_id,
        length_penalty, early_stopping, no_repeat_ngram_size (default: the generator's generation_config).
        Runs in eval mode (dropout off) and restores the previous mode."""
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        s = self._settings(max_new_tokens, min_new_tokens, settings)
        was = self.training
        self.eval()
        try:
            r = None
            if questions is not None:
                if context_input_ids is not None or doc_scores is not None:
                    raise ValueError("give either questions or context_input_ids + doc_scores, not both")
                r = self.retrieve(questions, n_docs)
                ids, mask = self.generator.build_inputs(list(questions), r.titles, r.texts)
                scores = r.doc_scores
            else:
                if context_input_ids is None or context_attention_mask is None or doc_scores is None:
                    raise ValueError("generate needs questions, or context_input_ids, context_attention_mask and "
                                     "doc_scores")
                _check_context(context_input_ids, context_attention_mask, doc_scores)
                ids, mask, scores = context_input_ids, context_attention_mask.bool(), doc_scores.float()
            self.generator.check_lengths(ids, max_new_tokens)
            res = self._decode(ids, mask, scores, s, num_beams, decoding)
        finally:
            self.train(was)
        tok = self.generator.tokenizer
        answers = [a.strip() for a in tok.batch_decode(res.sequences, skip_special_tokens=True)]
        out = RagGeneration(answers=answers, sequences=res.sequences, lengths=res.lengths, scores=res.scores,
                            doc_scores=scores, doc_prior=torch.softmax(scores.float(), dim=1), extra=res.extra)
        if r is not None:
            out.rows, out.ids, out.titles, out.texts = r.rows, r.ids, r.titles, r.texts
        return out

    def _decode(self, ids, mask, scores, s, num_beams, decoding):
        if self.mode == "token":
            if decoding not in (None, "greedy", "beam"):
                raise ValueError(f"RagToken decodes with greedy / beam search only; decoding={decoding!r} is for "
                                 f"RagSequence")
            return rag_token_decode(self.generator, ids, mask, scores, s, num_beams=num_beams)
        return rag_sequence_decode(self.generator, ids, mask, scores, s, num_beams=num_beams,
                                   decoding=decoding or "thorough")

    # ---- saving / loading ----
    def config_dict(self) -> dict:
        kb_path = getattr(self.kb, "path", None)
        return {"format": FORMAT, "version": VERSION, "mode": self.mode, "n_docs": self.n_docs,
                "label_smoothing": self.label_smoothing, "exclude_bos_score": self.exclude_bos_score,
                "generation": self.generation, "generator_kind": self.generator.kind,
                "input_format": self.generator.fmt.to_dict(), "max_answer_length": self.generator.max_answer_length,
                "kb_path": str(Path(kb_path).resolve()) if kb_path is not None else None}

    def save_pretrained(self, path) -> None:
        """Write config (pyrag_rag.json), question_encoder/ and generator/ (safetensors + tokenizers) into the
        directory `path`, replacing it atomically. The knowledge base is referenced, not copied: by its absolute
        path and by its path relative to `path`, so a model and its KB moved together still find each other."""
        if not hasattr(self.question_encoder, "save_pretrained"):
            raise TypeError(f"the question encoder ({type(self.question_encoder).__name__}) cannot be saved; "
                            f"use a pyrag Encoder")
        with atomic_dir(path, marker=CONFIG_NAME) as tmp:
            self.question_encoder.save_pretrained(tmp / "question_encoder")
            self.generator.save_pretrained(tmp / "generator")
            cfg = self.config_dict()
            if cfg.get("kb_path"):
                cfg["kb_path_relative"] = os.path.relpath(cfg["kb_path"], Path(path).resolve())
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, kb=None, *, device=None) -> RagModel:
        """Load a saved model. kb: a KnowledgeBase or directory to use instead of the recorded path; the recorded
        path is opened otherwise. RagModel.from_pretrained returns the saved mode's class; RagToken /
        RagSequence.from_pretrained load the weights into that mode (a model may be decoded either way)."""
        from ..kb import KnowledgeBase
        from .encoders import Encoder

        path = Path(path)
        f = path / CONFIG_NAME
        if not f.is_file():
            raise FileNotFoundError(f"not a pyrag RAG model directory (no {CONFIG_NAME}): {str(path)!r}")
        cfg = json.loads(f.read_text())
        if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
            raise ValueError(f"{f}: not a {FORMAT} version {VERSION} config")
        klass = cls if cls is not RagModel else {"token": RagToken, "sequence": RagSequence}[cfg["mode"]]
        if kb is None and cfg.get("kb_path"):
            tried = [Path(cfg["kb_path"])]
            if cfg.get("kb_path_relative"):  # the model and its KB moved together
                tried.append((path / cfg["kb_path_relative"]).resolve())
            found = next((p for p in tried if p.is_dir()), None)
            if found is None:
                raise FileNotFoundError(f"the knowledge base this model was saved with is gone: "
                                        f"{' or '.join(repr(str(p)) for p in tried)}; pass kb=... to "
                                        f"from_pretrained (--kb on the command line)")
            kb = KnowledgeBase.open(found, verify=False)
        elif kb is not None and not hasattr(kb, "search"):
            kb = KnowledgeBase.open(kb, verify=False)
        qe = Encoder.from_pretrained(path / "question_encoder")
        fmt = InputFormat(**cfg["input_format"])
        gen = load_generator(path / "generator", None, fmt, cfg["generator_kind"],
                             max_answer_length=cfg.get("max_answer_length"))
        model = klass(qe, gen, kb, n_docs=cfg["n_docs"], label_smoothing=cfg["label_smoothing"],
                      exclude_bos_score=cfg["exclude_bos_score"], generation=cfg.get("generation"))
        return model.to(device) if device is not None else model


class RagToken(RagModel):
    """RAG-Token: p(y|x) = prod_t sum_k p(z_k|x) p(y_t | x, z_k, y_<t) (the passage may change at every token)."""

    mode = "token"


class RagSequence(RagModel):
    """RAG-Sequence: p(y|x) = sum_k p(z_k|x) prod_t p(y_t | x, z_k, y_<t) (one passage per answer)."""

    mode = "sequence"


def _token_ll(logits, target, mask, K: int, rows_per_chunk: int = 8) -> torch.Tensor:
    """sum_t mask * log p(target_t) [B, K] from logits [B*K, T, V] (no gradient), a few rows at a time so that
    no [B*K, T, V] log-probs are built."""
    N = logits.shape[0]
    with torch.no_grad():
        y = target.repeat_interleave(K, dim=0)
        m = mask.repeat_interleave(K, dim=0)
        ll = torch.empty(N, dtype=torch.float32, device=logits.device)
        for s in range(0, N, rows_per_chunk):
            z = logits[s:s + rows_per_chunk].float()
            tok = z.gather(-1, y[s:s + rows_per_chunk, :, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
            ll[s:s + rows_per_chunk] = torch.where(m[s:s + rows_per_chunk], tok, torch.zeros_like(tok)).sum(-1)
        return ll.view(N // K, K)


def _sequence_posterior(logits, target, mask, log_prior) -> torch.Tensor:
    """p(z_k | x, y) [B, K] ∝ p(z_k|x) prod_t p(y_t|x,z_k,y_<t) from logits [B*K, T, V]."""
    ll = _token_ll(logits, target, mask, log_prior.shape[1])
    return torch.softmax(log_prior.detach().float() + ll, dim=1)


