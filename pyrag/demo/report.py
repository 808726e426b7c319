"""The demo's output: the results table, the sample answers with their passages and posteriors, and report.json
(exactly the structure the issue specifies)."""

from __future__ import annotations

from pathlib import Path

from ..kb_io import write_json_atomic

MODELS = (("closed_book", "closed-book BART", "none"),
          ("rag_frozen", "RAG-Token", "frozen after DPR"),
          ("rag_token", "RAG-Token", "trained jointly"),
          ("rag_sequence", "RAG-Sequence", "trained jointly"))


def build_report(results: dict, seconds: float) -> dict:
    """report.json's content: {"closed_book": {"em", "f1"}, "rag_frozen": ..., "rag_token": ..., "rag_sequence":
    ..., "retrieval": {"recall@1_before", "recall@5_before", "recall@1_after", "recall@5_after"}, "seconds"}.
    "before" is the retriever the RAG models start from (after the DPR fine-tune), "after" the question encoder
    of the jointly trained RAG-Token model; both on the test questions."""
    rep = {key: {"em": results[key]["em"], "f1": results[key]["f1"]} for key, _, _ in MODELS}
    before, after = results["retriever"]["recall"], results["rag_token"]["recall"]
    rep["retrieval"] = {"recall@1_before": before["1"], "recall@5_before": before["5"],
                        "recall@1_after": after["1"], "recall@5_after": after["5"]}
    rep["seconds"] = round(float(seconds), 1)
    return rep


def write_report(path: Path, report: dict) -> None:
    write_json_atomic(path, report)


def _fmt_time(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def format_table(results: dict, meta: dict, seconds: float) -> str:
    """The results table as text: test EM / F1 per model with its training time, then retrieval recall."""
    c = meta["corpus"]
    lines = [f"pyrag demo: {c['passages']} passages about invented entities, {c['train']} training questions;",
             (f"evaluated on {meta['n_eval']} test questions about other entities (their facts are never trained "
              f"on), K={meta['n_docs']} passages per question"),
             "",
             f"{'model':<17} {'retriever':<17} {'test EM':>8} {'test F1':>8} {'train time':>11}",
             "-" * 65]
    for key, name, retr in MODELS:
        r = results[key]
        lines.append(f"{name:<17} {retr:<17} {r['em']:>8.3f} {r['f1']:>8.3f} {_fmt_time(r['train_seconds']):>11}")
    lines += ["", f"{'retrieval (test questions, gold passage)':<46} {'recall@1':>8} {'recall@5':>8}", "-" * 64]
    rows = [("MiniLM zero-shot", results["kb"]["recall"]),
            ("after DPR fine-tune (= before joint training)", results["retriever"]["recall"]),
            ("after joint training, RAG-Token", results["rag_token"]["recall"]),
            ("after joint training, RAG-Sequence", results["rag_sequence"]["recall"])]
    for name, r in rows:
        lines.append(f"{name:<46} {r['1']:>8.3f} {r['5']:>8.3f}")
    lines += ["", f"total time {_fmt_time(seconds)} on {meta['device']}"]
    return "\n".join(lines)


def format_samples(samples: list[dict]) -> str:
    """Sample answers: question, gold, each model's answer, and RAG-Token's passages with p(z|x) and p(z|x,y)."""
    out = []
    for i, s in enumerate(samples, 1):
        out.append(f"[{i}] {s['question']}   (gold answer: {s['gold']})")
        for name, ans in s["answers"].items():
            mark = "correct" if ans["em"] else "wrong"
            out.append(f"    {name:<14} -> {ans['text']!r} ({mark})")
        out.append("    passages retrieved for RAG-Token, p(z|x) = retriever prior, p(z|x,y) = posterior given "
                   "its answer:")
        for p in s["passages"]:
            gold = "  <- gold" if p["gold"] else ""
            text = p["text"] if len(p["text"]) <= 90 else p["text"][:87] + "..."
            out.append(f"      p(z|x)={p['prior']:.2f} p(z|x,y)={p['posterior']:.2f}  {p['title']} / {text}{gold}")
    return "\n".join(out)
