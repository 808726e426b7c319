"""The `pyrag train`, `pyrag ask` and `pyrag eval` commands over pyrag/train/rag.py: argument parsing, up-front
checks of paths and devices, and user errors as one-line messages (exit 2) instead of tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .._argparse import DefaultsFormatter
from . import rag as _rag  # train_rag looked up at call time (tests replace it)
from .checkpoint import CHECKPOINT
from .distributed import init_from_env
from .rag import MODEL, check_data, evaluate_rag

__all__ = ["ask_cli", "eval_cli", "train_cli"]


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
        res = _rag.train_rag(model, args.train, args.dev, distributed=device is not None, steps=args.steps,
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
        data = check_data("--data", args.data)[: args.limit]
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
