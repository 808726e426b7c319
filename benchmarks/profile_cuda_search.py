"""Where the CUDA top-k time goes (tuning aid, not a peer comparison): N=8M fp16 docs, D=768, k=100.

Times, on one GPU: the fused kernel at Q=1, plain and over the int8 sketch, for several blocks-per-SM settings; at Q=64 and Q=1024, the chunked
GEMM alone (torch.mm with fp32 output, and with fp16 output for reference), the selection alone, and the whole
search, for several chunk sizes and both selection kernels (cuda_select "block" and "warp"). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_fn, write_results

import pyrag
from pyrag import _ext
from pyrag.ops import _common
from pyrag.ops.sketch import make_sketch
from pyrag.ops.topk_ip import topk_ip_options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    docs = torch.empty(args.n, args.d, dtype=torch.float16, device=dev)
    for lo in range(0, args.n, 1 << 20):
        hi = min(args.n, lo + (1 << 20))
        docs[lo:hi] = torch.randn(hi - lo, args.d, generator=g, device=dev).half()
    rows = []

    def rec(what, fn, **kw):
        t = time_fn(fn, device=dev, warmup=1, repeat=args.repeat)
        rows.append({"what": what, "median_ms": t["median_ms"], **kw})
        print(f"{what:40s} {kw} {t['median_ms']:.3f} ms", flush=True)

    q1 = torch.randn(1, args.d, generator=g, device=dev).half()
    # The sketch path rescores every doc of a block until its list is first cut, so longer chunks (fewer blocks)
    # rescore fewer rows: time it at the same settings (its sketch is index memory, built once here).
    sketch = make_sketch(docs)
    for bps in (1, 2, 4, 8, 16):
        os.environ["PYRAG_TOPK_CUDA_BLOCKS_PER_SM"] = str(bps)
        if bps > 1:
            rec("fused Q=1", lambda: pyrag.topk_ip(q1, docs, args.k), blocks_per_sm=bps)
        rec("fused Q=1 + sketch", lambda sk=sketch: pyrag.topk_ip(q1, docs, args.k, sketch=sk), blocks_per_sm=bps)
    os.environ.pop("PYRAG_TOPK_CUDA_BLOCKS_PER_SM")
    del sketch
    cuda = _ext.cuda
    for nq in (64, 1024):
        q = torch.randn(nq, args.d, generator=g, device=dev).half()
        # 8192 columns at Q=1024 is a 32 MiB score chunk, which the H100's 50 MB L2 can hold between the GEMM that
        # writes it and the selection that reads it; larger chunks go through HBM.
        for chunk in (8192, 16384, 65536, 262144):
            if nq * chunk * 4 > (512 << 20) or (chunk < 16384 and nq < 1024):
                continue

            def mm32(chunk=chunk, q=q):
                for lo in range(0, args.n, chunk):
                    torch.mm(q, docs[lo : lo + chunk].T, out_dtype=torch.float32)

            def mm16(chunk=chunk, q=q):
                for lo in range(0, args.n, chunk):
                    torch.mm(q, docs[lo : lo + chunk].T)

            # One score chunk reused by every call: after the first call almost nothing is admitted, so "select only"
            # times the streaming (plus the first call's cuts); "full search" has the real admissions.
            s = torch.mm(q, docs[:chunk].T, out_dtype=torch.float32)
            rec("gemm fp32 out only", mm32, Q=nq, chunk=chunk)
            rec("gemm fp16 out only", mm16, Q=nq, chunk=chunk)
            for variant, name in enumerate(("block", "warp")):
                nbytes = cuda.topk_select_workspace_bytes(nq, args.k, chunk, variant)
                ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)

                def select(chunk=chunk, s=s, ws=ws, nbytes=nbytes, nq=nq, variant=variant):
                    st = _common.stream(s)
                    for lo in range(0, args.n, chunk):
                        n = min(chunk, args.n - lo)
                        cuda.topk_select(_common.ptr(s), chunk, 0, nq, lo, n, args.k, chunk, lo == 0,
                                         lo + n >= args.n, _common.ptr(ws), nbytes, st, variant)

                rec("select only", select, Q=nq, chunk=chunk, select=name)
                with topk_ip_options(cuda_chunk=chunk, cuda_select=name):
                    rec("full search", lambda q=q: pyrag.topk_ip(q, docs, args.k), Q=nq, chunk=chunk, select=name)
                del ws
            del s
    write_results("profile_cuda_search", rows, {"args": vars(args)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
