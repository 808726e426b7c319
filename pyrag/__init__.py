"""pyrag: Retrieval-Augmented Generation (Lewis et al., 2020) with a fused C++/CUDA core."""

from __future__ import annotations

from ._ext import has_cuda_kernels
from .losses import (
    RagSequenceLoss,
    RagTokenLoss,
    rag_sequence_loss,
    rag_token_loss,
    rag_token_marginal_logprobs,
)
from .ops.topk_ip import topk_ip
from .index import FlatIndex, HNSWIndex
from .kb import KnowledgeBase, build_kb
from .models.encoders import BiEncoder, Encoder
from .models.rag import RagSequence, RagToken

__version__ = "0.1.0"

__all__ = [
    "has_cuda_kernels",
    "__version__",
    "rag_sequence_loss",
    "rag_token_loss",
    "rag_token_marginal_logprobs",
    "RagSequenceLoss",
    "RagTokenLoss",
    "topk_ip",
    "FlatIndex",
    "HNSWIndex",
    "Encoder",
    "BiEncoder",
    "KnowledgeBase",
    "build_kb",
    "RagToken",
    "RagSequence",
]
