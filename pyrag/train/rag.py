"""Joint RAG fine-tuning (question encoder + generator; the knowledge base stays frozen): AdamW with one learning
rate per part, linear warmup and decay, gradient accumulation and clipping, bf16 autocast on GPU, exact resume,
JSONL metrics and periodic dev EM; `evaluate_rag` (EM / F1 / recall@k). Run state on disk: checkpoint.py; the
`pyrag train`, `ask`, `eval` commands: rag_cli.py."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    CHECKPOINT,
    METRICS,
    EpochOrder,
    append_metrics,
    load_checkpoint,
    read_state,
    rng_state,
    run_identity,
    save_checkpoint,
    settings_diff,
    truncate_metrics,
)
from .distributed import (
    average_gradients,
    barrier,
    broadcast_parameters,
    current_group,
    gather_objects,
    sum_floats,
)

__all__ = ["evaluate_rag", "load_qa", "train_rag"]

MODEL = "model"


# ---- data ----

def load_qa(path) -> list[dict]:
    """QA records {"question", "answers": [str], "gold_ids": [str]} from JSONL ({"question", "answers"}) or SQuAD
    JSON (see pyrag.kb_io.read_qa)."""
    from ..kb_io import read_qa

    return read_qa(path)


def check_data(name: str, data) -> list[dict]:
    return _located_data(name, data)[0]


def _located_data(name: str, data) -> tuple[list[dict], list[str]]:
    """(records, where each one is: "file:line" / "file: item i" for a file, "name[i]" for a list), every record
    checked: a non-empty "question" string and a non-empty list of non-empty answer strings ("answers", or one
    string; "answer" when "answers" is absent: read_qa's rules)."""
    if isinstance(data, (str, os.PathLike)):
        from ..kb_io import read_qa_located

        path = Path(data)
        located = read_qa_located(path)
        if not located:
            why = ("the file is empty" if path.name.lower().endswith(".jsonl") else
                   "no questions, or (SQuAD v2.0) only unanswerable ones")
            raise ValueError(f"{name}: {str(path)!r} holds no usable questions ({why})")
        wheres, data = [w for w, _ in located], [r for _, r in located]
    else:
        data = list(data)
        if not data:
            raise ValueError(f"{name} is empty")
        wheres = [f"{name}[{i}]" for i in range(len(data))]
    out = []
    for where, r in zip(wheres, data):
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not r["question"].strip():
            raise ValueError(f"{where} needs a non-empty 'question' string, got {r!r}"[:300])
        key = "answers" if "answers" in r or "answer" not in r else "answer"
        answers = r.get(key)
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{where} needs {key!r}: a non-empty list of non-empty strings, got {r.get(key)!r}"[:300])
        out.append({"question": r["question"], "answers": answers, "gold_ids": list(r.get("gold_ids") or [])})
    return out, wheres


def _check_answer_lengths(model, train: list[dict], wheres: list[str], chunk: int = 512) -> None:
    """Refuse, before training starts, training targets (first answers) longer than the generator takes, naming
    where they are; otherwise the first batch that holds one would stop the run."""
    gen = getattr(model, "generator", None)
    limit = getattr(gen, "max_answer_length", None)
    if limit is None or not hasattr(gen, "answer_lengths"):
        return
    long = []
    for s in range(0, len(train), chunk):  # the generator's own tokenisation (special tokens, eos)
        lengths = gen.answer_lengths([r["answers"][0] for r in train[s:s + chunk]])
        long += [(s + i, n) for i, n in enumerate(lengths) if n > limit]
    if long:
        shown = "; ".join(f"{wheres[i]} ({n} tokens: {train[i]['answers'][0][:60]!r})" for i, n in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        raise ValueError(f"{len(long)} training answer(s) longer than the generator's max_answer_length={limit} "
                         f"tokens: {shown}{more}. Only the first answer of a record is trained on: shorten or drop "
                         f"these records (or put a shorter answer first), or raise the limit (max_answer_length= in "
                         f"RagToken / RagSequence.from_parts, at most the generator's position embeddings)")


# ---- training ----

def _param_groups(model, lr_generator: float, lr_question_encoder: float, weight_decay: float) -> list[dict]:
    groups = []
    for part, lr in ((model.question_encoder, lr_question_encoder), (model.generator, lr_generator)):
        decay, no_decay = [], []
        for n, p in part.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in n.lower() else decay).append(p)
        name = "question_encoder" if part is model.question_encoder else "generator"
        groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay, "part": name},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0, "part": name}]
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def _sigint_deferred():
    """While training: the first Ctrl-C (SIGINT) only sets interrupt["asked"], which the loop checks after each
    step (it then writes a checkpoint and raises KeyboardInterrupt), so that an interrupted run resumes from where
    it stopped; a second Ctrl-C interrupts at once. Installed only in the main thread over Python's own handler
    (a program's own SIGINT handler is left alone)."""
    interrupt = {"asked": False}
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield interrupt
        return

    def handler(signum, frame):
        interrupt["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one stops at once

    signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train_rag(model, train_data, dev_data=None, *, steps: int, batch_size: int = 8, lr_generator: float = 3e-5,
              lr_question_encoder: float = 1e-5, out_dir, warmup_steps: int = 0,
              warmup_steps_question_encoder: int | None = None, grad_accum: int = 1,
              max_grad_norm: float | None = 1.0, weight_decay: float = 0.0, seed: int = 0, eval_every: int = 0,
              save_every: int = 0, log_every: int = 10, bf16: bool = True, resume: bool = True,
              stop_at: int | None = None, n_docs: int | None = None, epsilon: float | None = None,
              eval_kwargs: dict | None = None, show_progress: bool = True, save_model: bool = True,
              distributed: bool = False) -> dict:
    """Fine-tune a RagToken / RagSequence on (question, answer) pairs; the passages stay as indexed.

    train_data / dev_data: lists of {"question", "answers": [...]} (the first answer is the training target) or
    a JSONL / SQuAD JSON path. One step = grad_accum micro-batches of batch_size questions, then clipping to
    max_grad_norm, AdamW (lr_question_encoder / lr_generator, linear warmup over warmup_steps, then linear decay
    to 0 at `steps`; warmup_steps_question_encoder, if given, warms the question encoder up separately: a longer
    one keeps a fresh generator's uninformative passage posteriors from pushing the retriever around). bf16
    autocast on CUDA only (CPU runs fp32). Every eval_every steps: EM / F1 / recall on dev_data (JSONL metrics and
    the progress bar show them; with eval_every=0, once at the end); every save_every steps, at the end, and when
    a Ctrl-C (SIGINT, in the main thread) stops training after the step it interrupted, a checkpoint in
    out_dir/checkpoint: weights, optimizer, scheduler, RNG states and data position, so that training resumed from
    it (resume=True, the default, whenever one exists) continues exactly as if never stopped (a second Ctrl-C
    stops at once). The checkpoint records what defines the run (these arguments, the model's settings, the
    fingerprints of the training data, the knowledge base, the generator's and question encoder's config and
    tokenizer); resuming with any of them changed is a ValueError naming each. stop_at: end this run after that
    step (a checkpoint is written), e.g. to split a run into jobs. Answers longer than the generator takes
    are refused before training starts.
    A non-finite loss or gradient stops training with FloatingPointError, leaving the last good checkpoint.
    The final model is saved (save_pretrained) to out_dir/model. Returns a dict of final metrics.

    Data parallel (distributed=True): called on every rank of an initialised torch.distributed process group of 2+
    ranks (e.g. under torchrun; `pyrag train` joins one by itself), it trains one model across the ranks (under
    NCCL each rank's model on its own GPU; torch.cuda.set_device is done to match). batch_size is per rank: each micro-batch of the global example stream
    is batch_size * world_size questions, rank r taking the r-th slice, and the gradients are averaged over the
    ranks before clipping -- the same update as one process with batch_size * world_size. Rank 0's weights are
    broadcast at the start; every rank retrieves from its own copy of the knowledge base (a memory-mapped index
    shares its pages between the processes of one machine); dev evaluation is split over the ranks. Rank 0
    alone writes out_dir (which every rank must see: the checkpoint holds every rank's RNG state) and shows
    progress. Resuming needs the same world size."""
    train, wheres = _located_data("train_data", train_data)
    dev = check_data("dev_data", dev_data) if dev_data is not None else None
    for name, v in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("lr_generator", lr_generator), ("lr_question_encoder", lr_question_encoder),
                    ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not max_grad_norm >= 0):
        raise ValueError(f"max_grad_norm must be a number >= 0 (0 or None: no clipping), got {max_grad_norm!r}")
    for name, v in (("eval_every", eval_every), ("save_every", save_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: never), got {v!r}")
    if eval_every and dev is None:
        raise ValueError(f"eval_every={eval_every} needs dev_data to evaluate on")
    qe_warmup = warmup_steps if warmup_steps_question_encoder is None else warmup_steps_question_encoder
    for name, v in (("warmup_steps", warmup_steps), ("warmup_steps_question_encoder", qe_warmup)):
        if not isinstance(v, int) or not 0 <= v <= steps:
            raise ValueError(f"{name} must be an int in [0, steps={steps}], got {v!r}")
    if hasattr(model, "_k"):
        model._k(n_docs)  # n_docs larger than the KB: refused before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    device = next(model.parameters()).device
    g = _join_group(distributed, device)
    rank, world, main = (g.rank, g.size, g.main) if g else (0, 1, True)
    try:
        _check_answer_lengths(model, train, wheres)
        refused = None
    except ValueError as e:
        if g is None:
            raise
        refused = e
    if g is not None:  # all ranks refuse together (a rank raising alone would leave the others in a collective)
        seen = gather_objects(None if refused is None else str(refused), g)
        if refused is not None:
            raise refused
        if any(seen):
            r = next(r for r, x in enumerate(seen) if x)
            raise ValueError(f"rank {r} refused the training data: {seen[r]}")
    out.mkdir(parents=True, exist_ok=True)
    amp = bool(bf16) and device.type == "cuda"

    opt = torch.optim.AdamW(_param_groups(model, lr_generator, lr_question_encoder, weight_decay))

    def schedule(warmup: int):
        def f(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            return max(0.0, (steps - step) / max(1, steps - warmup))
        return f

    qe_groups = sum(1 for g in opt.param_groups if g["part"] == "question_encoder")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [schedule(qe_warmup)] * qe_groups +
                                              [schedule(warmup_steps)] * (len(opt.param_groups) - qe_groups))
    step, pos, best, running = 0, 0, None, []
    # what decides the examples, the schedule, the update and the saved model: resuming under other values would
    # not continue the same run (checked against the checkpoint's state.json before anything is loaded into the
    # model; checkpoints written before a key was recorded are taken as matching). n_docs / epsilon as in effect
    # (None: the model's); identity: the model's settings and the fingerprints of the data, KB, generator and
    # question encoder (see run_identity)
    identity, sources = run_identity(model, train, train_data)
    run_config = {"seed": seed, "batch_size": batch_size, "steps": steps, "grad_accum": grad_accum,
                  "lr_generator": lr_generator, "lr_question_encoder": lr_question_encoder,
                  "warmup_steps": warmup_steps, "warmup_steps_question_encoder": qe_warmup,
                  "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                  "n_docs": getattr(model, "n_docs", None) if n_docs is None else n_docs,
                  "epsilon": getattr(model, "label_smoothing", None) if epsilon is None else float(epsilon),
                  "bf16": bool(bf16), "world_size": world, **identity, "sources": sources}
    found = resume and (out / CHECKPOINT / "trainer.pt").exists()
    if g is not None:  # every rank must take the same branch (resume or start), or the collectives below mismatch
        seen = gather_objects(bool(found), g)
        if any(seen) and not all(seen):
            raise ValueError(f"{out / CHECKPOINT} is visible on rank(s) {[r for r, x in enumerate(seen) if x]} only: "
                             f"out_dir must be one directory that every rank sees (a shared file system)")
    if found:
        diff = settings_diff(read_state(out), run_config)
        if diff:
            raise ValueError(f"{out / CHECKPOINT} was written with {', '.join(diff)}. A checkpoint resumes only the "
                             f"run it belongs to: rerun with its settings, or use a new out_dir (--out) to start "
                             f"another run")
        st = load_checkpoint(out, model, opt, sched, rank)
        step, pos, best = st["step"], st["data_pos"], st.get("best_dev_em")
        running = list(st.get("running", []))  # the losses of the log window the checkpoint fell into
        if main:
            truncate_metrics(out, step)
    else:
        # one stream of random numbers per rank (dropout differs across the ranks' examples); rank 0's is a
        # single process's
        rseed = seed + 7919 * rank
        torch.manual_seed(rseed)
        random.seed(rseed)
        np.random.seed(rseed % 2**32)
        if main:
            (out / METRICS).unlink(missing_ok=True)
        if g is not None:
            broadcast_parameters([model.question_encoder, model.generator], g)
    last_ckpt = step if (out / CHECKPOINT).exists() else None
    resumed_finished = found and step >= steps
    end = steps if stop_at is None else min(steps, stop_at)
    order = EpochOrder(len(train), seed)

    def checkpoint():
        nonlocal last_ckpt
        rng = gather_objects(rng_state(), g) if g is not None else rng_state()
        if main:
            save_checkpoint(out, model, opt, sched, {"step": step, "data_pos": pos, "best_dev_em": best,
                                                      "running": list(running), **run_config}, rng)
        if g is not None:
            barrier(g)  # nobody moves on (or reads it back) before it is whole
        last_ckpt = step

    def bad(what: str, value: float):
        where = (f"the last good checkpoint is {out / CHECKPOINT} (step {last_ckpt})" if last_ckpt is not None
                 else "no checkpoint was written yet")
        raise FloatingPointError(f"training stopped: the {what} is {value} at step {step + 1}; {where}. Lower the "
                                 f"learning rates or check the data.")

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc="train rag", unit="step", disable=not show_progress or not main)
    model.train()
    dev_metrics, t0 = None, time.time()
    params = [p for group in opt.param_groups for p in group["params"]]

    def lr(part: str) -> float | None:  # None: that part is frozen (no parameter group)
        return next((grp["lr"] for grp in opt.param_groups if grp["part"] == part), None)

    with _sigint_deferred() as interrupt:
        try:
            while step < end:
                total, nonfinite, failed = 0.0, None, None
                for _ in range(grad_accum):
                    first = pos + rank * batch_size  # this rank's slice of the global micro-batch
                    batch = [train[order[first + i]] for i in range(batch_size)]
                    pos += batch_size * world
                    if failed is not None:
                        continue
                    try:
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                            o = model([r["question"] for r in batch], [r["answers"][0] for r in batch],
                                      n_docs=n_docs, epsilon=epsilon, reduction="mean", return_posterior=False,
                                      inplace_backward=True)
                        loss = o.loss / grad_accum
                        value = loss.item()
                        if not math.isfinite(value):
                            nonfinite = value
                            if g is None:
                                bad("loss", value)
                        else:
                            loss.backward()
                            total += value
                        del o, loss
                    except Exception as e:  # re-raised below, once the other ranks have heard of it
                        if g is None:
                            raise
                        failed = e
                asked = interrupt["asked"]
                if g is not None:
                    # every rank learns of a bad loss or an error anywhere (e.g. an over-long answer in one rank's
                    # slice, out of memory), so all stop together instead of some waiting in a collective
                    # (and of a Ctrl-C: the flag as it stood here, so that every rank stops after the same step)
                    total, n_bad, n_failed, asked = sum_floats([total, nonfinite is not None, failed is not None,
                                                                interrupt["asked"]], g)
                    total /= world
                    if failed is not None:
                        raise failed
                    if n_failed:
                        raise RuntimeError(f"training stopped: another rank failed at step {step + 1} (its error is "
                                           f"in its own output); the last good checkpoint is step {last_ckpt}")
                    if n_bad:
                        bad("loss", nonfinite if nonfinite is not None else "non-finite on another rank")
                    average_gradients(params, g)
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
                if not torch.isfinite(norm):
                    bad("gradient norm", float(norm))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                running.append(total)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}",
                                **({"dev_em": f"{dev_metrics['em']:.3f}"} if dev_metrics else {}))
                # log windows end at multiples of log_every (and the last step), also across a stop and resume: the
                # window's losses so far travel in the checkpoint
                if log_every and (step % log_every == 0 or step == steps):
                    if main:
                        append_metrics(out, {"step": step, "loss": sum(running) / len(running),
                                              "lr_generator": lr("generator"),
                                              "lr_question_encoder": lr("question_encoder"),
                                              "grad_norm": float(norm), "examples": pos,
                                              "seconds": round(time.time() - t0, 3)})
                    running = []
                if dev is not None and ((eval_every and step % eval_every == 0) or step == steps):
                    dev_metrics = evaluate_rag(model, dev,
                                               **{**(eval_kwargs or {}), "distributed": g is not None})
                    model.train()
                    best = dev_metrics["em"] if best is None else max(best, dev_metrics["em"])
                    if main:
                        append_metrics(out, {"step": step, **{f"dev_{k}": v for k, v in dev_metrics.items()}})
                if (save_every and step % save_every == 0) or step == end:
                    checkpoint()
                if asked and step < end:  # Ctrl-C: stop after this step, resumable from it
                    if last_ckpt != step:
                        checkpoint()
                    raise KeyboardInterrupt(f"training interrupted after step {step}; checkpoint written")
        finally:
            bar.close()
    result = {"step": step, "finished": step >= steps, "checkpoint": str(out / CHECKPOINT), "best_dev_em": best,
              "dev": dev_metrics}
    if step >= steps and save_model:
        # a finished run rerun: the model under out_dir/model is already these weights
        if main and not (resumed_finished and (out / MODEL).is_dir()):
            model.save_pretrained(out / MODEL)
        if g is not None:
            barrier(g)
        result["model"] = str(out / MODEL)
    if interrupt["asked"]:  # Ctrl-C during the last step (or its dev evaluation): finished and saved, then stop
        raise KeyboardInterrupt(f"training interrupted during its last step {step}; the run finished and was saved")
    return result


def _join_group(distributed: bool, device: torch.device):
    """The process group train_rag / evaluate_rag run across (None: one process). Under NCCL the current CUDA device
    is set to the model's, so the collectives' buffers are on this rank's GPU."""
    if not distributed:
        return None
    g = current_group()
    if g is None:
        raise ValueError("distributed=True needs an initialised torch.distributed process group of 2+ ranks "
                         "(dist.init_process_group, e.g. under torchrun)")
    if g.comm.type == "cuda":
        if device.type != "cuda":
            raise ValueError(f"an NCCL process group moves CUDA tensors only; the model is on {device}")
        if device.index is not None and device.index != torch.cuda.current_device():
            torch.cuda.set_device(device)
            g = current_group()
    return g


# ---- evaluation ----

def evaluate_rag(model, data, *, batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 20,
                 n_docs: int | None = None, decoding: str | None = None, ks=(1, 5, 20),
                 show_progress: bool = False, return_predictions: bool = False, distributed: bool = False) -> dict:
    """Generate an answer for every question and score it: {"em", "f1"} (SQuAD v1.1 normalisation, max over the
    gold answers), retrieval "recall@k" (an answer occurs in one of the top-k passages, for the ks up to n_docs
    and n_docs itself), and
    "gold_recall@k" when the records name gold passages ("gold_ids"); "n" questions. data: records or a path.
    distributed=True (every rank of an initialised torch.distributed group calls it with the same data): each
    rank answers every world_size-th question, and every rank returns the metrics of all of them."""
    from ..metrics import exact_match, f1_score, retrieval_report

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    data = check_data("data", data)
    K = model.n_docs if n_docs is None else n_docs
    ks = tuple(sorted({k for k in ks if k <= K} | {K}))  # recall at n_docs always, as at the smaller ks asked
    grp = _join_group(distributed, next(model.parameters()).device)
    mine = data[grp.rank::grp.size] if grp else data
    preds, texts, ids = [], [], []
    from tqdm.auto import tqdm

    quiet = not show_progress or (grp is not None and not grp.main)
    for s in tqdm(range(0, len(mine), batch_size), desc="eval rag", disable=quiet):
        part = mine[s:s + batch_size]
        g = model.generate([r["question"] for r in part], num_beams=num_beams, max_new_tokens=max_new_tokens,
                           n_docs=K, decoding=decoding)
        preds += g.answers
        texts += [[f"{t} {x}" for t, x in zip(ts, xs)] for ts, xs in zip(g.titles, g.texts)]
        ids += g.ids
    if grp is not None:  # back into data order: question i was answered by rank i % size, as its (i // size)-th
        parts = gather_objects((preds, texts, ids), grp)
        preds, texts, ids = ([parts[i % grp.size][j][i // grp.size] for i in range(len(data))] for j in range(3))
    answers = [r["answers"] for r in data]
    gold = [r["gold_ids"] for r in data]
    res = {"em": sum(exact_match(p, a) for p, a in zip(preds, answers)) / len(data),
           "f1": sum(f1_score(p, a) for p, a in zip(preds, answers)) / len(data)}
    rep = retrieval_report(texts, ids, answers, gold if all(gold) else None, ks=ks)
    res.update({k: v for k, v in rep.items() if k != "questions"})
    res["n"] = len(data)
    if return_predictions:
        res["predictions"] = preds
    return res
