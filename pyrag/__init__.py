"""pyrag: Retrieval-Augmented Generation (Lewis et al., 2020) with a fused C++/CUDA core."""

from __future__ import annotations

from ._ext import has_cuda_kernels

__version__ = "0.1.0"

__all__ = ["has_cuda_kernels", "__version__"]
