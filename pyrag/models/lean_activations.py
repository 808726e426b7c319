"""Fewer activations saved for backward in an HF generator's training forward, with identical numbers.

Two copies that plain autograd keeps and pyrag's training forward does not:

1. Duplicate autocast casts. Under bf16/fp16 autocast every `F.linear` casts its fp32 input on its own, and
   autograd keeps each cast for backward. A transformer reads one fp32 tensor many times: the q/k/v projections
   of every attention read one layer-norm output, and the cross-attention k/v projections of all decoder layers
   read the one encoder output (24 casts of a [B*K, L, d] tensor in 12-layer BART). Here every read shares one
   copy; each read keeps its own autograd node, whose backward hands its gradient to the fp32 input as
   autocast's cast does, so the gradients are still summed in fp32.
2. The GELU output of a feed-forward block. `fc2(gelu(fc1(x)))` keeps both fc1's output (for GELU's backward)
   and GELU's output (for fc2's weight gradient), the two largest tensors of a layer ([B*K, L, 4d] each). Here
   the fc2 read of a GELU output becomes one autograd node that keeps only the GELU input and recomputes the
   GELU (elementwise, cheap) in backward.

Forward values and gradients are bit-identical to plain autograd (tests/test_lean_activations.py checks it
under CPU autocast and in fp32): the same kernels run on the same values, only what is kept differs. Two cases
are equal only up to rounding, and HF's encoder-decoders meet neither: a GELU output that something else reads
too (its GELU backward then runs once per read instead of once on the summed gradient), and one weight read by
several feed-forward blocks under autocast (autocast sums its reads' gradients in bf16 through its cast cache;
here each read's gradient reaches the weight in fp32). Inside torch.compile and non-reentrant checkpoints the
mode stands aside (plain autograd). On the GPU
training benchmark's shape (BART-large, B=8, K=10, 200-token contexts) this removes ~3.4 GiB of the peak
(benchmarks/estimate_train_memory.py). Without gradients it is never entered (see lean_activations()).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["LeanActivations", "lean_activations"]


class _Use(torch.autograd.Function):
    """One read of the shared low-precision copy `low` of `x`: forward returns (a view of) `low`; backward returns
    the read's gradient to `x` in x's dtype, as autocast's cast would, so autograd accumulates it in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(pre), w, b) keeping only pre (and w): backward recomputes gelu(pre). h = gelu(pre) is passed in
    (the model already computed it) and used, not saved. The backward formulas are those autograd uses for
    addmm/mm and gelu (mm_mat1/mm_mat2 backward, a bias sum over rows, aten.gelu_backward), so the gradients
    are the same bits as the unfused graph's."""

    @staticmethod
    def forward(ctx, pre, h, w, b, approximate: str):
        ctx.save_for_backward(pre, w)
        ctx.approximate = approximate
        ctx.has_bias = b is not None
        return F.linear(h, w, b)

    @staticmethod
    def backward(ctx, grad):
        pre, w = ctx.saved_tensors
        need_pre, _, need_w, need_b, _ = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_pre = grad_w = grad_b = None
        if need_pre:
            grad_pre = torch.ops.aten.gelu_backward(g2.mm(w).view(pre.shape), pre, approximate=ctx.approximate)
        if need_w:
            grad_w = g2.t().mm(F.gelu(pre, approximate=ctx.approximate).reshape(-1, pre.shape[-1]))
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_pre, None, grad_w, grad_b, None


def _entry_alive(entry, x: torch.Tensor):
    """The cached value of entry = (weakref to the key tensor, its version, value) if x is that tensor, unmodified."""
    return entry is not None and entry[0]() is x and entry[1] == x._version


class LeanActivations(TorchFunctionMode):
    """Context manager (a torch function mode) applying both rewrites to the F.linear / F.gelu calls inside it.

    Caches are keyed by tensor identity and version counter (a tensor modified in place is treated as new) and
    hold their values weakly: a cast copy nobody saved for backward is freed as it would be without the mode."""

    def __init__(self):
        super().__init__()
        self._casts: dict[int, tuple] = {}  # id(x) -> (ref x, version, dtype, ref low copy)
        self._gelus: dict[int, tuple] = {}  # id(out) -> (ref out, version, ref pre, pre version, approximate)

    def __exit__(self, *exc):
        self._casts.clear()
        self._gelus.clear()
        return super().__exit__(*exc)

    def _low(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        hit = self._casts.get(id(x))
        if _entry_alive(hit, x) and hit[2] == dtype:
            low = hit[3]()
            if low is not None:
                return low
        low = x.detach().to(dtype)
        self._casts[id(x)] = (weakref.ref(x), x._version, dtype, weakref.ref(low))
        return low

    def _gelu_input(self, x: torch.Tensor):
        hit = self._gelus.get(id(x))
        if not _entry_alive(hit, x):
            return None
        pre = hit[2]()
        if pre is None or pre._version != hit[3]:
            return None
        return pre, hit[4]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear and func is not F.gelu:  # most calls: out first, the mode's cost is per call
            return func(*args, **kwargs)
        # torch.compile traces this method badly (id() breaks the graph, and a compiled piece can be reused for
        # the wrong op); a non-reentrant checkpoint recomputes without the mode and must save what the first
        # pass saved: both get plain autograd
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _under_checkpoint():
            return func(*args, **kwargs)
        if func is F.gelu:
            out = func(*args, **kwargs)
            pre = args[0] if args else kwargs.get("input")
            if isinstance(pre, torch.Tensor) and isinstance(out, torch.Tensor) and out.requires_grad:
                approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
                self._gelus[id(out)] = (weakref.ref(out), out._version, weakref.ref(pre), pre._version, approximate)
            return out
        if func is F.linear and args and isinstance(args[0], torch.Tensor):
            return self._linear(func, args, kwargs)
        return func(*args, **kwargs)

    def _linear(self, func, args, kwargs):
        x = args[0]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        kind = x.device.type
        auto = kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)
        low = torch.get_autocast_dtype(kind) if auto else None
        gelu = self._gelu_input(x) if isinstance(w, torch.Tensor) else None
        if gelu is not None:
            pre, approximate = gelu
            dtype = low if auto else x.dtype
            if pre.dtype == dtype == x.dtype and pre.is_contiguous() and x.is_contiguous() and w.dim() == 2 \
                    and (auto or (w.dtype == dtype and (b is None or b.dtype == dtype))):
                # autocast would cast the weight and bias for this linear: the same casts, done here
                wc = w.to(dtype) if w.dtype != dtype else w
                bc = b.to(dtype) if b is not None and b.dtype != dtype else b
                return _GeluLinear.apply(pre, x.detach(), wc, bc, approximate)
        # autocast already shares the cast of a leaf that requires grad (its own cache): leave those to it
        if auto and x.dtype == torch.float32 and low != torch.float32 and not (x.is_leaf and x.requires_grad):
            c = self._low(x, low)
            args = (_Use.apply(x, c) if x.requires_grad else c, *args[1:])
        return func(*args, **kwargs)


def _under_checkpoint() -> bool:
    """Whether torch.utils.checkpoint's non-reentrant saved-tensor hooks are active (unknown: assume so)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    hooks = top(False)
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


def lean_activations(device: torch.device | str):
    """LeanActivations() when gradients are enabled, else a no-op context (inference saves nothing anyway, and
    skips the mode's per-call dispatch)."""
    kind = torch.device(device).type
    if kind in ("cuda", "cpu") and torch.is_grad_enabled():
        return LeanActivations()
    return nullcontext()
