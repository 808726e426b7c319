"""`pyrag demo`'s pipeline: corpus -> knowledge base (MiniLM) -> DPR fine-tune -> closed-book / RAG (frozen) /
RAG-Token / RAG-Sequence (joint) on one budget -> table, samples, report.json. Each finished stage is recorded
atomically in the output directory and skipped on a rerun; an interrupted training resumes from its checkpoint."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._argparse import DefaultsFormatter
from ..kb_io import write_json_atomic

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the demo's result. Sized so the default finishes in under 10 minutes on 2 CPU
    cores and --quick in under 2 (measured on a quiet 2-core machine; a loaded one takes far longer)."""

    seed: int = 0
    # corpus: two passages per entity, one question per fact
    n_people: int = 700
    n_places: int = 300
    n_orgs: int = 200
    variety: int = 4  # phrasings per passage sentence / question (corpus.generate_corpus)
    # retrieval
    n_docs: int = 2
    dpr_steps: int = 60
    dpr_batch: int = 16
    dpr_lr: float = 5e-5
    # generator (a BART from a config) and the shared training budget of the four models
    d_model: int = 192
    layers: int = 2
    ffn: int = 384
    heads: int = 4
    pretrain_steps: int = 300
    lr_pretrain: float = 2e-3
    steps: int = 250
    batch_size: int = 32
    lr_generator: float = 1e-3
    lr_question_encoder: float = 5e-5
    train_layers: int = 1  # top layers of the question encoder that DPR and joint training update
    warmup_steps: int = 20
    # evaluation
    n_eval: int = 400
    num_beams: int = 1
    max_answer_tokens: int = 16


DEFAULT = Settings()
# --quick: a smaller world phrased one way (a small generator learns to read it in ~100 steps), smaller budgets
QUICK = dataclasses.replace(DEFAULT, n_people=150, n_places=60, n_orgs=40, variety=1, dpr_steps=20,
                            pretrain_steps=200, steps=100, batch_size=16, warmup_steps=10, n_eval=150)

STAGES = ("corpus", "kb", "retriever", "generator", "closed_book", "rag_frozen", "rag_token", "rag_sequence",
          "report")
STAGE_TITLES = {
    "corpus": "generate the knowledge corpus and questions",
    "kb": "encode the knowledge base with pretrained MiniLM",
    "retriever": "fine-tune the question encoder (DPR loss, BM25 hard negatives)",
    "generator": "initialise a small BART and pre-train it (denoising, on other invented entities)",
    "closed_book": "train + evaluate closed-book BART (no retrieval)",
    "rag_frozen": "train + evaluate RAG-Token, retriever frozen",
    "rag_token": "train + evaluate RAG-Token, question encoder trained jointly",
    "rag_sequence": "train + evaluate RAG-Sequence, question encoder trained jointly",
    "report": "write the report and answer sample questions",
}


class _Run:
    """State of one demo run in directory `out`: settings, stage records (stages.json), device, progress flag."""

    def __init__(self, out: Path, settings: Settings, device: torch.device, show_progress: bool):
        self.out = out
        self.s = settings
        self.device = device
        self.progress = show_progress
        self.records_path = out / "stages.json"
        self.records = json.loads(self.records_path.read_text()) if self.records_path.exists() else {}
        self.current: str | None = None
        self.cleanup: list[Path] = []  # checkpoints a stage leaves, removed once the stage is recorded
        self._corpus = None
        # Outputs of the question encoder's frozen lower layers, shared by every question encoder of this run
        # (DPR and joint training update only the top layers, so the lower ones stay MiniLM's).
        self.lower_cache: dict = {}

    # -- stage bookkeeping ---------------------------------------------------------------------------------------
    def stage(self, name: str, fn) -> dict:
        i = STAGES.index(name) + 1
        head = f"[{i}/{len(STAGES)}] {STAGE_TITLES[name]}"
        if name in self.records:
            rec = self.records[name]
            print(f"{head}: done earlier ({rec['summary']})", flush=True)
            return rec["result"]
        print(f"{head} ...", flush=True)
        self.current = name
        t0 = time.time()
        result = fn()
        seconds = time.time() - t0
        rec = {"result": result, "seconds": round(seconds, 2), "summary": _summary(name, result, seconds),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.records[name] = rec
        write_json_atomic(self.records_path, self.records)
        self.current = None
        for path in self.cleanup:  # only now: an interrupted stage must find its checkpoints on the rerun
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.cleanup = []
        print(f"{head}: {rec['summary']}", flush=True)
        return result

    # -- shared data -------------------------------------------------------------------------------------------
    @property
    def corpus(self):
        if self._corpus is None:
            from .corpus import generate_corpus

            s = self.s
            self._corpus = generate_corpus(s.seed, s.n_people, s.n_places, s.n_orgs, variety=s.variety)
        return self._corpus

    @property
    def eval_questions(self) -> list[dict]:
        return self.corpus.test[: self.s.n_eval]

    def kb(self):
        from ..kb import KnowledgeBase

        kb = KnowledgeBase.open(self.out / "kb", verify=False)
        return kb.to(self.device)


def _summary(name: str, r: dict, seconds: float) -> str:
    t = f"{seconds:.0f} s"
    if name == "corpus":
        return f"{r['passages']} passages, {r['train']}/{r['dev']}/{r['test']} train/dev/test questions ({t})"
    if name == "kb":
        return f"{r['passages']} passages; zero-shot recall@1 {r['recall']['1']:.3f}, recall@5 {r['recall']['5']:.3f} ({t})"
    if name == "retriever":
        return f"recall@1 {r['recall']['1']:.3f}, recall@5 {r['recall']['5']:.3f} after {r['steps']} steps ({t})"
    if name == "generator":
        return (f"BART with {r['parameters'] / 1e6:.1f}M parameters, vocabulary {r['vocab']}; denoising loss "
                f"{r['pretrain_loss']:.2f} after {r['pretrain_steps']} steps ({t})")
    if name in ("closed_book", "rag_frozen", "rag_token", "rag_sequence"):
        extra = f", recall@1 {r['recall']['1']:.3f}" if "recall" in r else ""
        return f"test EM {r['em']:.3f}, F1 {r['f1']:.3f}{extra} ({t})"
    return f"done ({t})"


# ---------------------------------------------------------------------------------------------------------------
# stages

def _stage_corpus(run: _Run) -> dict:
    c = run.corpus
    d = run.out / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (("passages", c.passages), ("train", c.train), ("dev", c.dev), ("test", c.test)):
        tmp = d / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(d / f"{name}.jsonl")
    return {"passages": len(c.passages), "train": len(c.train), "dev": len(c.dev), "test": len(c.test)}


def _recall(kb, encoder, questions: list[dict]) -> dict:
    """Gold-passage recall@1 / @5 of `encoder` on `questions` against the KB's stored vectors."""
    from ..metrics import gold_hits, recall_at_k

    q = encoder.encode([x["question"] for x in questions], show_progress=False)
    res = kb.search(q.to(kb.index.device), 5)
    r = recall_at_k(gold_hits(res.ids, [x["passage_id"] for x in questions]), (1, 5))
    return {"1": r[1], "5": r[5]}


def _stage_kb(run: _Run) -> dict:
    from ..kb import build_kb
    from ..models.encoders import BiEncoder, Encoder

    # Passages are stored L2-normalised (all-MiniLM-L6-v2 is trained for cosine similarity); questions are not
    # normalised, which ranks exactly as cosine but lets the question's length act as the retriever's inverse
    # temperature, so p(z|x) = softmax(q . d) can sharpen during DPR and joint training.
    p_enc = Encoder.from_pretrained().to(run.device)
    q_enc = Encoder.from_pretrained(normalize=False).to(run.device)
    kb = build_kb(run.corpus.passages, run.out / "kb", encoder=BiEncoder(q_enc, p_enc),
                  show_progress=run.progress)
    kb.to(run.device)
    return {"passages": len(kb), "recall": _recall(kb, q_enc, run.eval_questions)}


def _stage_retriever(run: _Run) -> dict:
    from ..models.encoders import BiEncoder
    from ..train.retriever import mine_hard_negatives, train_retriever
    from .fast_encoder import CachedLowerEncoder

    s = run.s
    kb = run.kb()
    # Only the question encoder's top layers train (the rest is frozen and cached: see fast_encoder.py); the
    # passage side stays exactly what the KB stores, a frozen passage encoder whose vectors are cached.
    q_enc = CachedLowerEncoder.convert(copy.deepcopy(kb.encoder).to(run.device), s.train_layers, run.lower_cache)
    p_enc = CachedLowerEncoder.convert(copy.deepcopy(kb.passage_encoder).to(run.device), 0)
    rows = torch.arange(len(kb))
    titles, texts = kb.passages(rows)
    p_enc.prefill(p_enc.passage_strings(titles, texts), kb.vectors(rows))
    examples = [{"question": q["question"], "answers": q["answers"],
                 "positive": run.corpus.passage(q["passage_id"])} for q in run.corpus.train]
    examples = mine_hard_negatives(examples, kb, 1, seed=s.seed, show_progress=run.progress)
    res = train_retriever(BiEncoder(q_enc, p_enc), examples, out_dir=run.out / "retriever", steps=s.dpr_steps,
                          batch_size=s.dpr_batch, hard_negatives=1, lr=s.dpr_lr, checkpoint_every=20,
                          seed=s.seed, save_final=False, show_progress=run.progress)
    q_enc.eval()
    q_enc.save_pretrained(run.out / "retriever" / "question_encoder")
    run.cleanup.append(run.out / "retriever" / "checkpoint.pt")  # the encoder is saved; 180 MB less
    return {"steps": res["step"], "loss": res["loss"], "recall": _recall(kb, q_enc, run.eval_questions)}


def _stage_generator(run: _Run) -> dict:
    """A BART from a config, pre-trained briefly with BART's own objective (text infilling) on passages of a
    second synthetic corpus: other invented entities, so it learns to read and copy but knows no fact of the
    demo's corpus. All four generators start from this model."""
    from ..models.encoders import default_encoder_path
    from ..models.generator import load_generator
    from .corpus import generate_corpus
    from .generator import build_tokenizer, denoising_pairs, init_generator, train_seq2seq

    s, c = run.s, run.corpus
    demo_entities = {p["title"] for p in c.passages}
    # the default world's size, whatever the demo's: more distinct text to learn reading from, not to memorise
    other = generate_corpus(s.seed + 7919)
    pre = [p for p in other.passages if p["title"] not in demo_entities]
    texts = [f"{p['title']} / {p['text']}" for p in c.passages + pre]
    texts += [q["question"] for q in c.train + c.dev + c.test]
    tok = build_tokenizer(texts, default_encoder_path())
    model = init_generator(tok, d_model=s.d_model, layers=s.layers, ffn=s.ffn, heads=s.heads, max_positions=128,
                           seed=s.seed)
    gen = load_generator(model, tok).to(run.device)
    res = train_seq2seq(gen, denoising_pairs(pre, s.seed), out_dir=run.out / "generator_pretraining",
                        steps=s.pretrain_steps, batch_size=s.batch_size, lr=s.lr_pretrain,
                        warmup_steps=s.warmup_steps, seed=s.seed, decay=False, desc="pre-train generator",
                        show_progress=run.progress)
    tmp = Path(tempfile.mkdtemp(prefix=".generator.", dir=run.out))
    gen.save_pretrained(tmp)
    shutil.rmtree(run.out / "generator", ignore_errors=True)
    tmp.replace(run.out / "generator")
    run.cleanup.append(run.out / "generator_pretraining")
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "pretrain_steps": res["step"], "pretrain_loss": res["loss"]}


def _score(preds: list[str], questions: list[dict]) -> dict:
    from ..metrics import exact_match, f1_score

    n = len(questions)
    return {"em": sum(exact_match(p, q["answers"]) for p, q in zip(preds, questions)) / n,
            "f1": sum(f1_score(p, q["answers"]) for p, q in zip(preds, questions)) / n}


def _stage_closed_book(run: _Run) -> dict:
    from ..models.generator import load_generator
    from .generator import closed_book_answers, train_seq2seq

    s = run.s
    gen = load_generator(str(run.out / "generator")).to(run.device)
    t0 = time.time()
    train_seq2seq(gen, [(q["question"], q["answers"][0]) for q in run.corpus.train],
                  out_dir=run.out / "closed_book", steps=s.steps, batch_size=s.batch_size, lr=s.lr_generator,
                  warmup_steps=s.warmup_steps, seed=s.seed, desc="train closed-book", show_progress=run.progress)
    train_seconds = time.time() - t0
    gen.save_pretrained(run.out / "closed_book" / "model")
    run.cleanup.append(run.out / "closed_book" / "checkpoint.pt")
    qs = run.eval_questions
    preds = closed_book_answers(gen, [q["question"] for q in qs], max_new_tokens=s.max_answer_tokens,
                                show_progress=run.progress)
    return {**_score(preds, qs), "train_seconds": train_seconds, "predictions": preds[:_N_SAMPLES_KEPT]}


_N_SAMPLES_KEPT = 50  # predictions kept per model for the sample display


def _stage_rag(run: _Run, name: str) -> dict:
    from ..models.encoders import Encoder
    from ..models.rag import RagSequence, RagToken
    from ..train.rag import evaluate_rag, train_rag
    from .fast_encoder import CachedLowerEncoder

    s = run.s
    kb = run.kb()
    cls = RagSequence if name == "rag_sequence" else RagToken
    joint = name != "rag_frozen"
    # Joint: only the top layers train (see fast_encoder.py); frozen: nothing does.
    q_enc = CachedLowerEncoder.convert(Encoder.from_pretrained(run.out / "retriever" / "question_encoder"),
                                       s.train_layers, run.lower_cache)
    if not joint:
        q_enc.requires_grad_(False)
    model = cls.from_parts(q_enc, str(run.out / "generator"), kb, n_docs=s.n_docs).to(run.device)
    train = [{"question": q["question"], "answers": q["answers"]} for q in run.corpus.train]
    t0 = time.time()
    train_rag(model, train, steps=s.steps, batch_size=s.batch_size, lr_generator=s.lr_generator,
              lr_question_encoder=s.lr_question_encoder if joint else 0.0, warmup_steps=s.warmup_steps,
              out_dir=run.out / name, seed=s.seed, save_every=_SAVE_EVERY, show_progress=run.progress)
    train_seconds = time.time() - t0
    run.cleanup.append(run.out / name / "checkpoint")  # the model is saved under model/
    qs = run.eval_questions
    res = evaluate_rag(model, [{**q, "gold_ids": [q["passage_id"]]} for q in qs], batch_size=32,
                       num_beams=s.num_beams, max_new_tokens=s.max_answer_tokens, show_progress=run.progress,
                       return_predictions=True)
    return {"em": res["em"], "f1": res["f1"], "train_seconds": train_seconds,
            "predictions": res["predictions"][:_N_SAMPLES_KEPT], "recall": _recall(kb, model.question_encoder, qs)}


_SAVE_EVERY = 100  # training steps between checkpoints, so an interrupted training resumes close to where it was


def _samples(run: _Run, results: dict) -> list[dict]:
    """Three test questions (a person, a place, an organisation) with every model's answer and RAG-Token's
    passages, retriever prior p(z|x) and posterior p(z|x,y) given its own answer."""
    from ..metrics import exact_match
    from ..models.rag import RagModel

    qs = run.eval_questions[:_N_SAMPLES_KEPT]
    picked, kinds = [], set()
    for i, q in enumerate(qs):
        kind = q["attribute"].split(".")[0]
        if kind not in kinds:
            kinds.add(kind)
            picked.append(i)
        if len(picked) == 3:
            break
    model = RagModel.from_pretrained(run.out / "rag_token" / "model", kb=run.kb(), device=run.device)
    questions = [qs[i]["question"] for i in picked]
    answers = [results["rag_token"]["predictions"][i] for i in picked]
    post = model.passage_posterior(questions, [a if a.strip() else "?" for a in answers])
    prior = torch.softmax(post.doc_scores.float(), dim=1)  # doc_scores = q . d of the retrieved passages
    posterior = post.doc_posterior.clone()
    for j, a in enumerate(answers):
        if not a.strip():  # an empty answer says nothing about the passages: posterior = prior (as `pyrag ask`)
            posterior[j] = prior[j]
    out = []
    names = {"closed_book": "closed-book", "rag_frozen": "RAG frozen", "rag_token": "RAG-Token",
             "rag_sequence": "RAG-Sequence"}
    for j, i in enumerate(picked):
        q = qs[i]
        ans = {names[k]: {"text": results[k]["predictions"][i],
                          "em": bool(exact_match(results[k]["predictions"][i], q["answers"]))} for k in names}
        passages = [{"title": post.titles[j][k], "text": post.texts[j][k], "id": post.ids[j][k],
                     "gold": post.ids[j][k] == q["passage_id"], "prior": float(prior[j, k]),
                     "posterior": float(posterior[j, k])} for k in range(len(post.ids[j]))]
        out.append({"question": q["question"], "gold": q["answers"][0], "answers": ans, "passages": passages})
    return out


def _stage_report(run: _Run, results: dict) -> dict:
    from .report import build_report, format_samples, format_table, write_report

    seconds = sum(r["seconds"] for k, r in run.records.items() if k != "report")
    report = build_report(results, seconds)
    write_report(run.out / "report.json", report)
    meta = {"corpus": results["corpus"], "n_eval": len(run.eval_questions), "n_docs": run.s.n_docs,
            "device": _device_name(run.device)}
    table = format_table(results, meta, seconds)
    samples = _samples(run, results)
    text = table + "\n\nSample test questions:\n" + format_samples(samples)
    (run.out / "report.txt").write_text(text + "\n")
    return {"report": report, "text": text}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n > 1 else ''}"


# ---------------------------------------------------------------------------------------------------------------
# command line

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag demo", description=(
        "Train retrieval-augmented QA end to end on an embedded synthetic corpus of invented entities and compare "
        "it with a closed-book model of the same size and budget: closed-book BART, RAG-Token with a frozen "
        "retriever, and RAG-Token / RAG-Sequence with the question encoder trained jointly. Needs no downloads; "
        "uses a GPU when present. With --out, rerunning resumes where a previous run stopped."))
    ap.add_argument("--out", default=None, help="directory for the KB, models, report.json (default: a temporary "
                                                "directory, deleted at the end)")
    ap.add_argument("--quick", action="store_true", help="a smaller corpus and budget (smoke test, < 2 min on CPU)")
    ap.add_argument("--seed", type=int, default=None, help="corpus and training seed (default 0)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each of the four generators")
    ap.add_argument("--n-docs", type=int, default=None, help="passages retrieved per question (K)")
    ap.add_argument("--eval-questions", type=int, default=None, help="test questions to evaluate on")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--stop-after", choices=STAGES, default=None,
                    help="stop after this stage (as an interruption would); rerun with the same --out to go on")
    return ap


def _settings_from_args(ap: argparse.ArgumentParser, args) -> Settings:
    s = QUICK if args.quick else DEFAULT
    over = {}
    for flag, field, lo, hi in (("--seed", "seed", 0, 2**31 - 1), ("--steps", "steps", 1, 1_000_000),
                                ("--n-docs", "n_docs", 1, 16), ("--eval-questions", "n_eval", 1, 1_000_000)):
        v = getattr(args, field if field != "n_eval" else "eval_questions", None)
        if v is None:
            continue
        if not lo <= v <= hi:
            ap.error(f"{flag} must be in [{lo}, {hi}], got {v}")
        over[field] = v
    if "steps" in over and over["steps"] <= s.warmup_steps:
        over["warmup_steps"] = max(0, over["steps"] // 10)
    return dataclasses.replace(s, **over)


def _device(ap: argparse.ArgumentParser, name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        ap.error(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {name}: torch sees no CUDA device here")
    return dev


def _prepare_out(ap: argparse.ArgumentParser, out: Path, settings: Settings) -> None:
    """Create `out` or check that it holds a run of the same settings (resume); error otherwise."""
    if out.exists() and not out.is_dir():
        ap.error(f"--out {str(out)!r} exists and is not a directory")
    cfg_path = out / "demo.json"
    cfg = {"format": "pyrag-demo", "version": FORMAT_VERSION, "settings": dataclasses.asdict(settings)}
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            ap.error(f"--out {str(out)!r}: {cfg_path.name} is corrupted; delete the directory to start over")
        if old != cfg:
            diff = {k: (old.get("settings", {}).get(k), v) for k, v in cfg["settings"].items()
                    if old.get("settings", {}).get(k) != v}
            ap.error(f"--out {str(out)!r} holds a demo run with other settings {diff or old}; rerun with the "
                     f"same options to resume it, or choose another --out")
    elif out.exists() and any(out.iterdir()):
        ap.error(f"--out {str(out)!r} is a non-empty directory that is not a pyrag demo run; choose another")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, cfg)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code: 0 done (or stopped by --stop-after), 2 bad arguments, 130 interrupted."""
    ap = _parser()
    try:
        args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
        settings = _settings_from_args(ap, args)
        device = _device(ap, args.device)
        if args.threads is not None and args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        temporary = args.out is None
        out = Path(tempfile.mkdtemp(prefix="pyrag-demo-")) if temporary else Path(args.out)
        _prepare_out(ap, out, settings)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    run = _Run(out, settings, device, show_progress=not args.no_progress)
    try:
        finished = _pipeline(run, args.stop_after)
    except KeyboardInterrupt:
        where = f" during '{STAGE_TITLES[run.current]}'" if run.current else ""
        print(f"\npyrag demo: interrupted{where}. Finished stages are kept in {out}; run "
              f"`pyrag demo --out {out}{' --quick' if args.quick else ''}` to resume.", file=sys.stderr)
        return 130
    if not finished:
        print(f"pyrag demo: stopped after '{args.stop_after}'; rerun with --out {out} to continue.")
        return 0
    if temporary:
        shutil.rmtree(out, ignore_errors=True)
        print("(ran in a temporary directory, now deleted; use --out DIR to keep the KB, models and report.json)")
    else:
        print(f"\nKB, models and report.json are in {out}. Ask a trained model yourself:\n"
              f"  pyrag ask --model {out / 'rag_token' / 'model'} \"{run.eval_questions[0]['question']}\"")
    return 0


def _pipeline(run: _Run, stop_after: str | None) -> bool:
    """Run (or skip, when recorded) every stage; False when stopped early by stop_after."""
    results = {}
    fns = {"corpus": _stage_corpus, "kb": _stage_kb, "retriever": _stage_retriever,
           "generator": _stage_generator, "closed_book": _stage_closed_book,
           "rag_frozen": lambda r: _stage_rag(r, "rag_frozen"), "rag_token": lambda r: _stage_rag(r, "rag_token"),
           "rag_sequence": lambda r: _stage_rag(r, "rag_sequence"),
           "report": lambda r: _stage_report(r, results)}
    for name in STAGES:
        results[name] = run.stage(name, functools.partial(fns[name], run))
        if name == "report":
            print("\n" + results[name]["text"])
        if name == stop_after and name != STAGES[-1]:
            return False
    return True


def _quiet_transformers() -> None:
    """The demo prints its own progress; transformers' per-load bars and notices would bury it."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
