"""pyrag: Retrieval-Augmented Generation (Lewis et al., 2020) with a fused C++/CUDA core."""

from __future__ import annotations

from ._ext import has_cuda_kernels
from .index import FlatIndex, HNSWIndex
from .kb import KnowledgeBase, build_kb
from .losses import (
    RagSequenceLoss,
    RagTokenLoss,
    rag_sequence_loss,
    rag_token_loss,
    rag_token_marginal_logprobs,
)
from .models.encoders import BiEncoder, Encoder
from .models.rag import RagSequence, RagToken
from .ops.topk_ip import topk_ip

__version__ = "0.1.0"

__all__ = [
    "BiEncoder",
    "Encoder",
    "FlatIndex",
    "HNSWIndex",
    "KnowledgeBase",
    "RagSequence",
    "RagSequenceLoss",
    "RagToken",
    "RagTokenLoss",
    "__version__",
    "build_kb",
    "has_cuda_kernels",
    "rag_sequence_loss",
    "rag_token_loss",
    "rag_token_marginal_logprobs",
    "topk_ip",
]
