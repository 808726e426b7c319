"""Drop-in compatibility with HF transformers' RAG models: HF-identical fused losses (hf_rag_*) and a one-line
patch_transformers() that swaps them into RagSequenceForGeneration / RagTokenForGeneration. transformers is
imported only when patching."""

from __future__ import annotations

from .hf import hf_rag_sequence_nll, hf_rag_token_marginalize, hf_rag_token_nll
from .patch import is_transformers_patched, patch_transformers, unpatch_transformers

__all__ = [
    "hf_rag_sequence_nll",
    "hf_rag_token_marginalize",
    "hf_rag_token_nll",
    "is_transformers_patched",
    "patch_transformers",
    "unpatch_transformers",
]
