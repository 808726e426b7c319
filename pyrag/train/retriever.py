"""DPR retriever training: the in-batch-negatives NLL loss, BM25 hard-negative mining, gradient caching
(GradCache) for large batches, and a resumable training loop (`train_retriever`, `pyrag train-retriever`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._argparse import DefaultsFormatter
from ..kb_io import atomic_path
from ..metrics import has_answer
from .checkpoint import epoch_permutation, rng_state, set_rng_state

__all__ = [
    "dpr_in_batch_mask",
    "dpr_loss",
    "examples_from_qa",
    "grad_cache_step",
    "mine_hard_negatives",
    "train_retriever",
    "train_retriever_cli",
    "uncached_step",
]


# ---------------------------------------------------------------------------------------------------------------
# loss

def dpr_loss(q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor, *, temperature: float = 1.0,
             mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """DPR's NLL of each question's positive passage among all passages of the batch.

    q [B, D] question vectors; p [P, D] every passage of the batch (each question's positive and hard negatives;
    the other questions' passages act as in-batch negatives); positive [B] int64 index into p; mask [B, P] bool,
    True where a passage must not count as a negative for that question (a duplicate of its positive).
    loss[b] = -log softmax_j(q[b] . p[j] / temperature)[positive[b]] over the unmasked j.
    Replaces `F.cross_entropy((q @ p.T / t).masked_fill(mask, -inf), positive)`."""
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"q must be [B, D] and p [P, D] with equal D, got {q.shape=} {p.shape=}")
    if positive.shape != (q.shape[0],):
        raise ValueError(f"positive must be [B]={q.shape[0]}, got {positive.shape=}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = (q @ p.T).float() / temperature
    if mask is not None:
        if mask.shape != scores.shape:
            raise ValueError(f"mask must be [B, P]={tuple(scores.shape)}, got {mask.shape=}")
        if mask.gather(1, positive[:, None]).any():
            raise ValueError("mask hides a question's own positive passage")
        scores = scores.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores, positive, reduction=reduction)


def dpr_in_batch_mask(positive_keys: Sequence[str], passage_keys: Sequence[str], positive: torch.Tensor):
    """mask [B, P]: True where passage j is the same passage as question b's positive but is not at
    positive[b] (SQuAD puts several questions on one paragraph, so a batch can hold it twice; counting
    the copy as a negative would push the question away from its own answer)."""
    keys = {k: i for i, k in enumerate(sorted(set(passage_keys)))}
    pk = torch.tensor([keys[k] for k in passage_keys])
    qk = torch.tensor([keys[k] for k in positive_keys])
    mask = qk[:, None] == pk[None, :]
    mask[torch.arange(len(qk)), positive] = False
    return mask


# ---------------------------------------------------------------------------------------------------------------
# data

def examples_from_qa(qa: Sequence[dict], kb) -> list[dict]:
    """Training examples {"question", "answers", "positive": {"id","title","text"}} from QA records with
    "gold_ids" (e.g. pyrag.kb_io.read_squad's questions), taking the first gold passage from the KB."""
    out = []
    for i, r in enumerate(qa):
        gold = r.get("gold_ids") or []
        if not gold:
            raise ValueError(f"question #{i} ({r.get('question')!r}) has no gold passage id")
        row = kb.row_of(gold[0])
        (title,), (text,) = kb.passages(torch.tensor([row]))
        out.append({"question": r["question"], "answers": list(r.get("answers", [])),
                    "positive": {"id": str(gold[0]), "title": title, "text": text}})
    return out


def mine_hard_negatives(examples: list[dict], kb, n: int = 1, *, depth: int | None = None, seed: int = 0,
                        show_progress: bool = True) -> list[dict]:
    """Add "hard_negatives": up to n passages per example, the highest-ranked BM25 passages (over the KB's
    title + text) for the question that are not its positive and contain none of its answer strings
    (has_answer, SQuAD-normalised). Looks `depth` deep (default 10 n + 10); if that is not enough, fills
    with random passages without the answer. Returns new example dicts."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    N = len(kb)
    depth = min(N, depth or 10 * n + 10)
    rng = random.Random(seed)
    out = []
    bar = tqdm(total=len(examples), desc="BM25 hard negatives", unit="q", disable=not show_progress)
    for s in range(0, len(examples), 256):
        chunk = examples[s:s + 256]
        _, rows = kb.bm25.search([e["question"] for e in chunk], depth)
        ids = kb.ids(rows)
        titles, texts = kb.passages(rows)
        for e, ri, ii, ti, xi in zip(chunk, rows.tolist(), ids, titles, texts):
            pos_id = e["positive"]["id"]
            negs = []
            for r, pid, t, x in zip(ri, ii, ti, xi):
                if pid != pos_id and not has_answer(x, e["answers"]):
                    negs.append({"id": pid, "title": t, "text": x})
                    if len(negs) == n:
                        break
            tries = 0
            while len(negs) < n and tries < 50 * n:
                tries += 1
                r = rng.randrange(N)
                pid = kb.ids(torch.tensor([r]))[0]
                (t,), (x,) = kb.passages(torch.tensor([r]))
                if pid != pos_id and not has_answer(x, e["answers"]) and pid not in {g["id"] for g in negs}:
                    negs.append({"id": pid, "title": t, "text": x})
            out.append({**e, "hard_negatives": negs})
        bar.update(len(chunk))
    bar.close()
    return out


def _check_examples(examples: list[dict], hard_negatives: int) -> None:
    if not examples:
        raise ValueError("examples is empty")
    for i, e in enumerate(examples):
        if not isinstance(e, dict) or not isinstance(e.get("question"), str) or not isinstance(e.get("positive"), dict):
            raise ValueError(f"example #{i} must have a 'question' str and a 'positive' passage dict")
        if len(e.get("hard_negatives", [])) < hard_negatives:
            raise ValueError(f"example #{i} has {len(e.get('hard_negatives', []))} hard negatives, "
                             f"{hard_negatives} needed (mine_hard_negatives adds them)")


def _pkey(p: dict) -> str:
    return str(p["id"]) if p.get("id") is not None else f"{p.get('title', '')}\x00{p['text']}"


def make_batch(examples: list[dict], hard_negatives: int):
    """(questions [B], passages [(title, text)] * B*(1+h), positive [B], mask [B, P]) for a list of examples."""
    questions, passages, keys, positive, pos_keys = [], [], [], [], []
    for e in examples:
        positive.append(len(passages))
        pos_keys.append(_pkey(e["positive"]))
        for p in [e["positive"], *e.get("hard_negatives", [])[:hard_negatives]]:
            passages.append((p.get("title", ""), p["text"]))
            keys.append(_pkey(p))
        questions.append(e["question"])
    positive = torch.tensor(positive)
    return questions, passages, positive, dpr_in_batch_mask(pos_keys, keys, positive)


# ---------------------------------------------------------------------------------------------------------------
# one optimisation step's gradients: plain, and with gradient caching

def _chunks(n: int, size: int | None):
    size = n if not size else size
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _encode_texts(enc, texts: list[str]) -> torch.Tensor:
    t = enc.tokenize(texts)
    return enc(t["input_ids"], t["attention_mask"])


def uncached_step(model, questions: list[str], passages, positive, mask, *,
                  temperature: float = 1.0, chunk_size: int | None = None) -> tuple[float, float]:
    """Forward + backward of the DPR loss with the whole batch's graph in memory. Encodes in chunks of
    chunk_size texts (None: all at once) and accumulates parameter .grad. passages: [(title, text)] to encode
    with the passage encoder, or fixed passage vectors [P, D] (a frozen passage side, e.g. a KB's index).
    Returns (loss, in-batch accuracy)."""
    qe, pe = model.question_encoder, model.passage_encoder
    q = torch.cat([_encode_texts(qe, questions[a:b]) for a, b in _chunks(len(questions), chunk_size)])
    if isinstance(passages, torch.Tensor):
        p = passages.to(q.device, q.dtype)
    else:
        ptexts = pe.passage_strings([t for t, _ in passages], [x for _, x in passages])
        p = torch.cat([_encode_texts(pe, ptexts[a:b]) for a, b in _chunks(len(ptexts), chunk_size)])
    loss = dpr_loss(q, p, positive.to(q.device), temperature=temperature, mask=mask.to(q.device))
    loss.backward()
    return float(loss.detach()), _accuracy(q.detach(), p.detach(), positive, mask)


class _RngState:
    """CPU (and CUDA) RNG state captured before a chunk's first forward, restored for its re-forward so dropout
    draws the same masks (GradCache's RandContext)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def grad_cache_step(model, questions: list[str], passages, positive, mask, *,
                    chunk_size: int, temperature: float = 1.0) -> tuple[float, float]:
    """The same gradients as uncached_step with memory for only chunk_size texts' activations (Gao et al.
    2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

    1. representations of every chunk without a graph (recording each chunk's RNG state);
    2. the loss over the full batch from those representations, backward to get d loss / d representation;
    3. each chunk re-encoded with a graph (same RNG state, so the same dropout), backward of
       sum(representation * cached gradient), which accumulates exactly the parameter gradients of step 2.
    passages: [(title, text)], or fixed vectors [P, D] (then only questions are encoded)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    qe, pe = model.question_encoder, model.passage_encoder
    fixed = isinstance(passages, torch.Tensor)
    jobs = [(qe, questions, a, b) for a, b in _chunks(len(questions), chunk_size)]
    if not fixed:
        ptexts = pe.passage_strings([t for t, _ in passages], [x for _, x in passages])
        jobs += [(pe, ptexts, a, b) for a, b in _chunks(len(ptexts), chunk_size)]
    reps, states = [], []
    with torch.no_grad():
        for enc, texts, a, b in jobs:
            states.append(_RngState(enc.device))
            reps.append(_encode_texts(enc, texts[a:b]))
    nq = len(_chunks(len(questions), chunk_size))
    q = torch.cat(reps[:nq]).requires_grad_()
    p = passages.to(q.device, q.dtype) if fixed else torch.cat(reps[nq:]).requires_grad_()
    loss = dpr_loss(q, p, positive.to(q.device), temperature=temperature, mask=mask.to(q.device))
    loss.backward()
    grads = list(q.grad.split([b - a for _, _, a, b in jobs[:nq]]))
    if not fixed:
        grads += list(p.grad.split([b - a for _, _, a, b in jobs[nq:]]))
    end_state = _RngState(q.device)
    for (enc, texts, a, b), st, g in zip(jobs, states, grads):
        st.restore()
        r = _encode_texts(enc, texts[a:b])
        r.backward(g)
    end_state.restore()
    return float(loss.detach()), _accuracy(q.detach(), p.detach(), positive, mask)


def _accuracy(q, p, positive, mask) -> float:
    s = (q @ p.T).masked_fill(mask.to(q.device), float("-inf"))
    return float((s.argmax(1).cpu() == positive.cpu()).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# training loop

def _save_checkpoint(path: Path, state: dict) -> None:
    tmp, final = atomic_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the metric lines up to `step` (lines logged after the checkpoint we resume from are redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp, final = atomic_path(path)
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, final)


def _batch_passage_ids(examples: list[dict], hard_negatives: int) -> list[str]:
    """Passage ids in make_batch's passage order."""
    return [str(p["id"]) for e in examples for p in [e["positive"], *e.get("hard_negatives", [])[:hard_negatives]]]


def train_retriever(model, examples: list[dict], *, out_dir, steps: int, batch_size: int = 32,
                    hard_negatives: int = 1, lr: float = 2e-5, weight_decay: float = 0.0,
                    warmup_steps: int | None = None, temperature: float = 1.0, grad_cache_chunk: int | None = None,
                    max_grad_norm: float | None = 2.0, checkpoint_every: int = 100, log_every: int = 10,
                    seed: int = 0, resume: bool = True, stop_at: int | None = None, save_final: bool = True,
                    kb=None, freeze_passages: bool = False, show_progress: bool = True) -> dict:
    """Train a BiEncoder with the DPR loss (positive vs. hard negatives vs. in-batch negatives).

    examples: {"question", "answers", "positive": {"id","title","text"}, "hard_negatives": [passages]}
    (mine_hard_negatives adds the last). Each step takes batch_size examples of a per-epoch shuffled order
    (seeded), AdamW with linear warm-up (default 10% of steps) and linear decay to 0 at `steps`.
    grad_cache_chunk: encode in chunks of this many texts with gradient caching (same gradients, memory of one
    chunk); None encodes the whole batch at once.
    Writes out_dir/checkpoint.pt every checkpoint_every steps (model, optimizer, scheduler, RNG states, data
    position; atomic) and at the end, out_dir/metrics.jsonl every log_every steps, and (save_final)
    out_dir/final/ with the trained BiEncoder. With resume=True an existing checkpoint is continued exactly.
    stop_at: checkpoint and return after that step (as an interruption would), to be resumed by a later call.
    freeze_passages: train only the question encoder against the passage vectors stored in `kb` (as RAG
    does): no passage is encoded, so a step costs a fraction, and the KB stays valid for the trained model.
    Needs separate encoders (model.passage_encoder = the KB's encoder) and passage ids that are KB ids.
    Returns {"step", "loss", "accuracy", "seconds", "stopped"}."""
    from tqdm.auto import tqdm

    from ..models.encoders import BiEncoder

    if not isinstance(model, BiEncoder):
        raise TypeError(f"model must be a BiEncoder, got {type(model).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                    ("log_every", log_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hard_negatives < 0:
        raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")
    _check_examples(examples, hard_negatives)
    if batch_size > len(examples):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(examples)} examples")
    id_rows = None
    if freeze_passages:
        if kb is None:
            raise ValueError("freeze_passages=True needs kb= (the passage vectors come from its index)")
        if model.shared:
            raise ValueError("freeze_passages=True needs separate encoders: training a shared encoder would make "
                             "the KB's passage vectors stale (use BiEncoder.from_pretrained(path, shared=False))")
        if model.passage_encoder.fingerprint() != kb.meta["passage_encoder"]["fingerprint"]:
            raise ValueError(f"model.passage_encoder is not the encoder {kb.path} was built with")
        id_rows = {pid: kb.row_of(pid) for e in examples for pid in _batch_passage_ids([e], hard_negatives)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "metrics.jsonl"
    warmup = int(0.1 * steps) if warmup_steps is None else int(warmup_steps)
    config = {"steps": steps, "batch_size": batch_size, "hard_negatives": hard_negatives, "lr": lr,
              "weight_decay": weight_decay, "warmup_steps": warmup, "temperature": temperature, "seed": seed,
              "n_examples": len(examples), "freeze_passages": bool(freeze_passages)}

    trained = model.question_encoder if freeze_passages else model
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step, epoch, offset = 0, 0, 0
    losses, accs = [], []  # since the last log line (kept in checkpoints so a resumed log is identical)
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"] != config:
            diff = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
            raise ValueError(f"{ckpt_path} was written by a run with different settings {diff}; use another "
                             f"out_dir or resume=False")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        step, epoch, offset = ck["step"], ck["data"]["epoch"], ck["data"]["offset"]
        losses, accs = list(ck["pending"]["losses"]), list(ck["pending"]["accs"])
        _truncate_log(log_path, step)
    else:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if log_path.exists():
            log_path.unlink()

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "rng": rng_state(),
                                     "data": {"epoch": epoch, "offset": offset}, "config": config,
                                     "pending": {"losses": losses, "accs": accs}})

    model.train()
    order = epoch_permutation(len(examples), seed, epoch)
    bar = tqdm(total=steps, initial=step, desc="train retriever", unit="step", disable=not show_progress,
               dynamic_ncols=True)
    t0, stopped = time.time(), False
    last = {"loss": float("nan"), "accuracy": float("nan")}
    try:
        while step < steps:
            if offset + batch_size > len(order):
                epoch, offset = epoch + 1, 0
                order = epoch_permutation(len(examples), seed, epoch)
            batch = [examples[i] for i in order[offset:offset + batch_size]]
            offset += batch_size
            questions, passages, positive, mask = make_batch(batch, hard_negatives)
            if id_rows is not None:
                passages = kb.vectors(torch.tensor([id_rows[i] for i in _batch_passage_ids(batch, hard_negatives)]))
            opt.zero_grad(set_to_none=True)
            if grad_cache_chunk:
                loss, acc = grad_cache_step(model, questions, passages, positive, mask, chunk_size=grad_cache_chunk,
                                            temperature=temperature)
            else:
                loss, acc = uncached_step(model, questions, passages, positive, mask, temperature=temperature)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower the learning rate")
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss)
            accs.append(acc)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
            if step % log_every == 0 or step == steps:
                last = {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **last, "lr": sched.get_last_lr()[0], "epoch": epoch,
                                        "seconds": round(time.time() - t0, 2)}) + "\n")
                losses, accs = [], []
            if step % checkpoint_every == 0 or step == steps or step == stop_at:
                checkpoint()
            if stop_at is not None and step >= stop_at and step < steps:
                stopped = True
                break
    finally:
        bar.close()
    model.eval()
    if save_final and not stopped:
        model.save_pretrained(out / "final")
    return {"step": step, **last, "seconds": time.time() - t0, "stopped": stopped}


# ---------------------------------------------------------------------------------------------------------------
# command line

def train_retriever_cli(argv: list[str]) -> int:
    """`pyrag train-retriever`: fine-tune a DPR bi-encoder on (question, gold passage) pairs of a KB."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag train-retriever", description=(
        "Fine-tune a DPR bi-encoder with in-batch negatives and BM25 hard negatives mined from a knowledge base. "
        "Training questions: SQuAD JSON (gold = the question's paragraph, id 'title#j') or JSONL "
        "{\"question\", \"answers\", \"gold_ids\"}; gold ids must be passage ids of --kb. Resumes from "
        "OUT/checkpoint.pt when rerun."))
    ap.add_argument("--train", required=True, help="training questions (SQuAD JSON or JSONL with gold_ids)")
    ap.add_argument("--kb", required=True, help="knowledge base holding the gold passages (and the BM25 negatives)")
    ap.add_argument("--out", required=True, help="output directory (checkpoint.pt, metrics.jsonl, final/)")
    ap.add_argument("--encoder", default=None, help="initial encoder directory (default: the KB's encoder)")
    ap.add_argument("--separate", action="store_true", help="separate question and passage encoders")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hard-negatives", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--grad-cache-chunk", type=int, default=None, help="gradient caching chunk size (texts)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ..kb import KnowledgeBase
    from ..kb_io import read_qa
    from ..models.encoders import BiEncoder

    try:
        kb = KnowledgeBase.open(args.kb)
        if args.encoder:
            model = BiEncoder.from_pretrained(args.encoder, shared=not args.separate)
        else:
            rec = kb.meta["passage_encoder"]
            model = BiEncoder.from_pretrained(kb.encoder_dir(), shared=not args.separate,
                                              pooling=rec["pooling"], normalize=rec["normalize"],
                                              max_length=rec["max_length"])
        examples = examples_from_qa(read_qa(args.train), kb)
        if args.hard_negatives:
            examples = mine_hard_negatives(examples, kb, args.hard_negatives, seed=args.seed,
                                           show_progress=not args.no_progress)
        res = train_retriever(model, examples, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                              hard_negatives=args.hard_negatives, lr=args.lr, temperature=args.temperature,
                              grad_cache_chunk=args.grad_cache_chunk, checkpoint_every=args.checkpoint_every,
                              seed=args.seed, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"pyrag train-retriever: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0
