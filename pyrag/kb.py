"""Knowledge bases: a directory of passages (SQLite), their embedding index and meta.json; resumable sharded
building (`build_kb`, `pyrag build-kb`) and `KnowledgeBase` with dense / BM25 / hybrid (BM25+DPR) search."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import numbers
import operator
import os
import shutil
import sqlite3
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._argparse import DefaultsFormatter
from .kb_io import atomic_path, iter_passages, usual_mode, write_json_atomic

__all__ = ["DEFAULT_HYBRID_WEIGHT", "KnowledgeBase", "SearchResult", "build_kb", "build_kb_cli"]

FORMAT = "pyrag-kb"
VERSION = 1
META = "meta.json"
PASSAGES = "passages.sqlite"
INDEX = "index.pyragidx"
BUILD_DIR = "build"
BM25_DIR = "bm25"
DTYPES = ("float32", "float16", "bfloat16", "int8")

# Hybrid (BM25+DPR, Karpukhin et al. 2020, sec. 5.1): candidates = union of the dense and BM25 top lists, ranked
# by dense + lambda * bm25. The DPR paper ranks by BM25 + 1.1 * sim with unnormalised BERT inner products
# (i.e. lambda = 1/1.1 here). pyrag's default encoder is L2-normalised (cosine in [-1, 1]) while BM25 scores
# span ~0-40, so the weight must shrink by about the ratio of their spreads. Measured on SQuAD v1.1's training
# split questions (benchmarks/eval_squad_retrieval.py; zero-shot normalised MiniLM, 8,582 questions), recall@1 for
# lambda = 0.01 / 0.02 / 0.03 / 0.05 / 0.1 is 0.746 / 0.783 / 0.803 / 0.816 / 0.813 (BM25 alone 0.768, dense
# 0.653): 0.05 is the default for normalised encoders, 1/1.1 (the paper's) for unnormalised ones, and
# search(..., hybrid_weight=) or kb.hybrid_weight overrides it.
DEFAULT_HYBRID_WEIGHT = {True: 0.05, False: 1 / 1.1}


@dataclass
class SearchResult:
    """Top-k passages per question. rows int64 [Q, k] (KB row numbers), scores fp32 [Q, k] (inner product for
    "dense", BM25 score for "bm25", the fused score for "hybrid"), vectors fp32 [Q, k, D] (stored passage
    vectors, dequantised); ids / titles / texts: list (Q) of lists (k) of str."""

    rows: torch.Tensor
    scores: torch.Tensor
    ids: list[list[str]]
    titles: list[list[str]]
    texts: list[list[str]]
    vectors: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# helpers

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 22), b""):
            h.update(piece)
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}


def _passage_digest_update(h, rec: dict) -> None:
    h.update(json.dumps([rec["id"], rec["title"], rec["text"]], ensure_ascii=False).encode())
    h.update(b"\n")


def _scan_passages(passages) -> tuple[str, int]:
    """(content sha256, count) of a passage source, validating each record (no database written)."""
    h, n = hashlib.sha256(), 0
    for _, rec in iter_passages(passages):
        _passage_digest_update(h, rec)
        n += 1
    return h.hexdigest(), n


def _write_db(passages, path: Path, show_progress: bool = False) -> tuple[str, int]:
    """Write passages into a new SQLite file at `path` (atomically) and return (content sha256, count).

    ValueError for a malformed record, an empty text, a duplicate id (naming both places) or no passages."""
    from tqdm.auto import tqdm

    tmp, final = atomic_path(path)
    bar = tqdm(desc="reading passages", unit="passage", disable=not show_progress, dynamic_ncols=True)
    h, n = hashlib.sha256(), 0
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT NOT NULL, "
                    "text TEXT NOT NULL)")
        con.execute("CREATE TABLE sources (row INTEGER PRIMARY KEY, loc TEXT NOT NULL)")
        batch, locs = [], []

        def flush():
            con.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", batch)
            con.executemany("INSERT INTO sources VALUES (?, ?)", locs)
            batch.clear()
            locs.clear()

        for where, rec in iter_passages(passages):
            batch.append((n, rec["id"], rec["title"], rec["text"]))
            locs.append((n, where))
            _passage_digest_update(h, rec)
            n += 1
            if len(batch) >= 10000:
                bar.update(len(batch))
                flush()
        bar.update(len(batch))
        flush()
        bar.close()
        if n == 0:
            raise ValueError("no passages: the input is empty")
        try:
            con.execute("CREATE UNIQUE INDEX passages_id ON passages(id)")
        except sqlite3.IntegrityError:
            # GROUP BY sorts (N log N); a self-join without the index would be quadratic on a big corpus.
            (dup,) = con.execute("SELECT id FROM passages GROUP BY id HAVING COUNT(*) > 1 ORDER BY MIN(row) "
                                 "LIMIT 1").fetchone()
            first, second = (r[0] for r in con.execute(
                "SELECT s.loc FROM passages p JOIN sources s ON s.row = p.row WHERE p.id = ? ORDER BY p.row LIMIT 2",
                (dup,)))
            raise ValueError(f"duplicate passage id {dup!r}: at {first} and again at {second}") from None
        con.execute("DROP TABLE sources")
        con.commit()
        con.execute("VACUUM")
        con.close()
        con = None
        os.replace(tmp, final)
    except BaseException:
        bar.close()
        if con is not None:
            con.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return h.hexdigest(), n


def _save_shard(path: Path, vectors: torch.Tensor) -> None:
    """Atomically save one finished shard of passage vectors fp32 [n, D]."""
    tmp, final = atomic_path(path)
    try:
        torch.save(vectors.cpu().contiguous(), tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _as_bi_encoder(encoder):
    from .models.encoders import BiEncoder, Encoder

    if encoder is None or isinstance(encoder, (str, os.PathLike)):
        return BiEncoder.from_pretrained(encoder)
    if isinstance(encoder, BiEncoder):
        return encoder
    if isinstance(encoder, Encoder):
        return BiEncoder(encoder)
    raise TypeError(f"encoder must be an Encoder, a BiEncoder, a directory or None, got {type(encoder).__name__}")


DEFAULT_ENCODER_REF = "pyrag:default-encoder"  # meta.json's name for default_encoder_path(), wherever installed


def _encoder_record(enc, fingerprint: str) -> dict:
    from .models.encoders import default_encoder_path

    path = enc.source
    try:
        if path is not None and Path(path) == default_encoder_path().resolve():
            path = DEFAULT_ENCODER_REF  # so the KB stays openable on a machine with another site-packages
    except (ImportError, FileNotFoundError):  # no packaged MiniLM here: the path is recorded as it is
        pass
    return {**enc.config_dict(), "path": path, "fingerprint": fingerprint, "dim": enc.dim}


def _short(fp: str) -> str:
    return fp[:12]


# ---------------------------------------------------------------------------------------------------------------
# building

def build_kb(passages, out_dir, *, encoder=None, index: str = "flat", dtype: str = "float32", batch_size: int = 64,
             shard_size: int = 4096, show_progress: bool = True, hnsw_options: dict | None = None,
             bm25: bool = False, sketch: bool = False) -> KnowledgeBase:
    """Encode passages into a knowledge base directory and return it opened.

    passages: a path (.jsonl {"id","title","text"} / DPR .tsv / SQuAD .json) or an iterable of such dicts.
    encoder: Encoder (shared for questions), BiEncoder, an encoder directory, or None (MiniLM).
    index: "flat" (FlatIndex, dtype float32|float16|bfloat16|int8) or "hnsw" (HNSWIndex, float32).
    hnsw_options (index="hnsw" only): HNSWIndex's M, ef_construction, ef_search, space, norm_headroom, seed;
    meta.json records all of them as used (defaults filled in). Every option is checked before any encoding.
    Passages are encoded in shards of shard_size; each finished shard is saved atomically, so an interrupted
    build resumes from the last completed shard when called again with the same passages, passage encoder and
    shard_size; index, dtype, hnsw_options, sketch and the question encoder only shape the final indexing step,
    so they may change on resume (the index is then built with the new ones, nothing is re-encoded). Calling it
    on a finished KB built from the same passages, encoders and options is a no-op; different ones are an
    error.
    bm25=True also builds the BM25 index now (otherwise on the first bm25/hybrid search).
    sketch=True (flat index, float dtypes) keeps an int8 sketch next to the vectors (FlatIndex(sketch=True)):
    the same search results, faster CPU retrieval (batches of up to 12 questions; any size on AMX CPUs), +25%
    index size for float32.
    An existing KB's index can get one in memory instead: `kb.index.build_sketch()`."""
    out = Path(out_dir)
    if index not in ("flat", "hnsw"):
        raise ValueError(f"index must be 'flat' or 'hnsw', got {index!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if index == "hnsw" and dtype != "float32":
        raise ValueError(f"the hnsw index stores float32 vectors; got {dtype=}")
    if not isinstance(sketch, bool):
        raise TypeError(f"sketch must be True or False, got {sketch!r}")
    if sketch and (index != "flat" or dtype == "int8"):
        raise ValueError(f"sketch=True needs index='flat' with a float dtype; got {index=}, {dtype=}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if hnsw_options is not None and not isinstance(hnsw_options, dict):
        raise TypeError(f"hnsw_options must be a dict or None, got {type(hnsw_options).__name__}: {hnsw_options!r}")
    if index != "hnsw" and hnsw_options:
        raise ValueError(f"hnsw_options are for index='hnsw' only; got {index=} with {hnsw_options=}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir exists and is not a directory: {str(out)!r}")
    if index == "hnsw":
        if "space" not in (hnsw_options or {}):
            # hnswlib's inner-product graph unless told otherwise: on real, non-normalised embeddings DPR's L2
            # augmentation loses most of its recall (benchmarks/results/hnsw.json, MiniLM on SQuAD: recall@10
            # 0.343 vs 0.959 at ef_search=16, 0.731 vs 0.999 at 128). A KB started or finished before that
            # default keeps the space it recorded (none recorded = "augmented", the older default), so reruns
            # of a finished one are still no-ops.
            recorded = _recorded_hnsw_options(out)
            space = "ip" if recorded is None else recorded.get("space", "augmented")
            hnsw_options = {**(hnsw_options or {}), "space": space}
        # Checked now, not after hours of encoding: a bad option would otherwise fail in _finish.
        hnsw_options = resolve_hnsw_options(hnsw_options)
    else:
        hnsw_options = {}
    bi = _as_bi_encoder(encoder)
    p_fp = bi.passage_encoder.fingerprint()
    q_fp = p_fp if bi.shared else bi.question_encoder.fingerprint()
    settings = {"index": index, "dtype": dtype, "passage_fingerprint": p_fp, "question_fingerprint": q_fp,
                "hnsw_options": hnsw_options, "sketch": sketch}

    if (out / META).exists():
        meta = _read_meta(out)
        digest, n = _scan_passages(passages)
        built = {"index": meta["index"], "dtype": meta["dtype"],
                 "passage_fingerprint": meta["passage_encoder"]["fingerprint"],
                 "question_fingerprint": meta["question_encoder"]["fingerprint"],
                 "hnsw_options": _resolved_record(meta), "sketch": meta.get("sketch", False)}
        diff = [k for k in settings if settings[k] != built[k]]
        if meta["passages_sha256"] != digest:
            diff.append("passages")
        if diff:
            hint = (" (to search an existing KB with a sketch, open it and call kb.index.build_sketch())"
                    if diff == ["sketch"] else "")
            raise ValueError(f"{out} already holds a finished knowledge base that differs in {', '.join(diff)}; "
                             f"choose another out_dir or delete it{hint}")
        if show_progress:
            print(f"pyrag: knowledge base {out} is already built ({n} passages); nothing to do", file=sys.stderr)
        kb = KnowledgeBase.open(out, encoder=bi, verify=False)
        if bm25:
            _ = kb.bm25  # build and cache it now
        return kb

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / BUILD_DIR / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is not None and (out / PASSAGES).exists():
        digest, n = _scan_passages(passages)
        # Only what the encoded shards depend on must match; the index options are applied by _finish.
        diff = ["passage_fingerprint"] if state.get("passage_fingerprint") != p_fp else []
        if state.get("passages_sha256") != digest:
            diff.append("passages")
        if state.get("shard_size") != shard_size:
            diff.append("shard_size")
        if diff:
            raise ValueError(f"{out} holds an unfinished build that differs in {', '.join(diff)}; rerun with the "
                             f"same passages, passage encoder and shard_size to resume it, or delete {out} to "
                             f"start over")
        if any(state.get(k) != v for k, v in settings.items()):
            state = {**state, **settings}
            write_json_atomic(state_path, state)
    else:
        shutil.rmtree(out / BUILD_DIR, ignore_errors=True)
        try:
            digest, n = _write_db(passages, out / PASSAGES, show_progress)
        except BaseException:
            if created:  # unreadable passages: leave no empty out_dir behind (nothing was encoded yet)
                shutil.rmtree(out, ignore_errors=True)
            raise
        state = {**settings, "passages_sha256": digest, "count": n, "shard_size": shard_size}
        write_json_atomic(state_path, state)

    _encode_shards(out, bi.passage_encoder, n, shard_size, batch_size, show_progress)
    _finish(out, bi, state, show_progress)
    kb = KnowledgeBase.open(out, encoder=bi, verify=False)
    if bm25:
        _ = kb.bm25  # build and cache it now
    return kb


def _with_space(record: dict) -> dict:
    """The hnsw options a meta.json / build state recorded, with the graph space made explicit (a record
    without one predates the option and was built "augmented")."""
    opts = dict(record.get("hnsw_options") or {})
    if record.get("index") == "hnsw":
        opts.setdefault("space", "augmented")
    return opts


HNSW_OPTIONS = ("M", "ef_construction", "ef_search", "space", "norm_headroom", "seed")


def resolve_hnsw_options(options: dict | None) -> dict:
    """Validate HNSWIndex options and fill in its defaults: {M, ef_construction, ef_search, space, norm_headroom,
    seed}. ValueError naming the bad option and its value (HNSWIndex's own checks, on an empty index: hnswlib is
    not needed)."""
    from .index import HNSWIndex

    options = dict(options or {})
    unknown = sorted(set(options) - set(HNSW_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"hnsw_options: unknown option(s) {unknown}; known: {list(HNSW_OPTIONS)}")
    try:
        idx = HNSWIndex(1, **options)
    except ValueError as e:
        raise ValueError(f"hnsw_options: {e}") from None
    return {"M": idx.M, "ef_construction": idx.ef_construction, "ef_search": idx.ef_search, "space": idx.space,
            "norm_headroom": idx.norm_headroom, "seed": idx.seed}


def _resolved_record(record: dict) -> dict:
    """The hnsw options of a meta.json with the defaults of the time filled in ({} for a flat index)."""
    return resolve_hnsw_options(_with_space(record)) if record.get("index") == "hnsw" else {}


def _recorded_hnsw_options(out: Path) -> dict | None:
    """hnsw options of the KB finished or started in out (space made explicit), or None when there is none."""
    for path in (out / META, out / BUILD_DIR / "state.json"):
        if path.is_file() and (path.name == META or (out / PASSAGES).exists()):  # as build_kb decides to resume
            rec = json.loads(path.read_text())
            return _with_space(rec) if rec.get("index") == "hnsw" else None
    return None


def _shard_path(out: Path, j: int) -> Path:
    return out / BUILD_DIR / f"shard_{j:06d}.pt"


def _encode_shards(out: Path, enc, n: int, shard_size: int, batch_size: int, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    n_shards = (n + shard_size - 1) // shard_size
    done = [j for j in range(n_shards) if _shard_path(out, j).exists()]
    done_rows = sum(min(shard_size, n - j * shard_size) for j in done)
    con = sqlite3.connect(f"file:{out / PASSAGES}?mode=ro", uri=True)
    bar = tqdm(total=n, initial=done_rows, desc="encoding passages", unit="passage", smoothing=0.05,
               disable=not show_progress, dynamic_ncols=True)
    try:
        for j in range(n_shards):
            if _shard_path(out, j).exists():
                continue
            lo, hi = j * shard_size, min(n, (j + 1) * shard_size)
            rows = con.execute("SELECT title, text FROM passages WHERE row >= ? AND row < ? ORDER BY row",
                               (lo, hi)).fetchall()
            vecs = enc.encode_passages([r[0] for r in rows], [r[1] for r in rows], batch_size=batch_size,
                                       show_progress=False, progress=bar)
            _save_shard(_shard_path(out, j), vecs)
    finally:
        bar.close()
        con.close()


def _finish(out: Path, bi, state: dict, show_progress: bool) -> None:
    """Index the shards, store encoders that exist only in memory, write meta.json, remove the shards."""
    from .index import FlatIndex, HNSWIndex

    n, shard_size = state["count"], state["shard_size"]
    n_shards = (n + shard_size - 1) // shard_size
    dim = bi.passage_encoder.dim
    if state["index"] == "flat":
        idx = FlatIndex(dim, state["dtype"], sketch=state.get("sketch", False))
        for j in range(n_shards):
            idx.add(torch.load(_shard_path(out, j)))
    else:
        idx = HNSWIndex(dim, **state["hnsw_options"])
        # One add over all vectors: the inner-product augmentation constant then covers every norm (no rebuild).
        idx.add(torch.cat([torch.load(_shard_path(out, j)) for j in range(n_shards)]), show_progress=show_progress)
    if len(idx) != n:
        raise RuntimeError(f"indexed {len(idx)} vectors for {n} passages")
    idx.save(out / INDEX)

    records = {}
    for role, enc, fp in (("passage_encoder", bi.passage_encoder, state["passage_fingerprint"]),
                          ("question_encoder", bi.question_encoder, state["question_fingerprint"])):
        rec = _encoder_record(enc, fp)
        if role == "question_encoder" and bi.shared:
            rec["path"] = records["passage_encoder"]["path"]
        elif not enc.is_unmodified() or enc.fingerprint() != fp:
            # Trained in memory or never saved: keep a copy so the KB can be reopened on its own.
            enc.save_pretrained(out / role)
            rec["path"] = role
        records[role] = rec
    meta = {
        "format": FORMAT, "version": VERSION, "count": n, "dim": dim, "dtype": state["dtype"],
        "index": state["index"], "hnsw_options": state["hnsw_options"], "sketch": state.get("sketch", False),
        "shared_encoder": bi.shared,
        "passage_encoder": records["passage_encoder"], "question_encoder": records["question_encoder"],
        "passages_sha256": state["passages_sha256"], "shard_size": shard_size,
        "files": {PASSAGES: _file_record(out / PASSAGES), INDEX: _file_record(out / INDEX)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / META, meta)
    shutil.rmtree(out / BUILD_DIR, ignore_errors=True)


def _read_meta(path: Path) -> dict:
    f = path / META
    if not f.is_file():
        hint = " (an unfinished build: rerun build_kb with the same arguments to resume it)" \
            if (path / BUILD_DIR).exists() else ""
        raise FileNotFoundError(f"not a knowledge base: {str(path)!r} has no {META}{hint}")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: corrupted ({e.msg} on line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{f}: corrupted (a JSON {type(meta).__name__}, not an object)")  # noqa: TRY004 - a corrupted file, as above
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{f}: not a {FORMAT} version {VERSION} file "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    for key, kind in (("files", dict), ("passage_encoder", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{f}: corrupted ({key!r} is missing or not a JSON object)")  # noqa: TRY004
    return meta


# ---------------------------------------------------------------------------------------------------------------
# opening and searching

class KnowledgeBase:
    """An opened knowledge base directory. Use `KnowledgeBase.open(path)` or `build_kb(...)`.

    `.index` is the embedding index (labels = row numbers 0..N-1), `.encoder` the question encoder (the
    passage encoder too when shared; loaded lazily from the path recorded in meta.json), `.passage_encoder`,
    `.meta`, `.bm25` (built on first use and cached under the KB directory), `len(kb)`."""

    def __init__(self, path: Path, meta: dict, index, question_encoder=None, passage_encoder=None):
        self.path = Path(path)
        self.meta = meta
        self.index = index
        self._q_enc = question_encoder
        self._p_enc = passage_encoder
        self._bm25 = None
        self._lock = threading.Lock()
        self._con = sqlite3.connect(f"file:{self.path / PASSAGES}?mode=ro", uri=True, check_same_thread=False)
        # lambda of the hybrid search; the default depends on the score scale (cosine or raw inner product).
        self.hybrid_weight = DEFAULT_HYBRID_WEIGHT[bool(meta["passage_encoder"]["normalize"])]

    @classmethod
    def open(cls, path, encoder=None, *, mmap: bool = True, verify: bool = True) -> KnowledgeBase:
        """Open a KB directory.

        encoder: None (load lazily what the KB was built with), an Encoder (must equal the passage encoder the
        KB was built with: same weights, config, vocabulary, pooling; it then also encodes questions when the
        KB was built with a shared encoder), a BiEncoder (its passage encoder must match; its question encoder
        is used for questions as given, e.g. one fine-tuned by RAG), or a directory of either.
        verify: check the sizes and sha256 of the passages and index files against meta.json (one read of
        each); mmap: map the index's vectors from disk instead of reading them."""
        from .index import load_index
        from .models.encoders import BiEncoder, Encoder

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"knowledge base directory not found: {str(path)!r}")
        meta = _read_meta(path)
        for name, rec in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise FileNotFoundError(f"{path}: missing {name} (listed in {META})")
            if f.stat().st_size != rec["bytes"]:
                raise ValueError(f"{f}: size {f.stat().st_size} differs from the {rec['bytes']} bytes recorded in "
                                 f"{META} (truncated or replaced)")
            if verify and _sha256_file(f) != rec["sha256"]:
                raise ValueError(f"{f}: checksum differs from {META} (corrupted or replaced)")
        index = load_index(path / INDEX, mmap=mmap, verify=False)
        if len(index) != meta["count"] or index.dim != meta["dim"]:
            raise ValueError(f"{path / INDEX}: holds {len(index)} vectors of dim {index.dim}, {META} says "
                             f"{meta['count']} of dim {meta['dim']}")
        q_enc = p_enc = None
        if encoder is not None:
            if isinstance(encoder, (str, os.PathLike)):
                encoder = BiEncoder.from_pretrained(encoder)
            if isinstance(encoder, BiEncoder):
                p_enc, q_enc = encoder.passage_encoder, encoder.question_encoder
            elif isinstance(encoder, Encoder):
                p_enc = encoder
                q_enc = encoder if meta["shared_encoder"] else None
            else:
                raise TypeError(f"encoder must be an Encoder, BiEncoder, directory or None, got "
                                f"{type(encoder).__name__}")
            _check_encoder(path, meta["passage_encoder"], p_enc, "the given encoder")
        return cls(path, meta, index, q_enc, p_enc)

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __repr__(self) -> str:
        return (f"KnowledgeBase({str(self.path)!r}, passages={len(self)}, dim={self.meta['dim']}, "
                f"index={self.meta['index']}/{self.meta['dtype']})")

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    # -- encoders ----------------------------------------------------------------------------------------------
    def encoder_dir(self, role: str = "passage_encoder") -> Path:
        """Directory of the passage_encoder / question_encoder the KB was built with (as recorded in meta.json)."""
        from .models.encoders import default_encoder_path

        if role not in ("passage_encoder", "question_encoder"):
            raise ValueError(f"role must be 'passage_encoder' or 'question_encoder', got {role!r}")
        rec = self.meta[role]
        if not rec.get("path"):
            raise ValueError(f"{self.path}: the {role} it was built with was not saved; pass it to "
                             f"KnowledgeBase.open(path, encoder=...)")
        p = default_encoder_path() if rec["path"] == DEFAULT_ENCODER_REF else Path(rec["path"])
        return p if p.is_absolute() else self.path / p

    def _load_encoder(self, role: str):
        from .models.encoders import Encoder

        rec = self.meta[role]
        p = self.encoder_dir(role)
        enc = Encoder.from_pretrained(p, pooling=rec["pooling"], normalize=rec["normalize"],
                                      max_length=rec["max_length"])
        _check_encoder(self.path, rec, enc, f"the encoder now at {p}")
        return enc

    @property
    def passage_encoder(self):
        with self._lock:
            if self._p_enc is None:
                if self.meta["shared_encoder"] and self._q_enc is not None:
                    self._p_enc = self._q_enc
                else:
                    self._p_enc = self._load_encoder("passage_encoder")
            return self._p_enc

    @property
    def encoder(self):
        """The question encoder (the same object as passage_encoder when the KB was built with a shared one)."""
        if self._q_enc is None:
            if self.meta["shared_encoder"]:
                self._q_enc = self.passage_encoder
            else:
                with self._lock:
                    if self._q_enc is None:
                        self._q_enc = self._load_encoder("question_encoder")
        return self._q_enc

    question_encoder = encoder

    @question_encoder.setter
    def question_encoder(self, enc) -> None:
        from .models.encoders import Encoder

        if not isinstance(enc, Encoder):
            raise TypeError(f"question_encoder must be an Encoder, got {type(enc).__name__}")
        if enc.dim != self.dim:
            raise ValueError(f"question encoder dim {enc.dim} != KB dim {self.dim}")
        self._q_enc = enc

    # -- passages ----------------------------------------------------------------------------------------------
    def _fetch(self, rows: torch.Tensor, cols: str) -> list:
        rows = torch.as_tensor(rows)
        if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.dtype.is_complex:
            raise TypeError(f"rows must be integer row numbers, got {rows.dtype=}")
        flat = rows.reshape(-1).tolist()
        bad = [r for r in flat if not 0 <= r < len(self)]
        if bad:
            raise ValueError(f"row {bad[0]} is out of range for a KB of {len(self)} passages")
        uniq = sorted(set(flat))
        got = {}
        with self._lock:
            for s in range(0, len(uniq), 900):  # SQLite's limit on bound parameters
                part = uniq[s:s + 900]
                q = f"SELECT row, {cols} FROM passages WHERE row IN ({','.join('?' * len(part))})"
                for r in self._con.execute(q, part):
                    got[r[0]] = r[1:]
        return [got[r] for r in flat]

    @staticmethod
    def _nest(values: list, shape) -> list:
        if len(shape) <= 1:
            return values
        step = int(np.prod(shape[1:]))
        return [KnowledgeBase._nest(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]

    def passages(self, rows) -> tuple[list, list]:
        """(titles, texts) of int64 rows (any shape), as nested lists shaped like rows."""
        rows = torch.as_tensor(rows)
        got = self._fetch(rows, "title, text")
        return (self._nest([g[0] for g in got], tuple(rows.shape)), self._nest([g[1] for g in got],
                                                                                tuple(rows.shape)))

    def ids(self, rows) -> list:
        """Passage ids of int64 rows (any shape), nested like rows."""
        rows = torch.as_tensor(rows)
        return self._nest([g[0] for g in self._fetch(rows, "id")], tuple(rows.shape))

    def row_of(self, passage_id: str) -> int:
        """Row number of the passage with this id (KeyError if absent)."""
        with self._lock:
            r = self._con.execute("SELECT row FROM passages WHERE id = ?", (str(passage_id),)).fetchone()
        if r is None:
            raise KeyError(f"no passage with id {passage_id!r} in {self.path}")
        return int(r[0])

    def vectors(self, rows) -> torch.Tensor:
        """Stored passage vectors (dequantised) fp32 [..., D] for int64 rows of any shape."""
        return self.index.reconstruct(rows)  # it checks the rows are integers (1.7 is not row 1)

    def iter_passages(self, batch: int = 10000):
        """Yield (row, id, title, text) for every passage in row order."""
        for lo in range(0, len(self), batch):
            with self._lock:
                got = self._con.execute("SELECT row, id, title, text FROM passages WHERE row >= ? AND row < ? "
                                        "ORDER BY row", (lo, lo + batch)).fetchall()
            yield from got

    # -- BM25 ---------------------------------------------------------------------------------------------------
    @property
    def bm25(self):
        """The BM25 index over "title text" of every passage: loaded from <kb>/bm25, else built (and saved there
        when the directory is writable)."""
        from .bm25 import BM25

        if self._bm25 is None:
            d = self.path / BM25_DIR
            stamp = self.meta["passages_sha256"]
            if (d / "passages_sha256.txt").is_file() and (d / "passages_sha256.txt").read_text().strip() == stamp:
                self._bm25 = BM25.load(d)
            else:
                texts = [f"{t} {x}" if t else x for _, _, t, x in self.iter_passages()]
                self._bm25 = BM25.build(texts, show_progress=len(texts) > 100000)
                try:
                    self._bm25.save(d)
                    usual_mode(d, directory=True)  # BM25.save's mkdtemp leaves it 0700: others could not read it
                    (d / "passages_sha256.txt").write_text(stamp + "\n")
                except OSError:
                    pass  # read-only KB: keep it in memory
        return self._bm25

    # -- search -------------------------------------------------------------------------------------------------
    def encode_questions(self, questions: Sequence[str], batch_size: int = 64,
                         show_progress: bool = False) -> torch.Tensor:
        """Question vectors fp32 [Q, D] from the question encoder."""
        return self.encoder.encode(questions, batch_size=batch_size, show_progress=show_progress)

    def _query_vectors(self, questions, batch_size, show_progress) -> torch.Tensor:
        if isinstance(questions, torch.Tensor):
            if questions.dim() != 2 or questions.shape[1] != self.dim:
                raise ValueError(f"question vectors must be [Q, {self.dim}], got {questions.shape=}")
            return questions.detach()
        return self.encode_questions(questions, batch_size, show_progress)

    def search(self, questions, k: int, mode: str = "dense", *, batch_size: int = 64, show_progress: bool = False,
               hybrid_weight: float | None = None, candidates: int = 100,
               question_vectors: torch.Tensor | None = None) -> SearchResult:
        """Top-k passages for questions (any iterable of str, or vectors [Q, D] for mode "dense").

        mode "dense": inner product with the stored vectors; "bm25": BM25 over title + text; "hybrid": DPR's
        BM25+DPR fusion: the union of the top-`candidates` (int >= 1) dense and BM25 passages, ranked by
        dense + hybrid_weight * bm25, hybrid_weight a finite float >= 0 (default: self.hybrid_weight, see
        DEFAULT_HYBRID_WEIGHT; 0 is the dense ranking, a large weight the BM25 one).
        question_vectors [Q, D] (one row per question) may be given with text questions to skip encoding them.
        Ties are broken by the lower row. Tensors come back on the index's device."""
        if mode not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"mode must be 'dense', 'bm25' or 'hybrid', got {mode!r}")
        try:
            k = operator.index(k)
        except TypeError:
            raise TypeError(f"k must be an int, got {type(k).__name__}: {k!r}") from None
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be an int in [1, {len(self)}] (the KB size), got {k=}")
        is_vec = isinstance(questions, torch.Tensor)
        if not is_vec:
            if isinstance(questions, (str, bytes)) or not isinstance(questions, Iterable):
                raise TypeError(f"questions must be an iterable of str or a [Q, D] tensor, got "
                                f"{type(questions).__name__}: {questions!r:.80}")
            questions = list(questions)  # once: a generator would be used up by the check below
            bad = next((i for i, x in enumerate(questions) if not isinstance(x, str)), None)
            if bad is not None:
                raise TypeError(f"questions must be an iterable of str or a [Q, D] tensor; item {bad} is "
                                f"{type(questions[bad]).__name__}: {questions[bad]!r:.80}")
        if is_vec and mode != "dense":
            raise ValueError(f"mode {mode!r} needs the question texts (BM25), got a tensor")
        if question_vectors is not None:
            if is_vec:
                raise ValueError("question_vectors is for text questions; questions is already a tensor")
            if not isinstance(question_vectors, torch.Tensor):
                raise TypeError(f"question_vectors must be a [Q, {self.dim}] tensor, got "
                                f"{type(question_vectors).__name__}")
            if question_vectors.dim() != 2 or question_vectors.shape != (len(questions), self.dim):
                raise ValueError(f"question_vectors must be [Q, D] = [{len(questions)}, {self.dim}] (one row per "
                                 f"question), got {tuple(question_vectors.shape)} for {len(questions)} questions")
            if not bool(torch.isfinite(question_vectors).all()):
                raise ValueError("question_vectors contains NaN or infinite values")
            question_vectors = question_vectors.detach()
        if mode == "hybrid":
            lam = self.hybrid_weight if hybrid_weight is None else hybrid_weight
            what = "hybrid_weight" if hybrid_weight is not None else "kb.hybrid_weight"
            if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
                raise TypeError(f"{what} must be a float, got {type(lam).__name__}: {lam!r}")
            lam = float(lam)
            if not math.isfinite(lam) or lam < 0:
                raise ValueError(f"{what} must be a finite float >= 0 (the weight of the BM25 score), got {lam!r}")
            try:
                candidates = operator.index(candidates)
            except TypeError:
                raise TypeError(f"candidates must be an int, got {type(candidates).__name__}: "
                                f"{candidates!r}") from None
            if candidates < 1:
                raise ValueError(f"candidates must be an int >= 1, got {candidates=}")
        dev = self.index.device
        if mode == "dense":
            q = question_vectors if question_vectors is not None else \
                self._query_vectors(questions, batch_size, show_progress)
            scores, rows = self.index.search(q, k)
        elif mode == "bm25":
            scores, rows = self.bm25.search(questions, k)
        else:
            q = question_vectors if question_vectors is not None else \
                self._query_vectors(questions, batch_size, show_progress)
            scores, rows = self._hybrid(questions, q, k, lam, max(candidates, k))
        rows, scores = rows.to(dev), scores.to(dev).float()
        titles, texts = self.passages(rows.cpu())
        return SearchResult(rows=rows, scores=scores, ids=self.ids(rows.cpu()), titles=titles, texts=texts,
                            vectors=self.vectors(rows))

    def _hybrid(self, questions: list[str], q: torch.Tensor, k: int, lam: float, c: int):
        from .bm25 import topk_rows

        c = min(c, len(self))
        _, d_rows = self.index.search(q, c)
        d_rows = d_rows.cpu()
        q = q.float().cpu()
        out_s = torch.empty(len(questions), k)
        out_r = torch.empty(len(questions), k, dtype=torch.int64)
        for i, bm in enumerate(self.bm25.iter_scores(questions)):
            b_rows = topk_rows(bm, c)
            union = np.union1d(d_rows[i].numpy(), b_rows)  # sorted: ties then go to the lower row
            dense = (self.vectors(torch.from_numpy(union)).cpu() @ q[i]).numpy()
            fused = dense + lam * bm[union]
            top = topk_rows(fused.astype(np.float64), k)
            out_r[i] = torch.from_numpy(union[top])
            out_s[i] = torch.from_numpy(fused[top].astype(np.float32))
        return out_s, out_r

    def to(self, device) -> KnowledgeBase:
        """Move the index (search and returned vectors) to device; returns self."""
        self.index.to(device)
        return self

    def close(self) -> None:
        self._con.close()


def _check_encoder(path: Path, rec: dict, enc, what: str) -> None:
    fp = enc.fingerprint()
    if fp != rec["fingerprint"]:
        raise ValueError(
            f"encoder mismatch: the knowledge base {path} was built with encoder {rec.get('name')!r} "
            f"(pooling={rec.get('pooling')}, normalize={rec.get('normalize')}, fingerprint {_short(rec['fingerprint'])}), "
            f"but {what} ({enc.name!r}, pooling={enc.pooling}, normalize={enc.normalize}) has fingerprint "
            f"{_short(fp)}; its vectors would not match the index. Use the encoder the KB was built with, or "
            f"rebuild the KB")


# ---------------------------------------------------------------------------------------------------------------
# command line

def build_kb_cli(argv: list[str]) -> int:
    """`pyrag build-kb`: encode a passage file into a knowledge base directory."""
    ap = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="pyrag build-kb", description=(
        "Encode passages into a knowledge base directory (passages.sqlite, index.pyragidx, meta.json). "
        "Interrupted builds resume from the last finished shard when rerun with the same arguments; rerunning "
        "a finished build is a no-op."))
    ap.add_argument("passages", help="passages: .jsonl {id,title,text} | DPR .tsv (id, text, title) | SQuAD .json")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--encoder", default=None,
                    help="encoder directory (HF encoder, DPR checkpoint, or a pyrag BiEncoder; default: MiniLM)")
    ap.add_argument("--index", choices=["flat", "hnsw"], default="flat")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="stored vector dtype (flat index)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=4096, help="passages per resumable shard")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--hnsw-ef-construction", type=int, default=200)
    ap.add_argument("--hnsw-ef-search", type=int, default=None,
                    help="query-time beam width saved with the index (default: HNSWIndex's, 128)")
    ap.add_argument("--hnsw-space", choices=["ip", "augmented"], default=None,
                    help="hnswlib inner-product graph (the default for new KBs: better recall on real embeddings) "
                         "or DPR's L2 augmentation")
    ap.add_argument("--bm25", action="store_true", help="also build the BM25 index now")
    ap.add_argument("--sketch", action="store_true",
                    help="keep an int8 sketch next to the float vectors (flat index): the same results, faster CPU "
                         "search (up to 12 questions at a time; any number on AMX CPUs), +25%% index size for "
                         "float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"pyrag build-kb: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hnsw = None
    if args.index == "hnsw":
        hnsw = {"M": args.hnsw_m, "ef_construction": args.hnsw_ef_construction}
        if args.hnsw_ef_search is not None:
            hnsw["ef_search"] = args.hnsw_ef_search
        if args.hnsw_space is not None:
            hnsw["space"] = args.hnsw_space
    try:
        kb = build_kb(args.passages, args.out, encoder=args.encoder, index=args.index, dtype=args.dtype,
                      batch_size=args.batch_size, shard_size=args.shard_size, show_progress=not args.no_progress,
                      hnsw_options=hnsw, bm25=args.bm25, sketch=args.sketch)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"pyrag build-kb: error: {e}", file=sys.stderr)
        return 2
    print(f"built {kb!r}")
    return 0
