"""The `pyrag` command: a thin dispatcher. Each subcommand lives beside the code it drives and is imported only
when run, so `pyrag --help` stays fast and a command never pays for another's imports."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "demo": ("pyrag.demo", "demo_cli", "train and compare closed-book vs RAG QA on an embedded synthetic corpus"),
    "build-kb": ("pyrag.kb", "build_kb_cli", "encode passages (JSONL, DPR TSV or SQuAD JSON) into a knowledge base"),
    "train-retriever": ("pyrag.train.retriever", "train_retriever_cli", "fine-tune a DPR bi-encoder"),
    "eval-retriever": ("pyrag.metrics", "eval_retriever_cli", "retrieval recall@k / MRR of a knowledge base"),
    "train": ("pyrag.train.rag_cli", "train_cli", "jointly train a RAG-Token / RAG-Sequence model"),
    "ask": ("pyrag.train.rag_cli", "ask_cli", "answer a question with a trained model, showing the passages used"),
    "eval": ("pyrag.train.rag_cli", "eval_cli", "exact match / F1 of a trained model on a QA file"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pyrag <command> [options]   (pyrag <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"pyrag {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"pyrag: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if "--no-progress" in argv:  # transformers' own bars too (loading / saving weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except KeyboardInterrupt:
        print("\npyrag: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
