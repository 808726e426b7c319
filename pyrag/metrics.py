"""QA and retrieval metrics: SQuAD v1.1 answer normalisation, exact match and F1, answer-in-passage tests,
recall@k (DPR's top-k accuracy), gold-passage recall@k and MRR; plus the `pyrag eval-retriever` command."""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
from collections.abc import Iterable, Sequence

from ._argparse import DefaultsFormatter

__all__ = [
    "answer_hits",
    "eval_retriever_cli",
    "exact_match",
    "f1_score",
    "gold_hits",
    "has_answer",
    "mrr",
    "normalize_answer",
    "recall_at_k",
    "retrieval_report",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse spaces."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}: {s!r}")
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("golds is empty: at least one reference answer is needed")
    return golds


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0 (SQuAD v1.1)."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalised strings, max over the gold answers (SQuAD v1.1)."""
    p = normalize_answer(pred).split()
    return max(_f1(p, normalize_answer(g).split()) for g in _golds(golds))


def has_answer(text: str, answers: str | Sequence[str]) -> bool:
    """Whether any answer occurs in `text` as a whole-word sequence after SQuAD normalisation of both.

    Whole words (like DPR's token-level has_answer): the answer "1" is not found in "1990". An answer that
    normalises to the empty string (e.g. "the") never matches."""
    hay = f" {normalize_answer(text)} "
    for a in _golds(answers):
        na = normalize_answer(a)
        if na and f" {na} " in hay:
            return True
    return False


def answer_hits(texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]]) -> list[list[bool]]:
    """hits[q][r] = has_answer(texts[q][r], answers[q]); texts are the retrieved passages per question."""
    if len(texts) != len(answers):
        raise ValueError(f"texts and answers differ in length: {len(texts)=} {len(answers)=}")
    return [[has_answer(t, a) for t in ts] for ts, a in zip(texts, answers)]


def gold_hits(ids: Sequence[Sequence[str]], gold_ids: Sequence[str | Iterable[str]]) -> list[list[bool]]:
    """hits[q][r] = ids[q][r] is (one of) the gold passage id(s) of question q."""
    if len(ids) != len(gold_ids):
        raise ValueError(f"ids and gold_ids differ in length: {len(ids)=} {len(gold_ids)=}")
    out = []
    for row, g in zip(ids, gold_ids):
        gs = {g} if isinstance(g, str) else set(g)
        out.append([i in gs for i in row])
    return out


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Iterable[int] = (1, 5, 20)) -> dict[int, float]:
    """Fraction of questions with at least one hit among their top-k retrieved passages, for each k.

    hits[q] lists, best first, whether each retrieved passage counts (answer_hits / gold_hits). A question with
    fewer than k retrieved passages is judged on those it has."""
    if len(hits) == 0:
        raise ValueError("hits is empty: no questions to evaluate")
    out = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out[int(k)] = sum(any(h[:k]) for h in hits) / len(hits)
    return out


def mrr(hits: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """Mean reciprocal rank of the first hit (0 for a question with none within the first k)."""
    if len(hits) == 0:
        raise ValueError("hits is empty: no questions to evaluate")
    total = 0.0
    for h in hits:
        for r, ok in enumerate(h[:k] if k else h):
            if ok:
                total += 1.0 / (r + 1)
                break
    return total / len(hits)


def retrieval_report(texts, ids, answers, gold_ids=None, ks=(1, 5, 20)) -> dict:
    """{"recall@k": .., "mrr": .., and with gold ids "gold_recall@k": .., "gold_mrr": ..} for retrieved
    passages (texts/ids: [Q][k] nested lists) against answer strings and optional gold passage ids."""
    ah = answer_hits(texts, answers)
    rep = {f"recall@{k}": v for k, v in recall_at_k(ah, ks).items()}
    rep["mrr"] = mrr(ah)
    if gold_ids is not None:
        gh = gold_hits(ids, gold_ids)
        rep.update({f"gold_recall@{k}": v for k, v in recall_at_k(gh, ks).items()})
        rep["gold_mrr"] = mrr(gh)
    rep["questions"] = len(ah)
    return rep


DEFAULT_KS = (1, 5, 20)


def _cutoffs(given: list[int] | None, n: int) -> list[int]:
    """The recall@k cut-offs for a KB of n passages: the given ones (each in [1, n], else ValueError), or
    DEFAULT_KS without those above n, with n itself as the largest when any was dropped."""
    if given is None:
        ks = [k for k in DEFAULT_KS if k <= n]
        return ks + [n] if len(ks) < len(DEFAULT_KS) and n not in ks else ks
    bad = [k for k in given if not 1 <= k <= n]
    if bad:
        raise ValueError(f"--k {bad[0]} is out of range: each cut-off must be in [1, {n}] (the KB holds {n} "
                         f"passages)")
    return sorted(set(given))


def _question_encoder(path: str):
    """The question encoder in `path`: an encoder directory (config.json), or a BiEncoder directory such as
    `pyrag train-retriever`'s out/final (its question_encoder/)."""
    from pathlib import Path

    from .models.encoders import Encoder

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--encoder directory not found: {path!r}")
    if (p / "config.json").is_file():
        return Encoder.from_pretrained(p)
    if (p / "question_encoder" / "config.json").is_file():
        return Encoder.from_pretrained(p / "question_encoder")
    if (p / "final" / "question_encoder" / "config.json").is_file():
        raise ValueError(f"--encoder {path!r} is a `pyrag train-retriever` output directory; pass its trained "
                         f"encoder, {str(p / 'final')!r} (or {str(p / 'final' / 'question_encoder')!r})")
    raise FileNotFoundError(f"--encoder {path!r} is neither an encoder directory (no config.json) nor a "
                            f"BiEncoder directory (no question_encoder/config.json)")


def eval_retriever_cli(argv: list[str]) -> int:
    """`pyrag eval-retriever`: recall@k / MRR of a knowledge base on a QA file."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag eval-retriever", description=(
        "Retrieve passages from a knowledge base for every question of a QA file and report recall@k (an answer "
        "string, SQuAD-normalised, occurs in one of the top-k passages), MRR, and gold-passage recall@k when the "
        "file names gold passages. QA file: SQuAD JSON (gold = the question's paragraph, id 'title#j'; "
        "unanswerable v2.0 questions are skipped) or JSON(L) records {\"question\", \"answers\": [...], optional "
        "\"gold_ids\": [...] | \"gold_id\" | \"passage_id\"}."))
    ap.add_argument("--kb", required=True, help="knowledge base directory (pyrag build-kb)")
    ap.add_argument("--qa", required=True, help="questions: SQuAD JSON or JSONL")
    ap.add_argument("--k", type=int, nargs="+", default=None,
                    help="cut-offs, each at most the KB size (default: 1 5 20, those above the KB size replaced "
                         "by the KB size)")
    ap.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense")
    ap.add_argument("--encoder", default=None,
                    help="question encoder: an encoder directory, or a BiEncoder directory such as `pyrag "
                         "train-retriever`'s out/final (its question_encoder/ is used); default: the one the KB "
                         "was built with")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (N >= 0)")
    ap.add_argument("--out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)

    def fail(msg) -> int:
        print(f"pyrag eval-retriever: error: {msg}", file=sys.stderr)
        return 2

    if args.limit is not None and args.limit < 0:
        return fail(f"--limit must be >= 0 (or left out for all questions), got {args.limit}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")

    from .kb import KnowledgeBase
    from .kb_io import read_qa

    try:
        qa = read_qa(args.qa)
        if args.limit is not None:
            qa = qa[: args.limit]
        if not qa:
            return fail(f"no questions to evaluate in {args.qa}" + (f" (--limit {args.limit})" if args.limit == 0
                                                                     else ""))
        kb = KnowledgeBase.open(args.kb)
        ks = _cutoffs(args.k, len(kb))
        if args.encoder:
            kb.question_encoder = _question_encoder(args.encoder)
        k = max(ks)
        texts, ids = [], []
        for i in range(0, len(qa), 1024):
            chunk = qa[i:i + 1024]
            res = kb.search([x["question"] for x in chunk], k, mode=args.mode, batch_size=args.batch_size,
                            show_progress=len(qa) > 1024)
            texts += res.texts
            ids += res.ids
        golds = [x["gold_ids"] for x in qa] if all(x.get("gold_ids") for x in qa) else None
        rep = retrieval_report(texts, ids, [x["answers"] for x in qa], golds, ks=ks)
        rep["mode"] = args.mode
        print(json.dumps(rep, indent=2))
        if args.out:
            from .kb_io import write_json_atomic

            write_json_atomic(args.out, rep)
    except KeyError as e:  # a record missing a field the KB or the reader needs
        return fail(f"missing key {e}")
    except (ValueError, OSError, TypeError) as e:
        return fail(e)
    return 0
