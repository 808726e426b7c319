"""Int8 sketches of float doc matrices for pyrag.topk_ip: symmetric per-row int8 codes plus, per row, rigorous
upper bounds on the row's norm and on its quantisation residual. The CPU kernel, and on CUDA the fused kernel for up
to 8 queries, scan the codes first (a quarter of fp32's bytes, half of fp16's) and compute exact scores only where
the bound says a doc could still make the top k, so results are bit-identical to a search without the sketch
(csrc/topk_ip_cpu.cpp, SketchPass, has the error analysis; csrc/topk_ip_cuda.cu, SketchGemv, is the GPU twin)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import FLOAT_DTYPES

_CHUNK_BYTES = 64 << 20  # fp64 working set per chunk of rows while building a sketch


class Sketch(NamedTuple):
    """codes [N, D] int8, scale [N] fp32 (codes * scale ~= docs), norm [N] fp32 >= |docs[i]|, res [N] fp32 >=
    |docs[i] - codes[i] * scale[i]|; all contiguous, on the docs' device."""

    codes: torch.Tensor
    scale: torch.Tensor
    norm: torch.Tensor
    res: torch.Tensor


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: x [N, D] float -> (q [N, D] int8, scale [N] fp32) with x ~= q * scale[:, None].

    scale = max|x_row| / 127, so the largest entry of each row maps to +-127 exactly; an all-zero row gets
    scale 0 and q = 0 (dequantises to zeros instead of dividing by zero)."""
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=1) / 127.0 if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> the smallest fp32 >= x (a bound must not shrink when it is narrowed)."""
    f = x.to(torch.float32)
    return torch.where(f.to(torch.float64) < x, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def make_sketch(docs: torch.Tensor) -> Sketch:
    """Build the int8 sketch of finite float docs [N, D] (float32 / float16 / bfloat16) on their device.

    Costs N * (D + 12) bytes next to the docs (+25% for fp32 docs, +50% for fp16/bf16). Norms and residuals are
    summed in fp64 and rounded up, so they bound the true values whatever the data; rows are processed in chunks
    of about 64 MiB of fp64 work space."""
    if not isinstance(docs, torch.Tensor):
        raise TypeError(f"docs must be a torch.Tensor, got {type(docs).__name__}")
    if docs.dim() != 2 or docs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"docs must be a 2-D float32/float16/bfloat16 tensor, got {docs.dtype} {tuple(docs.shape)}")
    n, d = docs.shape
    codes = torch.empty((n, d), dtype=torch.int8, device=docs.device)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    rows = max(1, _CHUNK_BYTES // max(1, 8 * d))
    slack = 1.0 + (d + 4) * 2.0**-52  # fp64 rounding of a sum of d squares and its square root
    for lo in range(0, n, rows):
        x = docs[lo : lo + rows].to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            bad = lo + int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"docs contain NaN or inf (first in row {bad} of docs.shape={tuple(docs.shape)})")
        c, s = quantize_int8(docs[lo : lo + rows])
        codes[lo : lo + rows] = c
        resid = x - c.to(torch.float64) * s.to(torch.float64)[:, None]  # exact: c * s needs <= 32 bits
        norm = torch.linalg.vector_norm(x, dim=1) * slack
        res = torch.linalg.vector_norm(resid, dim=1) * slack
        parts.append((s, _round_up_f32(norm), _round_up_f32(res)))
    if not parts:
        e = torch.empty(0, dtype=torch.float32, device=docs.device)
        return Sketch(codes, e, e.clone(), e.clone())
    scale, norm, res = (torch.cat(p).contiguous() for p in zip(*parts))
    return Sketch(codes, scale, norm, res)


def check_sketch(sketch, docs: torch.Tensor) -> Sketch:
    """Validate a sketch passed to topk_ip against its docs; errors name the field and show its value."""
    if not isinstance(sketch, Sketch):
        raise TypeError(f"sketch must be a pyrag.ops.sketch.Sketch (from make_sketch), got {type(sketch).__name__}")
    if docs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"sketch is for float docs; docs are {docs.dtype} (int8 docs need no sketch)")
    n, d = docs.shape
    if sketch.codes.dtype != torch.int8 or tuple(sketch.codes.shape) != (n, d):
        raise ValueError(f"sketch.codes must be int8 [{n}, {d}] like docs, got {sketch.codes.dtype} "
                         f"{tuple(sketch.codes.shape)}")
    for name in ("scale", "norm", "res"):
        t = getattr(sketch, name)
        if t.dtype != torch.float32 or tuple(t.shape) != (n,):
            raise ValueError(f"sketch.{name} must be float32 [{n}], got {t.dtype} {tuple(t.shape)}")
    for name, t in zip(Sketch._fields, sketch):
        if t.device != docs.device:
            raise ValueError(f"sketch.{name} is on {t.device} but docs are on {docs.device}")
    return Sketch(*(t.detach().contiguous() for t in sketch))
