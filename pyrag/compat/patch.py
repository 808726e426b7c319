"""patch_transformers() / unpatch_transformers(): swap transformers' RAG get_nll (both classes) and
RagTokenForGeneration.marginalize for pyrag's fused, HF-identical versions, and put the originals back."""

from __future__ import annotations

import inspect
import threading

from .hf import hf_rag_sequence_nll, hf_rag_token_marginalize, hf_rag_token_nll

__all__ = ["is_transformers_patched", "patch_transformers", "unpatch_transformers"]

_LOCK = threading.Lock()
# (class, attribute name) -> the function the class held before patching; empty when not patched.
_ORIGINALS: dict[tuple[type, str], object] = {}


def _sequence_get_nll(self, seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0,
                      exclude_bos_score=False, n_docs=None):
    """pyrag's fused RagSequenceForGeneration.get_nll (same signature and result; see hf_rag_sequence_nll)."""
    n_docs = n_docs if n_docs is not None else self.config.n_docs
    # HF's own lookup, `or` included (a top-level bos_token_id of 0 falls through to the generator's).
    bos_token_id = self.config.bos_token_id or self.config.generator.bos_token_id
    return hf_rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=self.config.generator.pad_token_id,
                               bos_token_id=bos_token_id, n_docs=n_docs, reduce_loss=reduce_loss,
                               epsilon=epsilon, exclude_bos_score=bool(exclude_bos_score))


def _token_get_nll(self, seq_logits, doc_scores, target, reduce_loss=False, epsilon=0.0, n_docs=None):
    """pyrag's fused RagTokenForGeneration.get_nll (same signature and result; see hf_rag_token_nll)."""
    n_docs = n_docs if n_docs is not None else self.config.n_docs
    return hf_rag_token_nll(seq_logits, doc_scores, target, pad_token_id=self.config.generator.pad_token_id,
                            n_docs=n_docs, reduce_loss=reduce_loss, epsilon=epsilon)


def _token_marginalize(self, seq_logits, doc_scores, n_docs=None):
    """pyrag's fused RagTokenForGeneration.marginalize (same signature and result; see hf_rag_token_marginalize)."""
    n_docs = n_docs if n_docs is not None else self.config.n_docs
    return hf_rag_token_marginalize(seq_logits, doc_scores, n_docs=n_docs)


def _targets():
    """[(class, name, replacement)] — transformers imported here, lazily, so pyrag never needs it loaded."""
    from transformers.models.rag.modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

    return [(RagSequenceForGeneration, "get_nll", _sequence_get_nll),
            (RagTokenForGeneration, "get_nll", _token_get_nll),
            (RagTokenForGeneration, "marginalize", _token_marginalize)]


def _check_signature(cls, name, original, replacement):
    # The replacements mirror one method signature; refuse (rather than silently mis-bind arguments) if a
    # transformers release changes it.
    want = list(inspect.signature(replacement).parameters)
    got = list(inspect.signature(original).parameters)
    if got != want:
        import transformers

        raise RuntimeError(f"pyrag.compat cannot patch {cls.__name__}.{name} of transformers "
                           f"{transformers.__version__}: its parameters are {got}, pyrag's replacement takes {want}")


class _Patch:
    """Returned by patch_transformers(); as a context manager it undoes, on exit, the patch that call made."""

    def __init__(self, applied: bool):
        self.applied = applied

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.applied:
            unpatch_transformers()
        return False

    def __repr__(self):
        return f"<pyrag transformers patch ({'applied by this call' if self.applied else 'already active'})>"


def patch_transformers() -> _Patch:
    """Make transformers' RAG models use pyrag's fused losses: replaces ``RagSequenceForGeneration.get_nll``,
    ``RagTokenForGeneration.get_nll`` and ``RagTokenForGeneration.marginalize`` (same signatures, same results,
    same gradients; they read pad/bos/n_docs from ``self.config`` exactly as HF does).

    Idempotent (a second call changes nothing). Use once at the top of a training script, or as
    ``with pyrag.compat.patch_transformers(): ...`` to restore the originals on exit (only if this call patched).
    """
    with _LOCK:
        if _ORIGINALS:
            return _Patch(applied=False)
        targets = _targets()
        for cls, name, new in targets:
            _check_signature(cls, name, cls.__dict__[name], new)
        for cls, name, new in targets:
            _ORIGINALS[(cls, name)] = cls.__dict__[name]
            setattr(cls, name, new)
        return _Patch(applied=True)


def unpatch_transformers() -> None:
    """Put back the functions patch_transformers() replaced (a no-op when nothing is patched)."""
    with _LOCK:
        for (cls, name), original in _ORIGINALS.items():
            setattr(cls, name, original)
        _ORIGINALS.clear()


def is_transformers_patched() -> bool:
    """True while patch_transformers() is in effect."""
    return bool(_ORIGINALS)
