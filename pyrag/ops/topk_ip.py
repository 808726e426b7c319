"""pyrag.topk_ip: exact top-k inner-product search as the torch custom op "pyrag::topk_ip", over the fused CPU
kernel (csrc/topk_ip_cpu.cpp) and CUDA kernel (csrc/topk_ip_cuda.cu); the plain-torch twin is
pyrag.reference.topk_ip_reference."""

from __future__ import annotations

import contextlib
import numbers
import threading

import torch

from .. import _ext
from . import _common
from .sketch import Sketch, check_sketch

QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)

# Knobs for tests and benchmarks (defaults are what users get). threads: None = torch.get_num_threads();
# tile_n: docs per tile (0 = auto); split: 0 auto, 1 threads split the docs, 2 threads split the queries;
# parts: doc partitions with split=1 (0 = one per thread); isa: -1 best, 0 scalar, 1 AVX2, 2 AVX-512;
# path: "auto", "fused" (SIMD fp32 dot products for every doc), "prefilter" (AMX bf16 scores for every doc,
# exact fp32 rescoring of the docs its error bound cannot rule out; same results, needs AMX; with a sketch it reads
# the sketch's int8 codes instead) or "sketch" (the same with SIMD int8 scores of a sketch; needs one). "auto" takes
# the SIMD sketch path up to 12 queries when given a sketch, and the AMX prefilter from 48 queries on where AMX
# exists (from 13 with a sketch) over at least 4096 docs and 256 docs per k: below that the fused kernel is memory
# bound and wins, and on fewer docs (or a wider k) rescoring every query's candidates costs more than the bf16
# scoring saves.
# On CUDA: cuda_path "auto" (the chunked-GEMM path for 9+ queries on fp16/bf16 docs, the fused kernel otherwise),
# "fused" or "gemm"; cuda_chunk: docs per GEMM chunk (0 = as many as fit in 64 MiB of fp32 scores); cuda_select: the
# kernel that folds GEMM score chunks into the candidate lists, "block" (16 queries per block, measured) or "warp"
# (a warp per query and column range, no block barriers; written to lift the Q >= 64 bottleneck, to be measured).
_DEFAULT_OPTIONS = {
    "threads": None, "tile_n": 0, "split": 0, "parts": 0, "isa": -1, "path": "auto", "cuda_path": "auto",
    "cuda_chunk": 0, "cuda_select": "block",
}
_SELECT_CODES = {"block": 0, "warp": 1}
_PATH_CODES = {"auto": 0, "fused": 1, "prefilter": 2, "sketch": 3}
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
    if overrides.get("path", "auto") not in _PATH_CODES:
        raise ValueError(f"path must be one of {sorted(_PATH_CODES)}, got {overrides['path']!r}")
    if overrides.get("cuda_path", "auto") not in ("auto", "fused", "gemm"):
        raise ValueError(f"cuda_path must be 'auto', 'fused' or 'gemm', got {overrides['cuda_path']!r}")
    if overrides.get("cuda_select", "block") not in _SELECT_CODES:
        raise ValueError(f"cuda_select must be 'block' or 'warp', got {overrides['cuda_select']!r}")
    chunk = overrides.get("cuda_chunk", 0)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"cuda_chunk must be an int >= 0 (0 = automatic), got {chunk!r}")
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


def cpu_has_amx() -> bool:
    """Whether the CPU kernel can use its AMX bf16 prefilter (Sapphire Rapids or later, on Linux)."""
    return _ext.cpu.topk_ip_has_amx()


def topk_ip(
    queries: torch.Tensor,
    docs: torch.Tensor,
    k: int,
    *,
    doc_scale: torch.Tensor | None = None,
    sketch: Sketch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search: the k docs with the largest q . d for each query.

    Args:
        queries: [Q, D] float32 / float16 / bfloat16 (converted to fp32, which is exact).
        docs: [N, D] float32 / float16 / bfloat16, or int8 with `doc_scale`.
        k: 1 <= k <= N (k > N raises rather than padding, so every returned id is a real doc).
        doc_scale: [N] float (used as fp32), required for int8 docs and refused for float docs; the score of doc i
            is (q . docs[i]) * doc_scale[i], i.e. the inner product with the dequantised row.
        sketch: optional `pyrag.ops.sketch.make_sketch(docs)` for float docs. On the CPU, searches then scan its
            int8 codes first (SIMD up to 12 queries; beyond, on AMX CPUs, the AMX prefilter; elsewhere the sketch is
            not used past 12 queries) and compute exact scores only for docs a rigorous error bound cannot rule
            out: the same results bit for bit, about a quarter of the bytes read per search. On CUDA, up to 8
            queries read it the same way (half of fp16's bytes, a quarter of fp32's), with the same guarantee
            and bits; more queries do not use it. Costs N * (D + 12) bytes on the docs' device; build it once per
            doc matrix. The sketch
            describes the docs it was made from: after editing docs in place, make a new one (a stale sketch is
            not detected and gives wrong results).

    Returns:
        (scores [Q, k] float32 sorted descending, ids [Q, k] int64 row numbers into docs); equal scores are
        ordered by lower id. Q = 0 gives empty [0, k] tensors.

    Replaces `torch.topk(queries.float() @ docs.float().T, k)` (plus a deterministic tie order) without ever
    building the [Q, N] score matrix: scores are accumulated in fp32 and selected tile by tile.

    Notes:
        - Non-contiguous inputs are copied to contiguous ones first (a copy of docs costs memory and time; pass
          contiguous docs).
        - On CPUs with AMX (Intel Sapphire Rapids and later), 48 or more queries (over N >= 4096 docs, with
          k <= N / 256) go through a bf16 AMX prefilter:
          every doc is scored in bf16, and the exact fp32 score is computed only for docs that a rigorous error
          bound cannot rule out. The results are bit-identical to the all-fp32 kernel (the bound makes it exact).
        - Not differentiable: retrieval selects ids; recompute `q @ docs[ids].T` in torch where gradients are
          needed (pyrag's RAG models do). Inputs are detached.
        - Queries with NaN or inf raise ValueError (inf would give NaN/inf scores whose order differs between
          devices). Docs are not scanned (that costs a pass over them): a NaN score ranks as -inf.
        - Runs on the inputs' device: the fused CPU kernel, the CUDA kernel where pyrag was built with CUDA
          (k <= 4096, D <= 8192), otherwise a chunked plain-torch search (memory O(Q * (k + 65536))). On CUDA,
          9+ queries on fp16/bf16 docs take a tensor-core GEMM per doc chunk (torch.mm, fp32 accumulation and
          output) folded into the kernel's candidate lists: fp16/bf16 queries as they are, fp32 queries split
          into 2 (fp16) or 3 (bf16) parts of the docs' dtype so their precision is kept.
    """
    _check_inputs(queries, docs, k, doc_scale)
    k = int(k)
    queries = queries.detach().contiguous()
    docs = docs.detach().contiguous()
    if doc_scale is not None:
        doc_scale = doc_scale.detach().to(torch.float32).contiguous()
    if sketch is not None:
        sketch = check_sketch(sketch, docs)
        return torch.ops.pyrag.topk_ip(queries, docs, k, doc_scale, *sketch)
    return torch.ops.pyrag.topk_ip(queries, docs, k, doc_scale)


def _check_inputs(queries, docs, k, doc_scale) -> None:
    """Shapes, dtypes, devices and k: every error names the argument and shows its value."""
    for name, t in (("queries", queries), ("docs", docs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D [{'Q' if name == 'queries' else 'N'}, D], got {name}.shape={tuple(t.shape)}"
            )
    if queries.dtype not in QUERY_DTYPES:
        raise TypeError(f"queries must be float32, float16 or bfloat16, got {queries.dtype=}")
    if docs.dtype not in DOC_DTYPES:
        raise TypeError(
            f"docs must be float32, float16, bfloat16 or int8 (with doc_scale), got {docs.dtype=}"
        )
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"queries and docs must have the same D: {queries.shape=}, {docs.shape=}")
    if docs.shape[1] == 0:
        raise ValueError(f"D must be >= 1, got {docs.shape=}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # numpy integers too, as FlatIndex.search
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
            raise ValueError(
                "int8 docs need doc_scale [N] (score = (q . docs[i]) * doc_scale[i]); got doc_scale=None"
            )
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
        where = f"{queries.device=}, {docs.device=}" + (
            f", {doc_scale.device=}" if doc_scale is not None else ""
        )
        raise ValueError(f"queries, docs and doc_scale must be on one device, got {where}")


@torch.library.custom_op("pyrag::topk_ip", mutates_args=())
def _topk_ip_op(
    queries: torch.Tensor,
    docs: torch.Tensor,
    k: int,
    doc_scale: torch.Tensor | None,
    sketch_codes: torch.Tensor | None = None,
    sketch_scale: torch.Tensor | None = None,
    sketch_norm: torch.Tensor | None = None,
    sketch_res: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Devices without a pyrag kernel (CUDA in a CPU-only build, MPS, ...): plain torch, chunked over the docs.
    _check_finite(queries)
    return _topk_ip_torch_chunked(queries, docs, k, doc_scale)


@_topk_ip_op.register_fake
def _(queries, docs, k, doc_scale, sketch_codes=None, sketch_scale=None, sketch_norm=None, sketch_res=None):
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
        raise ValueError(
            f"queries contain NaN or inf (first in row {row} of queries.shape={tuple(queries.shape)})"
        )


def _topk_ip_torch_chunked(queries, docs, k, doc_scale, chunk=None):
    """Plain-torch search over doc chunks: memory O(Q * (k + chunk)) instead of the reference's [Q, N]. Serves
    devices without a pyrag kernel and sizes the CUDA kernel does not take (k > 4096, D > 8192, N >= 2^31)."""
    nq, nb = queries.shape[0], docs.shape[0]
    q = queries.to(torch.float32)
    chunk = chunk or max(1024, min(65536, (1 << 26) // max(nq, 1)))
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
def _topk_ip_cpu(queries, docs, k, doc_scale, sketch_codes=None, sketch_scale=None, sketch_norm=None,
                 sketch_res=None):
    if _common.simulating(queries):  # pyrag._ext.simulate_cuda(): the CUDA kernels' code, run on the CPU
        return _topk_ip_cuda(queries, docs, k, doc_scale, sketch_codes, sketch_scale, sketch_norm, sketch_res)
    _check_finite(queries)
    nq, dim = queries.shape
    nb = docs.shape[0]
    scores = torch.empty((nq, k), dtype=torch.float32)
    ids = torch.empty((nq, k), dtype=torch.int64)
    if nq == 0:
        return scores, ids
    q = queries.to(torch.float32).contiguous()
    opts = dict(_options)
    _ext.cpu.topk_ip(
        _common.DTYPE_CODES[docs.dtype],
        _common.ptr(q),
        _common.ptr(docs),
        _common.ptr(doc_scale),
        nq,
        nb,
        dim,
        k,
        _common.ptr(scores),
        _common.ptr(ids),
        opts["threads"] or _common.num_threads(),
        opts["tile_n"],
        opts["split"],
        opts["parts"],
        opts["isa"],
        _PATH_CODES[opts["path"]],
        _common.ptr(sketch_codes),
        _common.ptr(sketch_scale),
        _common.ptr(sketch_norm),
        _common.ptr(sketch_res),
    )
    return scores, ids


@_topk_ip_op.register_kernel("cuda")
def _topk_ip_cuda(queries, docs, k, doc_scale, sketch_codes=None, sketch_scale=None, sketch_norm=None,
                  sketch_res=None):
    _check_finite(queries)
    cuda = _common.kernels_for(queries)  # _C_cuda, or the CUDA simulator's module; None: no pyrag kernels here
    nq, dim = queries.shape
    nb = docs.shape[0]
    if (
        cuda is None
        or k > cuda.topk_ip_max_k
        or dim > cuda.topk_ip_max_dim
        or nb > cuda.topk_ip_max_n
    ):
        return _topk_ip_torch_chunked(queries, docs, k, doc_scale)
    with _common.device_guard(queries):  # the kernel plans for, and launches on, the current device
        scores = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
        ids = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
        if nq == 0:
            return scores, ids
        if _use_gemm_path(queries, docs):
            _topk_ip_cuda_gemm(queries, docs, k, scores, ids)
            return scores, ids
        q = queries.to(torch.float32).contiguous()
        code = _common.DTYPE_CODES[docs.dtype]
        sketch = (sketch_codes, sketch_scale, sketch_norm, sketch_res)
        if sketch_codes is not None and nq <= cuda.topk_ip_sketch_max_q and _sketch_cuda(cuda, code, q, docs, k,
                                                                                          sketch, scores, ids):
            return scores, ids
        # fp16/bf16 queries against docs of the same dtype go to the tensor cores as they are (exact); fp32 queries
        # are split into 2-3 parts of the docs' dtype to keep fp32 precision, which costs 2-3x the tensor-core work.
        exact = queries.dtype == docs.dtype and docs.dtype in (torch.float16, torch.bfloat16)
        nbytes = cuda.topk_ip_workspace_bytes(nq, nb, dim, k, code, exact)
        # Scratch through torch's caching allocator, on the current stream (shows in max_memory_allocated).
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=queries.device)
        cuda.topk_ip(
            code,
            _common.ptr(q),
            _common.ptr(docs),
            _common.ptr(doc_scale),
            nq,
            nb,
            dim,
            k,
            exact,
            _common.ptr(scores),
            _common.ptr(ids),
            _common.ptr(workspace),
            nbytes,
            _common.stream(q),
        )
    return scores, ids


def _sketch_cuda(cuda, code, q, docs, k, sketch, scores, ids) -> bool:
    """Few queries over float docs with an int8 sketch on CUDA: the codes are read first, a doc's row only where the
    bound cannot rule it out (the same results as without the sketch, bit for bit). The bound's per-query constants
    come from the CPU code that the CPU sketch path uses (one error analysis for both devices), which needs the
    queries on the host: a [Q, D] copy, Q <= 8. False (search without the sketch) when a query is too large for it."""
    nq, dim = q.shape
    nb = docs.shape[0]
    coef = torch.empty(4, nq, dtype=torch.float32)
    q_host = q.cpu()  # held: the C++ code reads it after ptr() returns
    if not _ext.cpu.topk_ip_sketch_bounds(_common.ptr(q_host), nq, dim, _common.ptr(coef)):
        return False
    coef = coef.to(q.device)
    nbytes = cuda.topk_ip_workspace_bytes(nq, nb, dim, k, code, False)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
    cuda.topk_ip_sketch(
        code, _common.ptr(q), _common.ptr(docs), *(_common.ptr(t) for t in sketch), _common.ptr(coef), nq, nb, dim, k,
        _common.ptr(scores), _common.ptr(ids), _common.ptr(workspace), nbytes, _common.stream(q),
    )
    return True


# ---- CUDA, many queries on fp16/bf16 docs: tensor-core GEMM (cuBLAS) per doc chunk + pyrag's fused selection ----
_GEMM_MIN_QUERIES = 9  # below, the fused kernel streams the docs once at memory speed and wins
_SCORE_CHUNK_BYTES = 64 << 20  # fp32 score chunk (all query parts); with the candidate lists, under 256 MiB
_mm_fp32_out: dict[int, bool] = {}


def _mm_has_fp32_out(device: torch.device) -> bool:
    """Whether torch.mm takes out_dtype=float32 for fp16/bf16 inputs here (fp32 accumulate and output; torch 2.8+).
    On the CPU (the CUDA simulator) the GEMM upcasts instead (_mm_fp32)."""
    if device.type == "cpu":
        return True
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _mm_fp32_out:
        try:
            a = torch.ones(2, 2, dtype=torch.float16, device=device)
            _mm_fp32_out[idx] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _mm_fp32_out[idx] = False
    return _mm_fp32_out[idx]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and output: cuBLAS on fp16/bf16 inputs on a GPU; exact upcasts on the CPU,
    whose torch.mm has no out_dtype (the CUDA simulator's stand-in for cuBLAS)."""
    if a.device.type == "cpu":
        return torch.mm(a.to(torch.float32), b.to(torch.float32))
    return torch.mm(a, b, out_dtype=torch.float32)


def _use_gemm_path(queries: torch.Tensor, docs: torch.Tensor) -> bool:
    path = _options["cuda_path"]
    if path == "fused" or docs.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not _mm_has_fp32_out(docs.device):
        return False
    return path == "gemm" or queries.shape[0] >= _GEMM_MIN_QUERIES


def _query_parts(queries: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries as [parts * Q, D] of the docs' dtype whose sum is the fp32 query to ~fp32 precision, and per-query
    score multipliers (None when 1). Queries already in that dtype are one exact part. fp16 parts of a query
    rescaled by a power of two (exact) so its largest entry sits near 2^14, inside fp16's range."""
    if queries.dtype == dtype:
        return queries, None
    q = queries.to(torch.float32)
    qmul = None
    if dtype == torch.float16:
        m = q.abs().amax(dim=1)
        e = torch.where(m > 0, 14 - torch.frexp(m).exponent, torch.zeros_like(m, dtype=torch.int32))
        e = e.clamp(-120, 120)
        q = torch.ldexp(q, e[:, None].to(torch.float32))
        qmul = torch.ldexp(torch.ones_like(m), (-e).to(torch.float32))
    parts, rest = [], q
    for _ in range(2 if dtype == torch.float16 else 3):  # 11 + 11 bits (fp16) or 8 + 8 + 8 bits (bf16)
        p = rest.to(dtype)
        parts.append(p)
        rest = rest - p.to(torch.float32)
    return torch.cat(parts), qmul


def _topk_ip_cuda_gemm(queries, docs, k, scores, ids) -> None:
    cuda = _common.kernels_for(queries)
    nq, nb = queries.shape[0], docs.shape[0]
    qp, qmul = _query_parts(queries, docs.dtype)
    nparts = qp.shape[0] // nq
    chunk = _options["cuda_chunk"] or max(128, _SCORE_CHUNK_BYTES // (4 * qp.shape[0]) // 128 * 128)
    chunk = min(chunk, nb)
    variant = _SELECT_CODES[_options["cuda_select"]]
    nbytes = cuda.topk_select_workspace_bytes(nq, k, chunk, variant)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=docs.device)
    stream = _common.stream(docs)
    for lo in range(0, nb, chunk):
        n = min(chunk, nb - lo)
        s = _mm_fp32(qp, docs[lo : lo + n].T)  # [parts * Q, n], fp32 accumulation
        for i in range(1, nparts):
            s[:nq] += s[i * nq : (i + 1) * nq]
        cuda.topk_select(
            _common.ptr(s), n, _common.ptr(qmul), nq, lo, n, k, chunk, lo == 0, lo + n >= nb, _common.ptr(workspace),
            nbytes, stream, variant,
        )
    cuda.topk_select_finish(nq, k, chunk, _common.ptr(scores), _common.ptr(ids), _common.ptr(workspace), nbytes,
                            stream, variant)
