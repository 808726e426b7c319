"""Benchmark: pyrag's fused HF-compatible RAG losses (pyrag.compat.hf_rag_*_nll) against the installed
transformers' RagTokenForGeneration.get_nll / RagSequenceForGeneration.get_nll: forward + backward (gradients of
seq_logits and doc_scores), same process, same inputs; CPU, and CUDA where pyrag has CUDA kernels.

    python benchmarks/bench_losses.py --device cpu     # B=4 K=5 T=24 V=50265 fp32, 2 threads
    python benchmarks/bench_losses.py --device cuda    # B=8 K=10 T=40 V=50265 fp32 + bf16
"""

from __future__ import annotations

import argparse
import gc
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

try:
    import pyrag
except ImportError:  # a source checkout built in place (not pip-installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pyrag
from pyrag.compat import hf_rag_sequence_nll, hf_rag_token_nll, is_transformers_patched

PAD, BOS, START = 1, 0, 2  # BART's ids; HF's decoder inputs start with </s>, then <s>
EXCLUDE_BOS = False  # RagConfig's default
DEFAULTS = {  # the sizes issue 2 asks for
    "cpu": {"B": 4, "K": 5, "T": 24, "V": 50265, "dtypes": "float32"},
    "cuda": {"B": 8, "K": 10, "T": 40, "V": 50265, "dtypes": "float32,bfloat16"},
}
MIB = 2**20


def hf_get_nll(mode: str, n_docs: int):
    """transformers' own get_nll, unbound, on a stub holding the config fields it reads."""
    from transformers.models.rag.modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

    if is_transformers_patched():
        raise RuntimeError("transformers is patched by pyrag.compat; the baseline must be HF's own code")
    stub = types.SimpleNamespace(config=types.SimpleNamespace(
        n_docs=n_docs, bos_token_id=None, generator=types.SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS)))
    if mode == "sequence":
        fn = RagSequenceForGeneration.get_nll
        return lambda x, s, y, eps: fn(stub, x, s, y, epsilon=eps, exclude_bos_score=EXCLUDE_BOS, n_docs=n_docs)
    stub.marginalize = types.MethodType(RagTokenForGeneration.marginalize, stub)
    fn = RagTokenForGeneration.get_nll
    return lambda x, s, y, eps: fn(stub, x, s, y, epsilon=eps, n_docs=n_docs)


def pyrag_get_nll(mode: str, n_docs: int):
    fn = hf_rag_sequence_nll if mode == "sequence" else hf_rag_token_nll
    return lambda x, s, y, eps: fn(x, s, y, pad_token_id=PAD, bos_token_id=BOS, n_docs=n_docs, epsilon=eps,
                                   exclude_bos_score=EXCLUDE_BOS)


def make_inputs(B, K, T, V, dtype, device, seed=0):
    """seq_logits [B*K, T, V], doc_scores [B, K] (both in dtype, as a model in that dtype produces them) and
    decoder inputs [B, T] with BOS after the start token and rows padded to lengths between T/2 and T."""
    g = torch.Generator().manual_seed(seed)
    seq_logits = (torch.randn(B * K, T, V, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    doc_scores = torch.randn(B, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(3, V, (B, T), generator=g)
    target[:, 0] = START
    target[:, 1:2] = BOS
    for b, n in enumerate(torch.randint(max(2, T // 2), T + 1, (B,), generator=g).tolist()):
        target[b, n:] = PAD
    return seq_logits, doc_scores, target.to(device)


def forward_backward(loss_fn, seq_logits, doc_scores, target, eps):
    """One training step's loss work; returns the gradients (so memory counts them as the step's output)."""
    loss = loss_fn(seq_logits, doc_scores, target, eps)
    loss.sum().backward()
    return loss.detach(), seq_logits.grad, doc_scores.grad


def clear_grads(*tensors):
    for t in tensors:
        t.grad = None


def bench_case(mode, device, dtype, B, K, T, V, eps, args) -> list[dict]:
    seq_logits, doc_scores, target = make_inputs(B, K, T, V, dtype, device, args.seed)
    logits_bytes = seq_logits.numel() * seq_logits.element_size()
    providers = {"hf": hf_get_nll(mode, K), "pyrag": pyrag_get_nll(mode, K)}
    results, outputs = {}, {}
    for name, fn in providers.items():
        def step(fn=fn):
            clear_grads(seq_logits, doc_scores)
            return forward_backward(fn, seq_logits, doc_scores, target, eps)

        step()  # warm-up: one-time allocations and lazy initialisation stay out of the memory number
        clear_grads(seq_logits, doc_scores)
        gc.collect()
        peak = common.peak_extra_memory(lambda fn=fn: forward_backward(fn, seq_logits, doc_scores, target, eps),
                                        device)
        outputs[name] = tuple(t.detach().float().clone() for t in step())
        timing = common.time_fn(step, device=device, warmup=args.warmup, repeat=args.repeat)
        clear_grads(seq_logits, doc_scores)
        results[name] = {**timing, "peak_extra_bytes": peak}
    diffs = [(a - b).abs().max().item() for a, b in zip(outputs["pyrag"], outputs["hf"])]
    rows = []
    for name, r in results.items():
        rows.append({
            "mode": mode, "device": device, "dtype": str(dtype).removeprefix("torch."), "B": B, "K": K, "T": T,
            "V": V, "epsilon": eps, "provider": name,
            "median_ms": r["median_ms"], "min_ms": r["min_ms"], "iqr_ms": r["iqr_ms"], "runs": r["runs"],
            "peak_extra_mib": r["peak_extra_bytes"] / MIB, "logits_mib": logits_bytes / MIB,
            "mem_x_logits": r["peak_extra_bytes"] / logits_bytes,
            "speedup_vs_hf": results["hf"]["median_ms"] / r["median_ms"],
            "mem_vs_hf": r["peak_extra_bytes"] / max(results["hf"]["peak_extra_bytes"], 1),
            # pyrag vs HF on these inputs (0 on HF's own row): loss, d/dseq_logits, d/ddoc_scores
            "max_abs_diff_loss": diffs[0] if name == "pyrag" else 0.0,
            "max_abs_diff_grad_logits": diffs[1] if name == "pyrag" else 0.0,
            "max_abs_diff_grad_doc_scores": diffs[2] if name == "pyrag" else 0.0,
        })
    return rows


def run_device(device: str, args) -> list[dict]:
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS[device].items()}
    dtypes = [getattr(torch, name) for name in sizes["dtypes"].split(",")]
    rows = []
    for dtype in dtypes:
        for mode in args.modes.split(","):
            for eps in (float(e) for e in args.epsilon.split(",")):
                rows += bench_case(mode, device, dtype, sizes["B"], sizes["K"], sizes["T"], sizes["V"], eps, args)
                gc.collect()  # the case's tensors are gone; give their memory back before the next one
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(f"  done: {device} {mode} {dtype} eps={eps}", file=sys.stderr, flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all = cpu, then cuda where pyrag.has_cuda_kernels() (default)")
    p.add_argument("--out", help="JSON path (one device only; default benchmarks/results/losses_<device>.json)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per provider (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch (and pyrag CPU kernel) threads")
    p.add_argument("--B", type=int, help="questions (default: cpu 4, cuda 8)")
    p.add_argument("--K", type=int, help="passages per question (default: cpu 5, cuda 10)")
    p.add_argument("--T", type=int, help="target length (default: cpu 24, cuda 40)")
    p.add_argument("--V", type=int, help="vocabulary (default 50265, BART's)")
    p.add_argument("--dtypes", help="comma list (default: cpu float32, cuda float32,bfloat16)")
    p.add_argument("--modes", default="token,sequence")
    p.add_argument("--epsilon", default="0.0,0.1", help="label smoothing values, comma list")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out and args.device == "all":
        p.error("--out needs --device cpu or --device cuda")
    for mode in args.modes.split(","):
        if mode not in ("token", "sequence"):
            p.error(f"--modes takes token and/or sequence, got {mode!r}")
    return args


COLUMNS = ["mode", "dtype", "epsilon", "provider", "median_ms", "iqr_ms", "logits_mib", "peak_extra_mib", "mem_x_logits",
           "speedup_vs_hf", "mem_vs_hf", "max_abs_diff_loss", "max_abs_diff_grad_logits"]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not pyrag.has_cuda_kernels():
            print("cuda: skipped (pyrag.has_cuda_kernels() is False: no GPU or no CUDA build)")
            continue
        rows = run_device(device, args)
        print(f"\n{device}: forward+backward of get_nll, HF transformers vs pyrag.compat "
              f"(B={rows[0]['B']} K={rows[0]['K']} T={rows[0]['T']} V={rows[0]['V']}, "
              f"threads={torch.get_num_threads()}); mem_x_logits = peak extra memory / logits size")
        # Differences are ~1e-6: print them in scientific notation (the table's default is 3 decimals).
        common.print_table([{k: f"{v:.1e}" if k.startswith("max_abs") else v for k, v in r.items()} for r in rows],
                           COLUMNS)
        path = common.write_results(f"losses_{device}", rows, extra={"args": vars(args)}, out=args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
