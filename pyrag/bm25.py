"""BM25 over a passage collection: a thin wrapper over the bm25s library (Lucene's BM25 variant, English stop
words, lower-cased word tokens) that returns top-k rows with deterministic ties and scores arbitrary rows
(for the BM25+dense hybrid). The scoring itself is bm25s's; nothing here re-implements BM25."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["BM25"]

_STOPWORDS = "en"


def _bm25s():
    import bm25s  # imported lazily: `import pyrag` must stay cheap

    return bm25s


class BM25:
    """A bm25s index over N passages. Build with `BM25.build(texts)`, or `BM25.load(dir)`.

    Rows are the positions of the texts given to build (the KB's row numbers)."""

    def __init__(self, retriever, n_docs: int):
        self._r = retriever
        self.n_docs = int(n_docs)

    def __len__(self) -> int:
        return self.n_docs

    @classmethod
    def build(cls, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
              show_progress: bool = False) -> BM25:
        """Index texts [N] (for passages: title + " " + text)."""
        if len(texts) == 0:
            raise ValueError("BM25.build: texts is empty")
        bm25s = _bm25s()
        tokens = bm25s.tokenize(list(texts), stopwords=_STOPWORDS, show_progress=show_progress)
        if not any(len(t) for t in tokens.ids):  # bm25s itself fails with "max() arg is an empty sequence"
            raise ValueError(f"BM25.build: the {len(texts)} texts hold no indexable word (only English stop words, "
                             f"punctuation or whitespace)")
        r = bm25s.BM25(k1=k1, b=b, method=method)
        r.index(tokens, show_progress=show_progress)
        return cls(r, len(texts))

    def _query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
            raise TypeError(f"queries must be a list of str, got {type(queries).__name__}")
        toks = _bm25s().tokenize(list(queries), stopwords=_STOPWORDS, return_ids=False, show_progress=False)
        vocab = self._r.vocab_dict
        # Words the corpus never uses score 0 everywhere; bm25s wants them dropped before scoring.
        return [[vocab[w] for w in q if w in vocab and w != ""] for q in toks]

    def iter_scores(self, queries: Sequence[str]) -> Iterator[np.ndarray]:
        """BM25 score of every passage for each query: yields float32 [N] per query (all zero for a query with
        no word in the corpus vocabulary)."""
        for ids in self._query_ids(queries):
            if ids:
                yield np.asarray(self._r.get_scores_from_ids(ids), dtype=np.float32)
            else:
                yield np.zeros(self.n_docs, dtype=np.float32)

    def search(self, queries: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k passages per query: (scores [Q, k] fp32, rows [Q, k] int64), best first, ties -> lower row."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
        k = int(k)
        if not 1 <= k <= self.n_docs:
            raise ValueError(f"k must be in [1, {self.n_docs}] (the number of passages), got {k=}")
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        for i, s in enumerate(self.iter_scores(queries)):
            rows[i] = topk_rows(s, k)
            scores[i] = s[rows[i]]
        return torch.from_numpy(scores), torch.from_numpy(rows)

    def save(self, path) -> None:
        """Write the index as a directory, atomically (kb_io.atomic_dir: written beside it, swapped in by rename; a
        reader never sees it half-deleted). Refuses to replace a directory that is not a BM25 index."""
        from .kb_io import atomic_dir

        with atomic_dir(path, marker="n_docs.txt") as tmp:
            self._r.save(str(tmp), show_progress=False)
            (tmp / "n_docs.txt").write_text(f"{self.n_docs}\n")

    @classmethod
    def load(cls, path, mmap: bool = False) -> BM25:
        path = Path(path)
        if not (path / "n_docs.txt").is_file():
            raise FileNotFoundError(f"no BM25 index at {str(path)!r}")
        r = _bm25s().BM25.load(str(path), mmap=mmap, show_progress=False, verbosity=0)
        return cls(r, int((path / "n_docs.txt").read_text()))


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores [N], best first, ties broken by lower index (O(N), not a full sort)."""
    n = scores.shape[0]
    if k >= n:
        cand = np.arange(n)
    else:
        kth = np.partition(scores, n - k)[n - k]
        cand = np.nonzero(scores >= kth)[0]  # every row tied with the k-th is a candidate
    order = np.lexsort((cand, -scores[cand]))
    return cand[order[:k]].astype(np.int64)
