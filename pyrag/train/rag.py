"""Joint RAG fine-tuning (question encoder + generator; the knowledge base stays frozen): AdamW with one learning
rate per part, linear warmup and decay, gradient accumulation and clipping, bf16 autocast on GPU, exact resume,
JSONL metrics and periodic dev EM; `evaluate_rag` (EM / F1 / recall@k); the `pyrag train`, `ask`, `eval` commands."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .._argparse import DefaultsFormatter
from ..kb_io import atomic_dir
from .distributed import (
    average_gradients,
    barrier,
    broadcast_parameters,
    current_group,
    gather_objects,
    init_from_env,
    sum_floats,
)

__all__ = ["ask_cli", "eval_cli", "evaluate_rag", "load_qa", "train_cli", "train_rag"]

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
MODEL = "model"


# ---- data ----

def load_qa(path) -> list[dict]:
    """QA records {"question", "answers": [str], "gold_ids": [str]} from JSONL ({"question", "answers"}) or SQuAD
    JSON (see pyrag.kb_io.read_qa)."""
    from ..kb_io import read_qa

    return read_qa(path)


def _check_data(name: str, data) -> list[dict]:
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


class _Order:
    """The endless example stream: position pos is example order[pos] of the data, epoch e = pos // N being a fixed
    seeded permutation. The permutation is made once per epoch (positions only move forward)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = n, seed, None, None

    def __getitem__(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self.perm[i]


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


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _records_fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["question"], r["answers"], r["gold_ids"]]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures")


def _part_fingerprint(module) -> str | None:
    """What a checkpoint does not restore of a generator / question encoder: its HF config and tokenizer (the
    weights, trained or frozen, come from the checkpoint). Two copies of one model in different directories agree."""
    hf = getattr(module, "model", None)
    cfg = getattr(hf, "config", None)
    if cfg is None:
        return None
    cfg = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG}
    tok = getattr(module, "tokenizer", None)
    vocab = sorted(tok.get_vocab().items()) if tok is not None and hasattr(tok, "get_vocab") else None
    extra = {k: getattr(module, k, None) for k in ("pooling", "normalize", "max_length", "kind")}
    return _short_hash([cfg, vocab, extra])


def _source(module) -> str | None:
    src = getattr(getattr(module, "model", None), "name_or_path", None) or getattr(module, "name", None)
    return str(Path(src).resolve()) if src and Path(src).exists() else (src or None)


def _run_identity(model, train: list[dict], train_data) -> tuple[dict, dict]:
    """(identity, sources) of a run beyond train_rag's own arguments: the model's settings (mode, smoothing,
    n_docs, input format...), fingerprints of the generator and question encoder (config + tokenizer), of the
    knowledge base (passages, encoder, index) and of the training records; sources: where those came from (paths,
    shown in messages but not compared: the same data moved elsewhere is the same run)."""
    cfg = model.config_dict() if hasattr(model, "config_dict") else {}
    ident = {f"model_{k}": v for k, v in cfg.items() if k not in ("format", "version", "kb_path")}
    parts = {name: getattr(model, name, None) for name in ("question_encoder", "generator")}
    for name, part in parts.items():
        if part is not None:
            ident[name] = _part_fingerprint(part)
    ident["trainable_parameters"] = {name: sum(p.numel() for p in part.parameters() if p.requires_grad)
                                     for name, part in parts.items() if isinstance(part, torch.nn.Module)}
    kb = getattr(model, "kb", None)
    meta = getattr(kb, "meta", None) or {}
    if meta:
        ident["kb"] = _short_hash([meta.get("passages_sha256"), meta.get("count"), meta.get("index"),
                                   (meta.get("passage_encoder") or {}).get("fingerprint")])
    ident["train_data"] = f"{_records_fingerprint(train)} ({len(train)} records)"
    sources = {"generator": _source(parts["generator"]), "question_encoder": _source(parts["question_encoder"]),
               "kb": str(Path(kb.path).resolve()) if getattr(kb, "path", None) else None,
               "train_data": str(Path(train_data).resolve()) if isinstance(train_data, (str, os.PathLike)) else None}
    return ident, {k: v for k, v in sources.items() if v is not None}


def _settings_diff(saved: dict, given: dict) -> list[str]:
    """ "key=saved (now value)" for each setting recorded in `saved` that `given` changes (a key the
    checkpoint lacks, from before it was recorded, counts as matching; dicts are compared key by key, shown as
    "key.sub"); paths from the "sources" entries."""
    src_s, src_g = saved.get("sources") or {}, given.get("sources") or {}
    out = []

    def walk(a: dict, b: dict, prefix: str):
        for k, v in b.items():
            if prefix == "" and k == "sources" or k not in a or a[k] == v:
                continue
            if isinstance(a[k], dict) and isinstance(v, dict):
                walk(a[k], v, f"{prefix}{k}.")
                continue
            was, now = (f" from {src_s[k]}" if k in src_s else ""), (f" from {src_g[k]}" if k in src_g else "")
            out.append(f"{prefix}{k}={a[k]!r}{was} (now {v!r}{now})")

    walk(saved, given, "")
    return out


# ---- checkpoints ----



def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_checkpoint(out: Path, model, opt, sched, state: dict, rng) -> Path:
    """model weights (safetensors), optimizer, scheduler, RNG (one state, or a list of every rank's), step and data
    position, written to a temporary directory and swapped in: a crash leaves the previous checkpoint whole."""
    from safetensors.torch import save_model

    path = out / CHECKPOINT
    with atomic_dir(path, marker="trainer.pt") as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng, **state},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({k: v for k, v in state.items()
                                                    if k not in ("best_dev_em", "running")}) + "\n")
    return path


def _read_state(out: Path) -> dict:
    f = out / CHECKPOINT / "state.json"
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is damaged ({e}); delete {f.parent} to start over (or use a new out_dir)") from None


def _load_checkpoint(out: Path, model, opt, sched, rank: int = 0) -> dict:
    from safetensors.torch import load_model

    path = out / CHECKPOINT
    hint = f"delete {path} to start over from step 0 (or use a new out_dir)"
    f = path / "trainer.pt"
    try:  # read whole before the model is touched: a damaged file leaves the caller's model as it was
        st = torch.load(f, map_location="cpu", weights_only=False)
        if not isinstance(st, dict) or not {"optimizer", "scheduler", "rng", "step", "data_pos"} <= st.keys():
            raise ValueError("not a pyrag trainer state")
    except Exception as e:  # unpickling / zip / EOF errors of a cut or damaged file, whatever their type
        raise ValueError(f"{f} is damaged and cannot be resumed from ({type(e).__name__}: {e}); {hint}") from e
    f = path / "model.safetensors"
    try:
        load_model(model, str(f), device=str(next(model.parameters()).device))
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # safetensors' own error for a damaged file, RuntimeError for other tensor names
        raise ValueError(f"{f} cannot be loaded into this model ({type(e).__name__}: {str(e)[:300]}); {hint}") from e
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    rng = st["rng"]
    _set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # data-parallel runs keep every rank's
    return st


def _append_metrics(out: Path, rec: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(out: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again). A last line that does
    not parse (a write cut short by a kill) is dropped with a warning; one further up is an error."""
    f = out / METRICS
    if not f.exists():
        return
    lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as e:
            if i == last:
                warnings.warn(f"{f}:{i + 1}: dropped the last line, which does not parse (a write cut short?): "
                              f"{ln[:80]!r}", stacklevel=3)
                continue
            raise ValueError(f"{f}:{i + 1}: not a JSON log line ({e}); repair or delete that line to resume") from None
        if rec.get("step", 0) <= step:
            keep.append(ln)
    tmp = f.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, f)


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
    dev = _check_data("dev_data", dev_data) if dev_data is not None else None
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
    # question encoder (see _run_identity)
    identity, sources = _run_identity(model, train, train_data)
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
        diff = _settings_diff(_read_state(out), run_config)
        if diff:
            raise ValueError(f"{out / CHECKPOINT} was written with {', '.join(diff)}. A checkpoint resumes only the "
                             f"run it belongs to: rerun with its settings, or use a new out_dir (--out) to start "
                             f"another run")
        st = _load_checkpoint(out, model, opt, sched, rank)
        step, pos, best = st["step"], st["data_pos"], st.get("best_dev_em")
        running = list(st.get("running", []))  # the losses of the log window the checkpoint fell into
        if main:
            _truncate_metrics(out, step)
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
    order = _Order(len(train), seed)

    def checkpoint():
        nonlocal last_ckpt
        rng = gather_objects(_rng_state(), g) if g is not None else _rng_state()
        if main:
            _save_checkpoint(out, model, opt, sched, {"step": step, "data_pos": pos, "best_dev_em": best,
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
                        _append_metrics(out, {"step": step, "loss": sum(running) / len(running),
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
                        _append_metrics(out, {"step": step, **{f"dev_{k}": v for k, v in dev_metrics.items()}})
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
    data = _check_data("data", data)
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


# ---- command line ----

def _resolve_model_dir(path) -> Path:
    """A model directory, or a `pyrag train --out` directory holding one under model/."""
    from ..models.rag import CONFIG_NAME

    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / MODEL / CONFIG_NAME).is_file():
        return p / MODEL
    raise FileNotFoundError(f"no pyrag RAG model in {str(p)!r} (expected {CONFIG_NAME} there or under {MODEL}/)")


def _device(name: str | None) -> torch.device:
    """--device: cpu | cuda | cuda:N, checked before anything is loaded (default: cuda when there is one)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) here")
    return dev


# what a command reports as a usage error (exit 2, one line) rather than a traceback: bad arguments or data, and
# the file system's refusals (missing, unreadable, a directory where a file goes, no space...)
_USER_ERRORS = (ValueError, TypeError, OSError)


def _check_out_file(flag: str, path) -> None:
    """A file a command writes at its end: refused now if it cannot be, rather than after the work."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a directory; give a file name, e.g. {str(p / 'metrics.json')!r}")
    parent = next(d for d in (p.absolute().parent, *p.absolute().parent.parents) if d.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(p)!r}: cannot write there ({str(parent)!r} is not a writable directory)")


def train_cli(argv: list[str]) -> int:
    """`pyrag train`: jointly fine-tune a RAG model on a QA file."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag train", description=(
        "Jointly train the question encoder and the generator of a RAG-Token / RAG-Sequence model on "
        "(question, answers) pairs, retrieving from a fixed knowledge base. Data: JSONL lines "
        "{\"question\", \"answers\": [...]} or SQuAD JSON. Rerunning the same command with the same --out "
        "resumes exactly from the last checkpoint (written every --save-every steps, at the end, and when Ctrl-C "
        "stops training; a kill or crash loses the steps since the last one); other settings are refused. "
        "Data parallel: start it with torchrun (e.g. torchrun --nproc-per-node 2 -m pyrag train ...); "
        "--batch-size is then per process."))
    ap.add_argument("--kb", required=True, help="knowledge base directory (pyrag build-kb)")
    ap.add_argument("--train", required=True, help="training QA file")
    ap.add_argument("--dev", default=None, help="dev QA file (EM every --eval-every steps, and at the end)")
    ap.add_argument("--generator", required=True, help="HF seq2seq (or decoder-only) model directory with tokenizer")
    ap.add_argument("--question-encoder", default=None, help="encoder directory (default: the KB's encoder)")
    ap.add_argument("--mode", choices=["token", "sequence"], default="token")
    ap.add_argument("--out", required=True, help="output directory (checkpoint/, metrics.jsonl, model/)")
    ap.add_argument("--n-docs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr-generator", type=float, default=3e-5)
    ap.add_argument("--lr-question-encoder", type=float, default=1e-5)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--max-combined-length", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500,
                    help="checkpoint every N steps (0: only at the end and on Ctrl-C)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from ..kb import KnowledgeBase
    from ..models.encoders import Encoder
    from ..models.rag import RagSequence, RagToken

    try:  # the arguments, before anything slow is loaded
        if args.eval_every and args.dev is None:
            raise ValueError(f"--eval-every {args.eval_every} needs --dev (the QA file to evaluate on)")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} exists and is not a directory")
        _device(args.device)
    except _USER_ERRORS as e:
        print(f"pyrag train: error: {e}", file=sys.stderr)
        return 2
    joined = not torch.distributed.is_initialized()
    device = init_from_env(args.device)  # under torchrun: this rank's device, the process group joined
    joined = joined and device is not None
    main = device is None or torch.distributed.get_rank() == 0
    try:
        kb = KnowledgeBase.open(args.kb)
        qe = Encoder.from_pretrained(args.question_encoder) if args.question_encoder else None
        cls = RagToken if args.mode == "token" else RagSequence
        model = cls.from_parts(qe, args.generator, kb, n_docs=args.n_docs, label_smoothing=args.label_smoothing,
                               max_combined_length=args.max_combined_length).to(device or _device(args.device))
        res = train_rag(model, args.train, args.dev, distributed=device is not None, steps=args.steps,
                        batch_size=args.batch_size, lr_generator=args.lr_generator, lr_question_encoder=args.lr_question_encoder,
                        out_dir=args.out, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
                        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, seed=args.seed,
                        eval_every=args.eval_every, save_every=args.save_every, bf16=not args.no_bf16,
                        show_progress=not args.no_progress)
    except FloatingPointError as e:
        print(f"pyrag train: {e}", file=sys.stderr)
        return 1
    except _USER_ERRORS as e:
        print(f"pyrag train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        state = Path(args.out) / CHECKPOINT / "state.json"
        try:
            where = (f"the last checkpoint is step {json.loads(state.read_text())['step']} in {state.parent}. Rerun "
                     f"the same command to resume from it." if state.is_file() else
                     "no checkpoint was written yet (no training step had finished); a rerun starts from step 0.")
        except (OSError, ValueError, KeyError):
            where = f"{state} cannot be read."
        print(f"\npyrag train: interrupted; {where}", file=sys.stderr)
        return 130
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if main:
        print(json.dumps(res, indent=2))
    return 0


def _load_for_cli(model_dir, kb, device):
    from ..models.rag import RagModel

    return RagModel.from_pretrained(_resolve_model_dir(model_dir), kb=kb, device=_device(device))


def ask_cli(argv: list[str]) -> int:
    """`pyrag ask`: answer questions with a trained model and show the passages it used."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag ask", description=(
        "Answer a question with a trained RAG model; prints the answer and the retrieved passages with their "
        "prior p(z|x) and posterior p(z|x,answer)."))
    ap.add_argument("question", nargs="+", help="one or more questions")
    ap.add_argument("--model", required=True, help="model directory (or a `pyrag train --out` directory)")
    ap.add_argument("--kb", default=None, help="knowledge base directory (default: the one it was trained with)")
    ap.add_argument("--n-docs", type=int, default=None)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--decoding", choices=["thorough", "fast"], default=None, help="RAG-Sequence decoding")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    try:
        model = _load_for_cli(args.model, args.kb, args.device)
        g = model.generate(args.question, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                           n_docs=args.n_docs, decoding=args.decoding)
        post = g.doc_prior.clone()  # an empty answer tells nothing about the passages: posterior = prior
        said = [b for b, a in enumerate(g.answers) if a.strip()]
        if said:
            post[said] = model.passage_posterior([args.question[b] for b in said], [g.answers[b] for b in said],
                                                 n_docs=args.n_docs).doc_posterior.to(post)
    except _USER_ERRORS as e:
        print(f"pyrag ask: error: {e}", file=sys.stderr)
        return 2
    results = []
    for b, q in enumerate(args.question):
        results.append({"question": q, "answer": g.answers[b], "log_prob": float(g.scores[b]), "passages": [
            {"id": g.ids[b][k], "title": g.titles[b][k], "text": g.texts[b][k],
             "prior": float(g.doc_prior[b, k]), "posterior": float(post[b, k])} for k in range(len(g.ids[b]))]})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"Q: {r['question']}\nA: {r['answer']}   (log p = {r['log_prob']:.3f})")
        for k, p in enumerate(r["passages"]):
            text = p["text"] if len(p["text"]) <= 160 else p["text"][:157] + "..."
            print(f"  [{k + 1}] prior {p['prior']:.3f}  posterior {p['posterior']:.3f}  {p['id']}: "
                  f"{p['title']} / {text}")
    return 0


def eval_cli(argv: list[str]) -> int:
    """`pyrag eval`: EM / F1 / recall@k of a trained model on a QA file."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag eval", description=(
        "Generate answers for a QA file (JSONL {\"question\", \"answers\"} or SQuAD JSON) and report exact match "
        "and F1 (SQuAD v1.1 normalisation) and retrieval recall@k."))
    ap.add_argument("--model", required=True, help="model directory (or a `pyrag train --out` directory)")
    ap.add_argument("--data", required=True, help="QA file")
    ap.add_argument("--kb", default=None)
    ap.add_argument("--n-docs", type=int, default=None)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decoding", choices=["thorough", "fast"], default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--out", default=None, help="also write the metrics (and predictions) as JSON here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:  # arguments and data first, the model (slow) last
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.out:
            _check_out_file("--out", args.out)
        _device(args.device)
        data = _check_data("--data", args.data)[: args.limit]
        model = _load_for_cli(args.model, args.kb, args.device)
        res = evaluate_rag(model, data, batch_size=args.batch_size, num_beams=args.num_beams,
                           max_new_tokens=args.max_new_tokens, n_docs=args.n_docs, decoding=args.decoding,
                           show_progress=not args.no_progress, return_predictions=args.out is not None)
        if args.out:
            from ..kb_io import write_json_atomic

            write_json_atomic(args.out, res)
    except _USER_ERRORS as e:
        print(f"pyrag eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "predictions"}, indent=2))
    return 0
