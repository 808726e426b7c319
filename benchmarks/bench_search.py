"""Benchmark of exact top-k inner-product search: pyrag.topk_ip against FAISS IndexFlatIP and torch.topk(q @ d.T),
same data, same process, same thread count; CPU always, CUDA (torch matmul + topk peer) where a GPU exists.

    python benchmarks/bench_search.py                      # CPU, 2 threads, N=200,000, D=768, k=100, Q in 1,16,256
    python benchmarks/bench_search.py --n 20000 --repeat 3 # quick check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_extra_memory, print_table, time_fn, write_results

import pyrag
from pyrag.ops.sketch import make_sketch
from pyrag.ops.topk_ip import cpu_has_amx, topk_ip_options

# The CPU path rules of csrc/topk_ip_cpu.cpp (kSketchMaxQ, kAmxMinQ, kAmxMinN, kAmxMinDocsPerK), to label rows.
SKETCH_MAX_Q, AMX_MIN_Q, AMX_MIN_N, AMX_MIN_DOCS_PER_K = 12, 48, 4096, 256


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _quantise_int8(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = d.abs().amax(dim=1).clamp_min(1e-12) / 127
    return (d / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of ids shared per row (a sanity check that every method finds the same neighbours)."""
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / a.numel()


def bench_cpu(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    print(f"CPU: N={args.n} D={args.d} k={args.k} threads={args.threads}", flush=True)
    docs = torch.randn(args.n, args.d, generator=g)
    docs16 = docs.half()
    docs8, scale8 = _quantise_int8(docs)
    # The int8 sketches FlatIndex(sketch=True) keeps: exact results (the same bits), a quarter of fp32's bytes read.
    sketch32, sketch16 = make_sketch(docs), make_sketch(docs16)
    peers = {}
    if not args.no_faiss:
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
            index = faiss.IndexFlatIP(args.d)
            index.add(docs.numpy())
            peers["faiss IndexFlatIP"] = lambda q: index.search(q.numpy(), args.k)
        except ImportError:
            print("faiss not installed: skipping the FAISS peer (pip install faiss-cpu)")
    peers["torch.topk(q @ d.T)"] = lambda q: torch.topk(q @ docs.T, args.k)
    ours = {
        "pyrag fp32": lambda q: pyrag.topk_ip(q, docs, args.k),
        "pyrag fp16": lambda q: pyrag.topk_ip(q, docs16, args.k),
        "pyrag int8": lambda q: pyrag.topk_ip(q, docs8, args.k, doc_scale=scale8),
        "pyrag fp32+sketch": lambda q: pyrag.topk_ip(q, docs, args.k, sketch=sketch32),
        "pyrag fp16+sketch": lambda q: pyrag.topk_ip(q, docs16, args.k, sketch=sketch16),
    }
    rows = []
    for nq in args.q:
        q = torch.randn(nq, args.d, generator=g)
        ref_scores, ref_ids = pyrag.topk_ip(q, docs, args.k)
        ref16 = pyrag.topk_ip(q, docs16, args.k)
        block = []
        for name, fn in {**peers, **ours}.items():
            t = time_fn(lambda fn=fn, q=q: fn(q), warmup=1, repeat=args.repeat)
            mem = peak_extra_memory(lambda fn=fn, q=q: fn(q))
            scores, ids = (torch.as_tensor(x) for x in fn(q))
            storage = name.split()[-1] if name.startswith("pyrag") else "fp32"
            # Which pyrag CPU path ran (topk_ip reads a sketch with SIMD up to 12 queries, with AMX beyond where
            # AMX exists, and takes the AMX prefilter over the docs from 48 queries on, given enough docs per k).
            path = ""
            if name.startswith("pyrag"):
                sketched = name.endswith("sketch")
                amx = (nq >= AMX_MIN_Q or (sketched and nq > SKETCH_MAX_Q)) and cpu_has_amx()
                amx = amx and args.n >= AMX_MIN_N and args.n // AMX_MIN_DOCS_PER_K >= args.k
                path = "amx-prefilter" if amx else "fused"
                if sketched:
                    path = "sketch" if nq <= SKETCH_MAX_Q else path + ("-sketch" if path != "fused" else "")
            extra = {}
            if name.endswith("sketch"):  # the sketch must not change a single bit of the result
                want = (ref_scores, ref_ids) if "fp32" in name else ref16
                extra["identical_to_unsketched"] = bool(torch.equal(scores, want[0]) and torch.equal(ids, want[1]))
            block.append(
                dict(
                    section="cpu",
                    method=name,
                    storage=storage,
                    Q=nq,
                    N=args.n,
                    D=args.d,
                    k=args.k,
                    threads=args.threads,
                    pyrag_path=path,
                    **t,
                    peak_extra_mb=mem / 2**20,
                    id_overlap_vs_pyrag_fp32=_overlap(ids, ref_ids),
                    **extra,
                )
            )
        best = min((r for r in block if r["method"] in peers), key=lambda r: r["median_ms"])
        for r in block:
            r["best_peer"] = best["method"]
            r["speedup_vs_best_peer"] = best["median_ms"] / r["median_ms"]
        rows += block
        print_table(
            block,
            [
                "method",
                "Q",
                "median_ms",
                "iqr_ms",
                "peak_extra_mb",
                "speedup_vs_best_peer",
                "id_overlap_vs_pyrag_fp32",
                "identical_to_unsketched",
            ],
        )
        print(flush=True)
    return rows


def _with_warp_select(fn):
    with topk_ip_options(cuda_select="warp"):
        return fn()


def bench_cuda(args) -> list[dict]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(args.seed)
    print(f"CUDA ({torch.cuda.get_device_name()}): N={args.cuda_n} D={args.d} fp16 k={args.k}", flush=True)
    docs = torch.empty(args.cuda_n, args.d, dtype=torch.float16, device=dev)
    for lo in range(0, args.cuda_n, 1 << 20):  # fill in pieces: no fp32 copy of the whole matrix
        hi = min(args.cuda_n, lo + (1 << 20))
        docs[lo:hi] = torch.randn(hi - lo, args.d, generator=g, device=dev).half()
    # The int8 sketch (FlatIndex(sketch=True) on the GPU): up to 8 queries read its codes, half of fp16's bytes. It
    # is part of the index (N * (D + 12) bytes, like the docs), so peak_extra_mb, the search's own memory, leaves it out.
    sketch_max_q = pyrag._ext.cuda.topk_ip_sketch_max_q
    sketch = make_sketch(docs) if any(nq <= sketch_max_q for nq in args.cuda_q) else None
    rows = []
    for nq in args.cuda_q:
        q = torch.randn(nq, args.d, generator=g, device=dev)
        qh = q.half()
        # Both with fp16 queries (the same inputs); "fp32 queries" keeps fp32 query precision on fp16 docs.
        fns = {
            "torch.topk(q @ d.T) fp16": lambda qh=qh: torch.topk(qh @ docs.T, args.k),
            "pyrag fp16": lambda qh=qh: pyrag.topk_ip(qh, docs, args.k),
            "pyrag fp16 docs, fp32 queries": lambda q=q: pyrag.topk_ip(q, docs, args.k),
        }
        if sketch is not None and nq <= sketch_max_q:
            fns["pyrag fp16+sketch"] = lambda qh=qh: pyrag.topk_ip(qh, docs, args.k, sketch=sketch)
        if nq >= 9:  # the chunked-GEMM path: also time the warp-per-list selection kernel
            fns["pyrag fp16, warp select"] = lambda qh=qh: _with_warp_select(lambda: pyrag.topk_ip(qh, docs, args.k))
        block = []
        for name, fn in fns.items():
            try:
                t = time_fn(fn, device=dev, warmup=2, repeat=args.repeat)
                mem = peak_extra_memory(fn, device=dev)
            except torch.OutOfMemoryError:
                print(f"{name}: out of GPU memory at Q={nq}")
                torch.cuda.empty_cache()
                continue
            extra = {}
            if name.endswith("sketch"):  # the sketch must not change a single bit of the result
                want, got = fns["pyrag fp16"](), fn()
                extra["identical_to_unsketched"] = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            block.append(
                dict(
                    section="cuda",
                    method=name,
                    storage="fp16",
                    Q=nq,
                    N=args.cuda_n,
                    D=args.d,
                    k=args.k,
                    **t,
                    peak_extra_mb=mem / 2**20,
                    **extra,
                )
            )
        peers = [r for r in block if r["method"].startswith("torch")]
        for r in block:
            if peers:
                r["best_peer"] = peers[0]["method"]
                r["speedup_vs_best_peer"] = peers[0]["median_ms"] / r["median_ms"]
        rows += block
        print_table(block, ["method", "Q", "median_ms", "iqr_ms", "peak_extra_mb", "speedup_vs_best_peer",
                            "identical_to_unsketched"])
        print(flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="docs on the CPU")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--q", type=_ints, default=[1, 16, 256], help="query counts on the CPU, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-faiss", action="store_true", help="skip the FAISS peer")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--cuda-n", type=int, default=8_000_000)
    ap.add_argument("--cuda-q", type=_ints, default=[1, 64, 1024])
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/search_cpu.json, or "
        "search_cuda.json for a CUDA-only run)",
    )
    args = ap.parse_args(argv)
    rows = []
    if not args.no_cpu:
        rows += bench_cpu(args)
    if not args.no_cuda and torch.cuda.is_available() and pyrag.has_cuda_kernels():
        rows += bench_cuda(args)
    name = "search_cpu" if not args.no_cpu else "search_cuda"
    path = write_results(name, rows, extra={"args": {k: v for k, v in vars(args).items()}}, out=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
