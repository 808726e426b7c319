"""A training run's state on disk (pyrag/train/rag.py's loop): the checkpoint directory (weights, optimizer,
scheduler, every rank's RNG, data position; written atomically), the run's identity that a resume must match
(settings, and fingerprints of the models' configs, tokenizers, knowledge base and data), and the metrics log."""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from ..kb_io import atomic_dir

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


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


def run_identity(model, train: list[dict], train_data) -> tuple[dict, dict]:
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


# train_rag arguments older checkpoints stored as passed (None: take the model's value) rather than as used
_RECORDED_AS_GIVEN = ("n_docs", "epsilon")


def settings_diff(saved: dict, given: dict) -> list[str]:
    """ "key=saved (now value)" for each setting recorded in `saved` that `given` changes (a key the
    checkpoint lacks, from before it was recorded, counts as matching; dicts are compared key by key, shown as
    "key.sub"); paths from the "sources" entries."""
    src_s, src_g = saved.get("sources") or {}, given.get("sources") or {}
    out = []

    def walk(a: dict, b: dict, prefix: str):
        for k, v in b.items():
            if prefix == "" and k == "sources" or k not in a or a[k] == v:
                continue
            if prefix == "" and k in _RECORDED_AS_GIVEN and a[k] is None:
                continue  # checkpoints before this was recorded hold the argument as passed: None = the model's
            if isinstance(a[k], dict) and isinstance(v, dict):
                walk(a[k], v, f"{prefix}{k}.")
                continue
            was, now = (f" from {src_s[k]}" if k in src_s else ""), (f" from {src_g[k]}" if k in src_g else "")
            out.append(f"{prefix}{k}={a[k]!r}{was} (now {v!r}{now})")

    walk(saved, given, "")
    return out


# ---- data order ----

def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s order of n examples, a permutation fixed by (seed, epoch): a resumed run replays it from
    its saved position (every trainer here: RAG, retriever, the demo's generator)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochOrder:
    """The endless example stream: position pos is example order[pos] of the data, epoch e = pos // N being
    epoch_permutation(N, seed, e). The permutation is made once per epoch (positions only move forward)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = n, seed, None, None

    def __getitem__(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, epoch_permutation(self.n, self.seed, epoch)
        return self.perm[i]


# ---- checkpoints ----

def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "numpy" in st:  # absent in the demo's checkpoints written before it shared this state
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, model, opt, sched, state: dict, rng) -> Path:
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


def read_state(out: Path) -> dict:
    f = out / CHECKPOINT / "state.json"
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is damaged ({e}); delete {f.parent} to start over (or use a new out_dir)") from None


def load_checkpoint(out: Path, model, opt, sched, rank: int = 0) -> dict:
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
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # data-parallel runs keep every rank's
    return st


def append_metrics(out: Path, rec: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
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
