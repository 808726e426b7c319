"""`pyrag demo`: retrieval-augmented QA trained end to end on an embedded synthetic corpus, compared with a
closed-book model of the same size and budget. The pipeline is in run.py, the corpus in corpus.py."""

from __future__ import annotations


def demo_cli(argv: list[str]) -> int:
    """Entry point of `pyrag demo` (see `pyrag demo --help`); returns the exit code (130 when interrupted)."""
    from .run import main

    return main(argv)


__all__ = ["demo_cli"]
