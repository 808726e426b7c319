"""RAG training step and generation: HF transformers' RagTokenForGeneration / RagSequenceForGeneration against pyrag's
RagToken / RagSequence, same weights, same SQuAD questions, answers and passages, one process.

Each system builds its generator inputs its own way: HF's RagRetriever.postprocess_docs pads every passage+question
row to max_combined_length (300) tokens and cuts long rows at the end (the question goes first); pyrag pads to the
longest row of the batch, runs the encoder in groups of similar length, and cuts the passage instead of the
question. With --equal-length N both systems get the very same N-token context tensors (HF's reference setting).
Retrieval itself is left out of both: every question gets its SQuAD paragraph plus K-1 other paragraphs, with fixed
random passage vectors, and doc scores recomputed as q . d from each system's DPR question encoder.

  python benchmarks/bench_rag_step.py --squad ../shared/data/squad-v1.1-dev/dev-v1.1.json            # CPU, BART-base shape
  python benchmarks/bench_rag_step.py --squad ... --device cuda --shape large --n-docs 10 --target-length 40 \\
      --equal-length 200 --bf16                                                                    # GPU setting
  python benchmarks/bench_rag_step.py --squad ... --shape tiny --repeat 1                          # smoke test
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_extra_memory, print_table, sync, time_fn, write_results

try:
    import pyrag  # noqa: F401
except ImportError:  # a source checkout built in place (not pip-installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # generator (BART) and question encoder (DPR) sizes
    "tiny": {"d_model": 64, "layers": 1, "heads": 2, "ffn": 128, "vocab": 50265, "q_hidden": 64, "q_layers": 1},
    "base": {"d_model": 512, "layers": 6, "heads": 8, "ffn": 2048, "vocab": 50265, "q_hidden": 768, "q_layers": 2},
    "large": {"d_model": 1024, "layers": 12, "heads": 16, "ffn": 4096, "vocab": 50265, "q_hidden": 768,
              "q_layers": 2},
}
BOS, PAD, EOS = 0, 1, 2


def _bart_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE BartTokenizer learnt from the SQuAD text itself (no download); the model keeps V=50265."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab = dict(bpe.get_vocab())
    vocab.setdefault("<mask>", len(vocab))
    return BartTokenizer(vocab=vocab, merges=merges)


def _data(path: str, B: int, K: int, seed: int, target_length: int | None):
    from pyrag.kb_io import read_squad

    passages, questions = read_squad(path)
    row_of = {p["id"]: i for i, p in enumerate(passages)}
    rng = random.Random(seed)
    qs = rng.sample(questions, B)
    rows = []
    for q in qs:
        gold = row_of[q["gold_ids"][0]]
        others = rng.sample([i for i in range(len(passages)) if i != gold], K - 1)
        rows.append([gold] + others)
    titles = [[passages[i]["title"] for i in r] for r in rows]
    texts = [[passages[i]["text"] for i in r] for r in rows]
    answers = [q["answers"][0] for q in qs]
    if target_length:  # long targets (GPU setting): the start of the gold paragraph
        answers = [t[0] for t in texts]
    corpus = [p["text"] for p in passages] + [q["question"] for q in questions]
    return [q["question"] for q in qs], answers, titles, texts, rows, corpus


def build(args):
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        DPRConfig,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    from pyrag.models.encoders import Encoder, default_encoder_path
    from pyrag.models.generator import InputFormat, Seq2SeqGenerator
    from pyrag.models.rag import RagSequence, RagToken

    sh = SHAPES[args.shape]
    B, K = args.batch, args.n_docs
    questions, answers, titles, texts, rows, corpus = _data(args.squad, B, K, args.seed, args.target_length)
    btok = _bart_tokenizer(corpus, sh["vocab"])
    # a real BERT uncased WordPiece vocabulary (MiniLM's, or a copy of its tokenizer files where that is not installed)
    qtok = AutoTokenizer.from_pretrained(args.question_tokenizer or default_encoder_path())
    torch.manual_seed(args.seed)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=sh["vocab"], d_model=sh["d_model"], encoder_layers=sh["layers"], decoder_layers=sh["layers"],
        encoder_attention_heads=sh["heads"], decoder_attention_heads=sh["heads"], encoder_ffn_dim=sh["ffn"],
        decoder_ffn_dim=sh["ffn"], max_position_embeddings=1024, bos_token_id=BOS, pad_token_id=PAD,
        eos_token_id=EOS, decoder_start_token_id=EOS, forced_bos_token_id=BOS, forced_eos_token_id=EOS))
    dpr = DPRQuestionEncoder(DPRConfig(vocab_size=qtok.vocab_size, hidden_size=sh["q_hidden"],
                                       num_hidden_layers=sh["q_layers"], num_attention_heads=max(1, sh["q_hidden"] // 64),
                                       intermediate_size=4 * sh["q_hidden"], projection_dim=0))
    # the same weights for both systems, each its own copy (their optimizers must not share parameters)
    hf_bart, hf_dpr = bart, dpr
    py_bart, py_dpr = copy.deepcopy(bart), copy.deepcopy(dpr)
    dev = torch.device(args.device)
    cfg = RagConfig.from_question_encoder_generator_configs(hf_dpr.config, hf_bart.config, n_docs=K,
                                                            max_combined_length=args.max_combined_length)
    hf_token = RagTokenForGeneration(config=cfg, question_encoder=hf_dpr, generator=hf_bart).to(dev)
    hf_seq = RagSequenceForGeneration(config=cfg, question_encoder=hf_dpr, generator=hf_bart).to(dev)
    fmt = InputFormat(max_combined_length=args.max_combined_length)
    gen = Seq2SeqGenerator(py_bart, btok, fmt)
    qe = Encoder(py_dpr, qtok, pooling="cls", max_length=512)
    py_token = RagToken(qe, gen, None, n_docs=K).to(dev)
    py_seq = RagSequence(qe, gen, None, n_docs=K).to(dev)
    g = torch.Generator().manual_seed(args.seed + 1)
    doc_vecs = torch.randn(B, K, sh["q_hidden"], generator=g).to(dev) / sh["q_hidden"] ** 0.5
    # labels in HF's convention (decoder inputs): decoder start, <s>, answer, </s>
    ans = btok(answers, add_special_tokens=True, truncation=True,
               max_length=(args.target_length + 2) if args.target_length else 64)["input_ids"]
    T = max(len(a) for a in ans) + 1
    labels = torch.full((B, T), PAD, dtype=torch.long)
    for i, a in enumerate(ans):
        labels[i, 0] = EOS
        labels[i, 1:len(a) + 1] = torch.tensor(a)
    stub = SimpleNamespace(config=cfg, generator_tokenizer=btok)
    docs = [{"title": titles[b], "text": texts[b]} for b in range(B)]
    return SimpleNamespace(**locals())


def hf_inputs(s, questions_tok):
    """HF's pipeline: DPR on the tokenized questions, decode them back (as RagRetriever does), postprocess_docs."""
    from transformers.models.rag.retrieval_rag import RagRetriever

    strings = s.qtok.batch_decode(questions_tok["input_ids"], skip_special_tokens=True)
    if s.args.equal_length:
        return s.fixed_ids, s.fixed_mask
    ids, mask = RagRetriever.postprocess_docs(s.stub, s.docs, strings, None, s.K, return_tensors="pt")
    return ids.to(s.dev), mask.to(s.dev)


def py_inputs(s):
    if s.args.equal_length:
        return s.fixed_ids, s.fixed_mask.bool()
    return s.gen.build_inputs(s.questions, s.titles, s.texts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squad", required=True, help="SQuAD v1.1 JSON (e.g. ../shared/data/squad-v1.1-dev/dev-v1.1.json)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=list(SHAPES), default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-docs", type=int, default=5)
    ap.add_argument("--max-combined-length", type=int, default=300)
    ap.add_argument("--equal-length", type=int, default=0, help="give both systems the same N-token contexts")
    ap.add_argument("--target-length", type=int, default=0, help="targets of this many tokens (GPU setting)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step (CUDA)")
    ap.add_argument("--what", default="train,token-greedy,token-beam4,sequence-thorough,sequence-fast")
    ap.add_argument("--systems", default="hf,pyrag",
                    help="which systems to run (pyrag alone: quick A/B runs of pyrag changes; no ratios then)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--question-tokenizer", default=None,
                    help="tokenizer directory for the DPR question encoder (default: the MiniLM package's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    systems = args.systems.split(",")
    if set(systems) - {"hf", "pyrag"}:
        ap.error(f"--systems must name hf and/or pyrag, got {args.systems!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    s = build(args)
    print(f"built models and inputs in {time.time() - t0:.1f}s; shape={args.shape} B={args.batch} K={args.n_docs} "
          f"device={args.device}", file=sys.stderr)
    qt = s.qtok(s.questions, padding=True, return_tensors="pt").to(s.dev)
    if args.equal_length:
        L = args.equal_length
        old = s.stub.config.max_combined_length
        s.stub.config.max_combined_length = L
        from transformers.models.rag.retrieval_rag import RagRetriever

        strings = s.qtok.batch_decode(qt["input_ids"], skip_special_tokens=True)
        s.fixed_ids, s.fixed_mask = (t.to(s.dev) for t in RagRetriever.postprocess_docs(
            s.stub, s.docs, strings, None, s.K, return_tensors="pt"))
        s.stub.config.max_combined_length = old
    hf_ids, hf_mask = hf_inputs(s, qt)
    py_ids, py_mask = py_inputs(s)
    ctx = {"hf_context_tokens": int(hf_ids.numel()), "hf_real_tokens": int(hf_mask.sum()),
           "pyrag_context_tokens": int(py_ids.numel()), "pyrag_real_tokens": int(py_mask.sum()),
           "hf_context_shape": list(hf_ids.shape), "pyrag_context_shape": list(py_ids.shape)}
    print(ctx, file=sys.stderr)
    labels = s.labels.to(s.dev)
    amp = args.bf16 and s.dev.type == "cuda"
    rows = []
    what = args.what.split(",")

    if "train" in what:
        hf_opt = torch.optim.AdamW(list(s.hf_dpr.parameters()) + list(s.hf_bart.parameters()), lr=1e-5)
        py_opt = torch.optim.AdamW(list(s.qe.parameters()) + list(s.gen.parameters()), lr=1e-5)
        s.hf_token.train()
        s.py_token.train()

        def hf_step():
            q = s.hf_token.question_encoder(qt["input_ids"], attention_mask=qt["attention_mask"])[0]
            ids, mask = hf_inputs(s, qt)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                scores = torch.bmm(q.float()[:, None], s.doc_vecs.transpose(1, 2)).squeeze(1)
                out = s.hf_token(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                                 labels=labels, n_docs=s.K, reduce_loss=True)
            out.loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        def py_step():
            toks = s.qe.tokenize(s.questions)
            q = s.qe(toks["input_ids"], toks["attention_mask"])
            ids, mask = py_inputs(s)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                scores = torch.einsum("bd,bkd->bk", q.float(), s.doc_vecs)
                out = s.py_token(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                                 labels=labels, reduction="sum", return_posterior=False, inplace_backward=True)
            out.loss.backward()
            py_opt.step()
            py_opt.zero_grad(set_to_none=True)

        for name, fn in (("hf", hf_step), ("pyrag", py_step)):
            if name not in systems:
                continue
            fn()  # optimizer state allocated outside the measurements
            t = time_fn(fn, s.dev, warmup=args.warmup, repeat=args.repeat)
            mem = peak_extra_memory(fn, s.dev)
            rows.append({"what": "train step (RAG-Token)", "system": name, "ms": t["median_ms"],
                         "min_ms": t["min_ms"], "peak_extra_MiB": mem / 2 ** 20})
        del hf_opt, py_opt

    gen_kw = {"forced_bos_token_id": BOS, "forced_eos_token_id": EOS, "length_penalty": 1.0, "early_stopping": False,
              "no_repeat_ngram_size": 0}
    hf_gen_kw = {**gen_kw, "bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": EOS,
                 "decoder_start_token_id": EOS, "max_length": args.max_new_tokens + 1, "do_sample": False}
    cases = {"token-greedy": ("token", 1, None), "token-beam4": ("token", 4, None),
             "sequence-thorough": ("sequence", 4, "thorough"), "sequence-fast": ("sequence", 4, "fast")}
    for key, (kind, nb, decoding) in cases.items():
        if key not in what:
            continue
        hf_model = s.hf_token if kind == "token" else s.hf_seq
        py_model = s.py_token if kind == "token" else s.py_seq
        hf_model.eval()
        py_model.eval()

        @torch.no_grad()
        def hf_gen(hf_model=hf_model, nb=nb):
            q = hf_model.question_encoder(qt["input_ids"], attention_mask=qt["attention_mask"])[0]
            ids, mask = hf_inputs(s, qt)
            scores = torch.bmm(q[:, None], s.doc_vecs.transpose(1, 2)).squeeze(1)
            return hf_model.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                                     n_docs=s.K, num_beams=nb, **hf_gen_kw)

        @torch.no_grad()
        def py_gen(py_model=py_model, nb=nb, decoding=decoding):
            toks = s.qe.tokenize(s.questions)
            q = s.qe(toks["input_ids"], toks["attention_mask"])
            ids, mask = py_inputs(s)
            scores = torch.einsum("bd,bkd->bk", q, s.doc_vecs)
            return py_model.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                                     num_beams=nb, max_new_tokens=args.max_new_tokens, decoding=decoding, **gen_kw)

        runs = [("pyrag", py_gen)]
        if key != "sequence-fast":  # HF has no fast decoding: its thorough decoding is the reference
            runs.insert(0, ("hf", hf_gen))
        for name, fn in runs:
            if name not in systems:
                continue
            t = time_fn(fn, s.dev, warmup=min(args.warmup, 1), repeat=max(1, args.repeat - 1))
            sync(s.dev)
            rows.append({"what": f"generate {key}", "system": name, "ms": t["median_ms"], "min_ms": t["min_ms"],
                         "q_per_s": args.batch / (t["median_ms"] / 1e3)})

    # ratios against HF (sequence-fast against HF's thorough decoding)
    base = {r["what"]: r for r in rows if r["system"] == "hf"}
    base["generate sequence-fast"] = base.get("generate sequence-thorough")
    for r in rows:
        b = base.get(r["what"])
        if b is not None and r["system"] == "pyrag":
            r["speedup_vs_hf"] = b["ms"] / r["ms"]
            if "peak_extra_MiB" in r:
                r["memory_ratio_hf_over_pyrag"] = b["peak_extra_MiB"] / max(r["peak_extra_MiB"], 1e-9)
    print_table(rows, ["what", "system", "ms", "q_per_s", "peak_extra_MiB", "speedup_vs_hf",
                       "memory_ratio_hf_over_pyrag"])
    extra = {"config": dict(vars(args)), "contexts": ctx,
             "note": ("HF pads every passage+question row to max_combined_length (or gets the same N-token rows with "
                      "--equal-length); pyrag pads to the batch's longest row and groups rows by length in the "
                      "encoder. Retrieval excluded for both. HF's RAG-Sequence generate drops the attention mask "
                      "of its per-passage beam search (transformers 5), which does not change its cost. "
                      "sequence-fast is compared with HF's thorough decoding (HF has no fast decoding).")}
    name = f"rag_step_{s.dev.type}" + ("" if args.shape == "base" or s.dev.type == "cuda" else f"_{args.shape}")
    path = write_results(name, rows, extra, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
