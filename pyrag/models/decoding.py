"""RAG decoding, batched over questions: greedy and beam search with transformers' GenerationMixin semantics (same
scores, logits processing, stopping and tie order, so token ids match HF), RAG-Token decoding over the marginalised
next-token distribution, and RAG-Sequence "thorough" / "fast" decoding."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "DecodeResult",
    "DecodeSettings",
    "beam_search",
    "greedy_search",
    "process_logits",
    "rag_sequence_decode",
    "rag_token_decode",
]

_NEG = -1.0e9  # HF's "impossible" score; kept identical so that ties resolve as HF resolves them


@dataclass
class DecodeSettings:
    """What HF's GenerationConfig fields of the same names mean. max_length and min_length count the decoder
    prompt (the decoder start token of a seq2seq model), as in HF."""

    max_length: int
    eos_token_id: int | None
    pad_token_id: int
    min_length: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class DecodeResult:
    """sequences [N, L] (decoder prompt included, padded with pad_token_id), lengths [N], scores [N] (log-prob
    of the sequence under the decoding distribution: marginal for RAG, summed over its tokens, length penalty not
    applied; beam_search's own result is the exception: HF's length-normalised beam score, the sum being in
    extra["sum_logprobs"])."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    extra: dict = field(default_factory=dict)


def _banned_ngrams(seq: torch.Tensor, n: int) -> list[list[int]]:
    """Per row, the tokens that would repeat an n-gram already in the row (HF's NoRepeatNGramLogitsProcessor)."""
    out = []
    for row in seq.tolist():
        prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        out.append([row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return out


def process_logits(seq: torch.Tensor, scores: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """Apply HF's logits processors, in HF's order: no-repeat n-gram, min length, forced BOS, forced EOS.

    seq [N, cur_len] tokens so far (decoder prompt included), scores [N, V] -> [N, V] (a new tensor)."""
    cur = seq.shape[1]
    n = s.no_repeat_ngram_size
    if n and cur + 1 >= n:
        scores = scores.clone()
        for r, banned in enumerate(_banned_ngrams(seq, n)):
            if banned:
                scores[r, banned] = -math.inf
    if s.eos_token_id is not None and cur < s.min_length:
        scores = scores.clone()
        scores[:, s.eos_token_id] = -math.inf
    if s.forced_bos_token_id is not None and cur == 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, s.forced_bos_token_id] = 0
    if s.forced_eos_token_id is not None and cur == s.max_length - 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, s.forced_eos_token_id] = 0
    return scores


StepFn = Callable[[torch.Tensor | None], torch.Tensor]


def greedy_search(step: StepFn, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
    """HF's greedy decoding (_sample without sampling): argmax of the processed logits, finished rows padded.

    step(tokens [N] | None) -> next-token logits [N, V] (None: the first call, for the prompt, which the generator
    ran when decoding started); prompt [N, p0]."""
    N, p0 = prompt.shape
    seq = prompt
    unfinished = torch.ones(N, dtype=torch.bool, device=prompt.device)
    total = torch.zeros(N, dtype=torch.float32, device=prompt.device)
    lengths = torch.full((N,), p0, dtype=torch.long, device=prompt.device)
    logits = step(None)  # the generator's start() already ran the prompt
    while True:
        scores = process_logits(seq, logits, s)
        tok = scores.argmax(-1)
        if s.eos_token_id is not None:
            tok = torch.where(unfinished, tok, torch.full_like(tok, s.pad_token_id))
        lp = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None]).squeeze(1)
        total = total + torch.where(unfinished, lp, torch.zeros_like(lp))
        lengths = lengths + unfinished.long()
        seq = torch.cat([seq, tok[:, None]], 1)
        stop = torch.full_like(unfinished, seq.shape[1] >= s.max_length)
        if s.eos_token_id is not None:
            stop |= tok == s.eos_token_id
        unfinished &= ~stop
        if not unfinished.any():
            break
        logits = step(tok)
    return DecodeResult(seq, lengths, total)


def beam_search(step: StepFn, reorder: Callable[[torch.Tensor], None], prompt: torch.Tensor, num_beams: int,
                s: DecodeSettings, num_return: int = 1) -> DecodeResult:
    """HF's (transformers >= 4.50) vectorised beam search over G groups of num_beams rows.

    step(tokens [G*nb] | None) -> logits [G*nb, V] for rows (g, beam); reorder(index [G*nb]): row r continues
    from row index[r]. prompt [G, p0]. Returns the num_return best finished hypotheses per group, flattened to
    [G*num_return, L] with scores = length-penalised beam scores (HF's sequences_scores) and
    extra["sum_logprobs"] = the accumulated processed log-probs (no length penalty)."""
    G, p0 = prompt.shape
    nb, L, dev = num_beams, s.max_length, prompt.device
    keep = 2 * nb
    running = torch.full((G, nb, L), s.pad_token_id, dtype=torch.long, device=dev)
    running[:, :, :p0] = prompt[:, None, :]
    run_scores = torch.zeros((G, nb), dtype=torch.float32, device=dev)
    run_scores[:, 1:] = _NEG  # only the first beam is live at the start, or all beams would pick the same tokens
    fin = running.clone()
    fin_scores = torch.full((G, nb), _NEG, dtype=torch.float32, device=dev)
    fin_sum = torch.zeros((G, nb), dtype=torch.float32, device=dev)
    fin_len = torch.full((G, nb), p0, dtype=torch.long, device=dev)
    fin_done = torch.zeros((G, nb), dtype=torch.bool, device=dev)
    improvable = torch.ones((G, 1), dtype=torch.bool, device=dev)
    top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(dev)
    offsets = torch.arange(G, device=dev)[:, None] * nb
    cur = p0
    logits = step(None)
    while True:
        lp = torch.log_softmax(logits.float(), dim=-1)
        lp = process_logits(running.view(G * nb, L)[:, :cur], lp, s)
        V = lp.shape[-1]
        acc = (lp.view(G, nb, V) + run_scores[:, :, None]).view(G, nb * V)
        top_vals, top_idx = torch.topk(acc, k=keep)
        src = top_idx // V
        cand = torch.take_along_dim(running, src[:, :, None], dim=1)
        cand[:, :, cur] = top_idx % V
        done = torch.full_like(top_mask[None].expand(G, keep), cur + 1 >= L)
        if s.eos_token_id is not None:
            done = done | (cand[:, :, cur] == s.eos_token_id)
        # live beams: the best num_beams candidates that did not just finish
        live_vals = top_vals + done.to(torch.float32) * _NEG
        nxt = torch.topk(live_vals, k=nb)[1]
        running = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        run_scores = torch.take_along_dim(live_vals, nxt, dim=1)
        run_src = torch.take_along_dim(src, nxt, dim=1)
        # finished hypotheses: only candidates among the top num_beams may join, with the length penalty
        just = done & top_mask[None, :]
        pen = top_vals / ((cur + 1 - p0) ** s.length_penalty)
        full = torch.all(fin_done, dim=-1, keepdim=True) & (s.early_stopping is True)
        pen = pen + full.to(torch.float32) * _NEG
        pen = pen + (~improvable).to(torch.float32) * _NEG
        pen = pen + (~just) * _NEG
        merged = torch.cat([fin_scores, pen], 1)
        pick = torch.topk(merged, k=nb)[1]
        fin = torch.take_along_dim(torch.cat([fin, cand], 1), pick[:, :, None], dim=1)
        fin_scores = torch.take_along_dim(merged, pick, dim=1)
        fin_sum = torch.take_along_dim(torch.cat([fin_sum, top_vals], 1), pick, dim=1)
        fin_len = torch.take_along_dim(torch.cat([fin_len, torch.full_like(src, cur + 1)], 1), pick, dim=1)
        fin_done = torch.take_along_dim(torch.cat([fin_done, just], 1), pick, dim=1)
        cur += 1
        # can a live beam still beat the worst finished one? (HF's early-stop heuristic)
        best_len = (L - p0) if (s.early_stopping == "never" and s.length_penalty > 0.0) else (cur - p0)
        best_possible = run_scores[:, :1] / (best_len ** s.length_penalty)
        worst = torch.where(fin_done, torch.min(fin_scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        # one read-back of the three flags (on a GPU each bool() would be a sync of its own)
        any_improvable, all_fin, all_done = torch.stack(
            [torch.any(improvable), torch.all(fin_done), torch.all(done)]).tolist()
        go_on = any_improvable and not (all_fin and s.early_stopping is True) and not all_done
        if not go_on:
            break
        reorder((run_src + offsets).reshape(-1))
        if s.forced_eos_token_id is not None and cur == L - 1:
            # HF's forced EOS will replace every processed log-prob of this last step (process_logits), so the
            # model's logits cannot matter: skip running it (one decoder step of B*K*num_beams rows saved)
            logits = torch.zeros_like(logits)
        else:
            logits = step(running[:, :, cur - 1].reshape(-1))
    out_len = int(fin_len[:, :num_return].max())
    seqs = fin[:, :num_return, :out_len].reshape(G * num_return, out_len)
    lens = fin_len[:, :num_return].reshape(-1)
    ar = torch.arange(out_len, device=dev)[None, :]
    seqs = seqs.masked_fill(ar >= lens[:, None], s.pad_token_id)
    return DecodeResult(seqs, lens, fin_scores[:, :num_return].reshape(-1),
                        {"sum_logprobs": fin_sum[:, :num_return].reshape(-1)})


def rag_token_decode(gen, input_ids: torch.Tensor, attention_mask: torch.Tensor, doc_scores: torch.Tensor,
                     s: DecodeSettings, num_beams: int = 1) -> DecodeResult:
    """RAG-Token decoding: greedy (num_beams=1) or beam search over the next-token distribution marginalised over
    the K passages, log sum_k p(z_k|x) p(y_t|x,z_k,y_<t) (rag_token_marginal_logprobs).

    input_ids / attention_mask [B*K, L] generator inputs (row b*K + k), doc_scores [B, K]. The generator runs
    B*K*num_beams rows in (question, passage, beam) order — the beams of one passage side by side, so that they can
    share that passage's cross-attention keys/values (Seq2SeqGenerator.start) — and the logits are permuted to
    (question, beam, passage) for the marginal; HF's RagTokenForGeneration runs (question, beam, passage) rows, which
    computes the same per-row values. Reordering the beams moves the K rows of a beam together."""
    from ..losses import check_some_finite_score, marginal_with_log_prior

    B, K = doc_scores.shape
    nb = num_beams
    dev = input_ids.device
    state = gen.start(input_ids, attention_mask, torch.arange(B * K, device=dev).repeat_interleave(nb))
    scores = doc_scores.float().repeat_interleave(nb, dim=0)  # [B*nb, K]
    # Checked and normalised once here, not at every step (the check syncs with the GPU).
    check_some_finite_score(doc_scores)
    log_prior = torch.log_softmax(scores, dim=1)
    # generator row (b, k, j) <-> decoding row (b, j) and passage k
    gen_rows = torch.arange(B * K * nb, device=dev).view(B, K, nb)
    to_beam_major = gen_rows.transpose(1, 2).reshape(-1)  # logits (b, k, j) -> (b, j, k)
    beam_of_row = (torch.arange(B, device=dev)[:, None, None] * nb
                   + torch.arange(nb, device=dev)[None, None, :]).expand(B, K, nb).reshape(-1)

    def step(tokens):
        logits = gen.step(state, None if tokens is None else tokens.index_select(0, beam_of_row))
        return marginal_with_log_prior(logits.index_select(0, to_beam_major) if nb > 1 else logits, log_prior)

    prompt = gen.decoder_prompt(B)
    if nb == 1:
        return greedy_search(step, prompt, s)

    def reorder(index):
        # index [B*nb]: decoding row (b, j) continues from row index[b*nb + j] = (b, j'); generator row (b, k, j)
        # then continues from (b, k, j')
        src = index.view(B, 1, nb) - torch.arange(B, device=dev).view(B, 1, 1) * nb
        gen.reorder(state, (gen_rows[:, :, :1] + src).reshape(-1))

    res = beam_search(step, reorder, prompt, nb, s)
    # scores: the sequence's log-prob, as greedy gives it; HF's length-normalised beam score stays in extra
    return DecodeResult(res.sequences, res.lengths, res.extra["sum_logprobs"], {**res.extra, "beam_scores": res.scores})


def rag_sequence_decode(gen, input_ids: torch.Tensor, attention_mask: torch.Tensor, doc_scores: torch.Tensor,
                        s: DecodeSettings, num_beams: int = 4, decoding: str = "thorough",
                        max_logits_bytes: int = 256 << 20) -> DecodeResult:
    """RAG-Sequence decoding for B questions at once.

    1. Beam search (num_beams; greedy if 1) under every passage separately: B*K groups, one encoder pass.
    2. Per question, the union of the K*num_beams hypotheses, deduplicated (first occurrence kept, HF's order).
    3. "thorough": every hypothesis is scored under all K passages by teacher forcing — one batched pass over all
       questions (split only to bound the logits' memory; the encoder output is reused, not recomputed) — and
       p(y|x) = sum_k p(z_k|x) p(y|x,z_k) (the first, forced BOS token excluded, as HF's exclude_bos_score).
       "fast": no extra pass; p(y|x,z_k) is taken from the beam search when y is in passage k's beam (its whole
       log-likelihood, the forced BOS token included), else 0.
    4. The most probable hypothesis of each question; scores = its log p(y|x).
    Differences from HF's RagSequenceForGeneration.generate: it loops over questions and re-runs the encoder for
    every (candidate, passage) pair; it scores with the model's label smoothing if one is configured (pyrag scores
    the plain likelihood); with transformers 5 its per-passage beam search runs without the attention mask
    (pad tokens are attended) — on unpadded inputs the two return the same token ids; and its re-scoring drops
    every pad-id token of a hypothesis, so one that generated the pad token outscores the rest (pyrag scores every
    generated token)."""
    if decoding not in ("thorough", "fast"):
        raise ValueError(f"decoding must be 'thorough' or 'fast', got {decoding=!r}")
    B, K = doc_scores.shape
    nb = num_beams
    dev = input_ids.device
    state = gen.start(input_ids, attention_mask, torch.arange(B * K, device=dev).repeat_interleave(nb))
    prompt = gen.decoder_prompt(B * K)

    def step(tokens):
        return gen.step(state, tokens)

    if nb == 1:
        res = greedy_search(step, prompt, s)
        sums = res.scores
    else:
        res = beam_search(step, lambda index: gen.reorder(state, index), prompt, nb, s, num_return=nb)
        sums = res.extra["sum_logprobs"]
    R = res.sequences.shape[0] // (B * K)  # hypotheses per passage
    seqs = res.sequences.view(B, K * R, -1)
    lens = res.lengths.view(B, K * R).tolist()
    sums = sums.view(B, K, R)
    log_prior = torch.log_softmax(doc_scores.float(), dim=1)

    cands: list[list[tuple[int, ...]]] = []
    for b in range(B):
        seen: dict[tuple[int, ...], None] = {}
        for j in range(K * R):
            seen.setdefault(tuple(seqs[b, j, : lens[b][j]].tolist()), None)
        cands.append(list(seen))

    if decoding == "fast":
        best_seq, best_score, all_scores, in_beam = [], [], [], []
        prior = log_prior.cpu()
        for b in range(B):
            lp = torch.full((len(cands[b]), K), -math.inf)  # log p(y|x,z_k) from the beams, -inf = not in beam k
            row = {c: i for i, c in enumerate(cands[b])}
            for j in range(K * R):
                i, k = row[tuple(seqs[b, j, : lens[b][j]].tolist())], j // R
                lp[i, k] = max(float(lp[i, k]), float(sums[b, k, j % R]))
            scores = torch.logsumexp(prior[b][None, :] + lp, dim=1)
            i = int(torch.argmax(scores))
            best_seq.append(cands[b][i])
            best_score.append(float(scores[i]))
            all_scores.append(scores)
            in_beam.append(lp > -math.inf)
        return _pack(best_seq, best_score, s.pad_token_id, dev,
                     {"candidates": cands, "candidate_scores": all_scores, "in_beam": in_beam})

    scores = _score_candidates(gen, state, cands, log_prior, s, max_logits_bytes)
    best_seq, best_score = [], []
    for b in range(B):
        i = int(torch.argmax(scores[b]))
        best_seq.append(cands[b][i])
        best_score.append(float(scores[b][i]))
    return _pack(best_seq, best_score, s.pad_token_id, dev, {"candidates": cands, "candidate_scores": scores})


def _score_candidates(gen, state, cands, log_prior, s: DecodeSettings, max_logits_bytes: int) -> list[torch.Tensor]:
    """log p(y|x) of every candidate y of every question, marginalised over its question's K passages with the
    fused sequence loss; candidate c of question b is run under rows b*K + k of the encoded inputs."""
    from ..ops.rag_loss import rag_marginal_nll

    B, K = log_prior.shape
    dev = log_prior.device
    flat = [(b, c) for b in range(B) for c in cands[b]]
    T = max(len(c) for _, c in flat)
    V = gen.vocab_size
    per_chunk = max(1, max_logits_bytes // max(1, K * T * V * 4))  # candidates per forward
    bos = getattr(gen, "bos_token_id", None)
    # HF drops the first target from the score only when every candidate of the question starts with BOS
    all_bos = [bos is not None and all(len(c) > 1 and c[1] == bos for c in cands[b]) for b in range(B)]
    out = torch.empty(len(flat), dtype=torch.float32)
    ks = torch.arange(K, device=dev)
    for start in range(0, len(flat), per_chunk):
        part = flat[start:start + per_chunk]
        C = len(part)
        Tc = max(len(c) for _, c in part)
        tok = torch.full((C, Tc), s.pad_token_id, dtype=torch.long, device=dev)
        lengths = torch.tensor([len(c) for _, c in part], device=dev)
        for i, (_, c) in enumerate(part):
            tok[i, : len(c)] = torch.tensor(c, device=dev)
        qb = torch.tensor([b for b, _ in part], device=dev)
        src = (qb[:, None] * K + ks[None, :]).reshape(-1)  # rows (candidate, passage)
        logits = gen.candidate_logits(state, src, tok.repeat_interleave(K, dim=0))  # [C*K, Tc, V]
        target, mask = gen.candidate_targets(tok, lengths)
        excl = torch.tensor([all_bos[b] for b, _ in part], device=dev)
        mask[:, 0] &= ~excl
        loss = rag_marginal_nll(logits.reshape(C, K, Tc, -1).contiguous(), log_prior.index_select(0, qb).contiguous(),
                                target, mask, torch.zeros_like(mask), mode="sequence", epsilon=0.0)
        out[start:start + C] = -loss.float().cpu()
    res, i = [], 0
    for b in range(B):
        res.append(out[i:i + len(cands[b])])
        i += len(cands[b])
    return res


def _pack(seqs: list[tuple[int, ...]], scores: list[float], pad: int, dev, extra: dict) -> DecodeResult:
    L = max(len(x) for x in seqs)
    out = torch.full((len(seqs), L), pad, dtype=torch.long, device=dev)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long, device=dev)
    lengths = torch.tensor([len(x) for x in seqs], device=dev)
    return DecodeResult(out, lengths, torch.tensor(scores, dtype=torch.float32), extra)
