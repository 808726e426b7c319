"""pyrag.topk_ip: exact top-k inner-product search as the torch custom op "pyrag::topk_ip", over the fused CPU
kernel (csrc/topk_ip_cpu.cpp) and CUDA kernel (csrc/topk_ip_cuda.cu); the plain-torch twin is
pyrag.reference.topk_ip_reference."""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from .. import _ext
from . import _common

QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)

# Knobs for tests and benchmarks (defaults are what users get). threads: None = torch.get_num_threads();
# tile_n: docs per tile (0 = auto); split: 0 auto, 1 threads split the docs, 2 threads split the queries;
# parts: doc partitions with split=1 (0 = one per thread); isa: -1 best, 0 scalar, 1 AVX2, 2 AVX-512;
# path: "auto", "fused" (the C++ kernel computes every dot product) or "prefilter" (an AMX bf16 torch.mm scores
# tiles approximately, the C++ kernel computes exact scores only where the error bound leaves a doc in reach);
# prefilter_tile_n: docs per prefilter tile (0 = auto).
_DEFAULT_OPTIONS = {
    "threads": None, "tile_n": 0, "split": 0, "parts": 0, "isa": -1, "path": "auto", "prefilter_tile_n": 0,
}
_options = dict(_DEFAULT_OPTIONS)
_options_lock = threading.Lock()


@contextlib.contextmanager
def topk_ip_options(**overrides):
    """Temporarily override the kernel's tiling / threading / SIMD / path choices (for tests and benchmarks).

    Process-wide, not per thread: do not use it while other threads search.
    Example: `with topk_ip_options(tile_n=7, split=1, parts=5): topk_ip(q, d, 10)`.
    """
    unknown = set(overrides) - set(_DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown topk_ip option(s) {sorted(unknown)}; known: {sorted(_DEFAULT_OPTIONS)}")
    if overrides.get("path", "auto") not in ("auto", "fused", "prefilter"):
        raise ValueError(f"path must be 'auto', 'fused' or 'prefilter', got {overrides['path']!r}")
    with _options_lock:
        saved = dict(_options)
        _options.update(overrides)
    try:
        yield
    finally:
        with _options_lock:
            _options.clear()
            _options.update(saved)


def best_cpu_isa() -> int:
    """The CPU kernel this machine runs: 0 scalar, 1 AVX2 (+FMA, F16C), 2 AVX-512 (F, BW, VL)."""
    return _ext.cpu.topk_ip_best_isa()


def topk_ip(
    queries: torch.Tensor, docs: torch.Tensor, k: int, *, doc_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search: the k docs with the largest q . d for each query.

    Args:
        queries: [Q, D] float32 / float16 / bfloat16 (converted to fp32, which is exact).
        docs: [N, D] float32 / float16 / bfloat16, or int8 with `doc_scale`.
        k: 1 <= k <= N (k > N raises rather than padding, so every returned id is a real doc).
        doc_scale: [N] float (used as fp32), required for int8 docs and refused for float docs; the score of doc i
            is (q . docs[i]) * doc_scale[i], i.e. the inner product with the dequantised row.

    Returns:
        (scores [Q, k] float32 sorted descending, ids [Q, k] int64 row numbers into docs); equal scores are
        ordered by lower id. Q = 0 gives empty [0, k] tensors.

    Replaces `torch.topk(queries.float() @ docs.float().T, k)` (plus a deterministic tie order) without ever
    building the [Q, N] score matrix: scores are accumulated in fp32 and selected tile by tile.

    Notes:
        - Non-contiguous inputs are copied to contiguous ones first (a copy of docs costs memory and time; pass
          contiguous docs).
        - Not differentiable: retrieval selects ids; recompute `q @ docs[ids].T` in torch where gradients are
          needed (pyrag's RAG models do). Inputs are detached.
        - Queries with NaN or inf raise ValueError (inf would give NaN/inf scores whose order differs between
          devices). Docs are not scanned (that costs a pass over them): a NaN score ranks as -inf.
        - Runs on the inputs' device: the fused CPU kernel, the CUDA kernel where pyrag was built with CUDA
          (k <= 4096, D <= 8192), otherwise a chunked plain-torch search (memory O(Q * (k + 65536))).
    """
    _check_inputs(queries, docs, k, doc_scale)
    queries = queries.detach().contiguous()
    docs = docs.detach().contiguous()
    if doc_scale is not None:
        doc_scale = doc_scale.detach().to(torch.float32).contiguous()
    return torch.ops.pyrag.topk_ip(queries, docs, k, doc_scale)


def _check_inputs(queries, docs, k, doc_scale) -> None:
    """Shapes, dtypes, devices and k: every error names the argument and shows its value."""
    for name, t in (("queries", queries), ("docs", docs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [{'Q' if name == 'queries' else 'N'}, D], got {name}.shape={tuple(t.shape)}")
    if queries.dtype not in QUERY_DTYPES:
        raise TypeError(f"queries must be float32, float16 or bfloat16, got {queries.dtype=}")
    if docs.dtype not in DOC_DTYPES:
        raise TypeError(f"docs must be float32, float16, bfloat16 or int8 (with doc_scale), got {docs.dtype=}")
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"queries and docs must have the same D: {queries.shape=}, {docs.shape=}")
    if docs.shape[1] == 0:
        raise ValueError(f"D must be >= 1, got {docs.shape=}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k=!r} ({type(k).__name__})")
    n = docs.shape[0]
    if n == 0:
        raise ValueError(f"docs is empty ({docs.shape=}): there is nothing to search (k={k} > N=0)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k=}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of docs N={n}; pass k <= N")
    if docs.dtype == torch.int8:
        if doc_scale is None:
            raise ValueError("int8 docs need doc_scale [N] (score = (q . docs[i]) * doc_scale[i]); got doc_scale=None")
        if not isinstance(doc_scale, torch.Tensor):
            raise TypeError(f"doc_scale must be a torch.Tensor, got {type(doc_scale).__name__}")
        if doc_scale.shape != (n,):
            raise ValueError(f"doc_scale must be [N] = [{n}], got {doc_scale.shape=}")
        if not doc_scale.dtype.is_floating_point:
            raise TypeError(f"doc_scale must be a float tensor, got {doc_scale.dtype=}")
    elif doc_scale is not None:
        raise ValueError(f"doc_scale is only for int8 docs; docs are {docs.dtype} (pass doc_scale=None)")
    devices = {queries.device, docs.device} | ({doc_scale.device} if doc_scale is not None else set())
    if len(devices) > 1:
        where = f"{queries.device=}, {docs.device=}" + (f", {doc_scale.device=}" if doc_scale is not None else "")
        raise ValueError(f"queries, docs and doc_scale must be on one device, got {where}")


@torch.library.custom_op("pyrag::topk_ip", mutates_args=())
def _topk_ip_op(
    queries: torch.Tensor, docs: torch.Tensor, k: int, doc_scale: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    # Devices without a pyrag kernel (CUDA in a CPU-only build, MPS, ...): plain torch, chunked over the docs.
    _check_finite(queries)
    return _topk_ip_torch_chunked(queries, docs, k, doc_scale)


@_topk_ip_op.register_fake
def _(queries, docs, k, doc_scale):
    torch._check(queries.dim() == 2 and docs.dim() == 2, lambda: "queries and docs must be 2-D")
    torch._check(queries.shape[1] == docs.shape[1], lambda: "queries and docs must have the same D")
    torch._check(1 <= k, lambda: f"k must be >= 1, got {k}")
    torch._check(k <= docs.shape[0], lambda: f"k={k} exceeds N={docs.shape[0]}")
    q = queries.shape[0]
    return queries.new_empty((q, k), dtype=torch.float32), queries.new_empty((q, k), dtype=torch.int64)


def _check_finite(queries: torch.Tensor) -> None:
    # Inside the op, not the wrapper: a data-dependent check there would break torch.compile(fullgraph=True).
    # inf is refused with NaN: it would make scores NaN/inf whose order differs between the CPU and GPU kernels.
    if queries.numel() and not bool(torch.isfinite(queries).all()):
        row = int((~torch.isfinite(queries)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"queries contain NaN or inf (first in row {row} of queries.shape={tuple(queries.shape)})")


def _topk_ip_torch_chunked(queries, docs, k, doc_scale):
    """Plain-torch search over doc chunks: memory O(Q * (k + chunk)) instead of the reference's [Q, N]. Serves
    devices without a pyrag kernel and sizes the CUDA kernel does not take (k > 4096, D > 8192, N >= 2^31)."""
    nq, nb = queries.shape[0], docs.shape[0]
    q = queries.to(torch.float32)
    chunk = max(1024, min(65536, (1 << 26) // max(nq, 1)))
    best_s = q.new_empty((nq, 0))
    best_i = torch.empty((nq, 0), dtype=torch.int64, device=q.device)
    for lo in range(0, nb, chunk):
        s = q @ docs[lo : lo + chunk].to(torch.float32).T
        if doc_scale is not None:
            s = s * doc_scale[lo : lo + chunk].to(torch.float32)
        s = s.masked_fill(s.isnan(), float("-inf"))
        i = torch.arange(lo, lo + s.shape[1], device=q.device).expand_as(s)
        # Kept candidates come first and have lower ids, so a stable sort keeps ties in id order.
        s, order = torch.sort(torch.cat([best_s, s], 1), dim=1, descending=True, stable=True)
        best_s, best_i = s[:, :k], torch.cat([best_i, i], 1).gather(1, order[:, :k])
    return best_s.contiguous(), best_i.contiguous()


@_topk_ip_op.register_kernel("cpu")
def _topk_ip_cpu(queries, docs, k, doc_scale):
    _check_finite(queries)
    nq, dim = queries.shape
    nb = docs.shape[0]
    scores = torch.empty((nq, k), dtype=torch.float32)
    ids = torch.empty((nq, k), dtype=torch.int64)
    if nq == 0:
        return scores, ids
    q = queries.to(torch.float32).contiguous()
    opts = dict(_options)
    threads = opts["threads"] or _common.num_threads()
    if _use_prefilter(nq, docs.dtype, opts["path"]):
        _search_prefilter(q, docs, k, doc_scale, scores, ids, threads, opts["prefilter_tile_n"], opts["isa"])
    else:
        _ext.cpu.topk_ip(
            _common.DTYPE_CODES[docs.dtype], _common.ptr(q), _common.ptr(docs), _common.ptr(doc_scale), nq, nb, dim,
            k, _common.ptr(scores), _common.ptr(ids), threads, opts["tile_n"], opts["split"], opts["parts"],
            opts["isa"],
        )
    return scores, ids


# ---- the bf16 prefilter path (CPU, large Q) ----
# Exact search is a GEMM plus a selection. In fp32 the GEMM runs at the FMA peak (~32 FMA/cycle/core), which is
# what FAISS and torch reach at large Q, so a faster exact fp32 kernel cannot exist. CPUs with AMX (Sapphire
# Rapids and later) multiply bf16 tiles about 7x faster (measured ~900 GFLOP/s on one core vs ~125 in fp32). The
# prefilter path scores each doc tile with torch.mm in bf16 (oneDNN uses AMX) and bounds the gap to the exact fp32
# score rigorously; only docs whose approximate score + bound reaches the query's current k-th exact score get
# their exact fp32 score, from the same C++ dot kernel as the fused path. The result is bit-identical to the fused
# path; on typical data only a few hundred docs per query are rescored. Where many docs tie within the bound
# (near-duplicate corpora) it degrades towards the fused cost plus the bf16 work, never to a wrong answer.
# Measured crossover on a 2-core Sapphire Rapids (fp32 docs, N=200k, D=768): the fused kernel is memory bound up to
# Q ~ 16 (both paths must read every doc once), the prefilter wins from Q ~ 32 on.
_PREFILTER_MIN_Q = 32
_PREFILTER_TILE = 2048  # docs per tile: the bf16 copy (3 MiB at D=768) stays in L2/L3 between conversion and mm


def _amx_available() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # private torch API: absent or failing means "don't rely on it"
        return False


def _use_prefilter(nq: int, docs_dtype: torch.dtype, path: str) -> bool:
    if path != "auto":
        return path == "prefilter"
    return nq >= _PREFILTER_MIN_Q and _amx_available()


def _prefilter_bounds(q32, docs, doc_scale):
    """Per-query (qc, e0, dlim) with |approx - exact| <= qc * |d| + e0 for every doc d with |d| <= dlim, where
    approx is the bf16 GEMM score
    (rounded to bf16) and exact the fp32 kernel's score. With u = 2^-24, r = 2^-8 (bf16 rounding), g = D u / (1 - D u):
      |q'.d' - q.d| <= r |q| |d| (2 + r)  (r |q| |d| when docs are bf16/int8, which bf16 holds exactly)
      GEMM accumulation 2 g (1+r)^2 |q||d| (twice the fp32 bound, allowing any accumulation order and rounding),
      output rounding to bf16 2 r (1+r)^2 (1 + 2 g) |q||d| (2r allows truncation), the fp32 kernel's own g |q||d|,
    all by Cauchy-Schwarz, times 1.01; e0 and a tiny qc term cover denormals flushed to zero by the bf16 units.
    The analysis assumes no overflow: |q| |d| <= 2^126 keeps every product and partial sum finite in any order, so
    docs with |d| > dlim = 2^126 / |q| are always rescored (the GEMM may overflow where the fp32 kernel does not)."""
    dim = q32.shape[1]
    u, r = 2.0**-24, 2.0**-8
    g = dim * u / (1 - dim * u)
    exact_docs = docs.dtype in (torch.bfloat16, torch.int8)
    c = (r if exact_docs else r * (2 + r)) + 2 * g * (1 + r) ** 2 + 2 * r * (1 + r) ** 2 * (1 + 2 * g) + g + 4 * u
    c *= 1.01
    qn = q32.double().norm(dim=1) * (1 + 1e-12)
    tiny = 2.0**-100
    smax = 1.0 if doc_scale is None else max(1.0, float(doc_scale.abs().max()))
    qc = c * qn + tiny * dim**0.5
    e0 = tiny * (dim + dim**0.5 * qn) * smax
    dlim = (2.0**126 / qn.clamp_min(1e-300)) * (1 - 2.0**-20)
    # fp32 copies rounded up (down for the limit) so the bound never shrinks.
    up = 1 + 2.0**-20
    as32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    return as32(qc * up), as32(e0 * up), as32(dlim)


def _search_prefilter(q32, docs, k, doc_scale, scores, ids, threads, tile_n, isa):
    cpu, ptr = _ext.cpu, _common.ptr
    nq, dim = q32.shape
    nb = docs.shape[0]
    code = _common.DTYPE_CODES[docs.dtype]
    tile = min(tile_n or _PREFILTER_TILE, nb)
    qb = q32.to(torch.bfloat16)
    qc, e0, dlim = _prefilter_bounds(q32, docs, doc_scale)
    cap = min(max(2 * k, k + 64), nb + 1)  # as the fused kernel's selectors
    hits = torch.empty((nq, cap, 2), dtype=torch.int64)  # [nq, cap] of C++ Hit {float score; int64 id}
    count = torch.empty(nq, dtype=torch.int64)
    thr = torch.empty(nq, dtype=torch.float32)
    state = (ptr(hits), ptr(count), ptr(thr), nq, k, cap)
    cpu.topk_select_init(*state)
    conv = None if docs.dtype == torch.bfloat16 else torch.empty((tile, dim), dtype=torch.bfloat16)
    dnorm = torch.empty(tile, dtype=torch.float32)
    approx_buf = torch.empty(nq * tile, dtype=torch.bfloat16)
    esize = docs.element_size()
    for lo in range(0, nb, tile):
        n = min(tile, nb - lo)
        cpu.topk_prefilter_convert(
            code, ptr(docs) + lo * dim * esize, n, dim, 0 if conv is None else ptr(conv), ptr(dnorm),
            0 if doc_scale is None else ptr(doc_scale) + 4 * lo, threads, isa,
        )
        src = docs[lo : lo + n] if conv is None else conv[:n]
        approx = approx_buf[: nq * n].view(nq, n)
        torch.mm(qb, src.T, out=approx)
        cpu.topk_prefilter_select(
            code, *state, ptr(approx), n, n, lo, ptr(q32), ptr(docs), ptr(doc_scale), dim, ptr(qc), ptr(e0),
            ptr(dlim), ptr(dnorm), threads, isa,
        )
    cpu.topk_select_finish(*state, nb, ptr(scores), ptr(ids), threads)


@_topk_ip_op.register_kernel("cuda")
def _topk_ip_cuda(queries, docs, k, doc_scale):
    _check_finite(queries)
    cuda = _ext.cuda
    nq, dim = queries.shape
    nb = docs.shape[0]
    if (
        not _ext.has_cuda_kernels()
        or k > cuda.topk_ip_max_k
        or dim > cuda.topk_ip_max_dim
        or nb > cuda.topk_ip_max_n
    ):
        return _topk_ip_torch_chunked(queries, docs, k, doc_scale)
    with torch.cuda.device(queries.device):  # the kernel plans for, and launches on, the current device
        scores = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
        ids = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
        if nq == 0:
            return scores, ids
        q = queries.to(torch.float32).contiguous()
        code = _common.DTYPE_CODES[docs.dtype]
        nbytes = cuda.topk_ip_workspace_bytes(nq, nb, dim, k, code)
        # Scratch through torch's caching allocator, on the current stream (shows in max_memory_allocated).
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=queries.device)
        cuda.topk_ip(
            code, _common.ptr(q), _common.ptr(docs), _common.ptr(doc_scale), nq, nb, dim, k, _common.ptr(scores),
            _common.ptr(ids), _common.ptr(workspace), nbytes, _common.stream(q),
        )
    return scores, ids
