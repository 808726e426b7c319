"""Readers for passage collections (JSONL, DPR TSV, SQuAD JSON, or an iterable of dicts) and QA files, with errors
that say where the bad record is; plus small atomic-write helpers shared by the KB and the trainers."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "iter_passages", "read_passages", "read_qa", "read_squad",
           "replace_dir", "usual_mode", "write_json_atomic"]


# Where /proc is unavailable (macOS), the umask as it was at import: os.umask can only be read by setting it, which
# is process-wide, so it is done once here rather than while other threads may be creating files.
_IMPORT_UMASK = os.umask(0o077)
os.umask(_IMPORT_UMASK)


def _umask() -> int:
    """The process umask, read without changing it (os.umask set-and-restore is process-wide and would race with
    other threads creating files); the umask at import where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def usual_mode(path, directory: bool = False) -> None:
    """Give a mkstemp file (0600) / mkdtemp directory (0700) the mode open() / mkdir() would have given it
    (0666 / 0777 less the umask), so a KB or model directory stays readable by other users and containers."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_json_atomic(path, obj: Any) -> None:
    """Write obj as JSON to path through a temporary file in the same directory and os.replace (the file gets
    the usual 0666-less-umask mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        usual_mode(tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def atomic_path(path) -> tuple[Path, Path]:
    """(tmp, final): a fresh temporary file beside `path`; write into tmp (it already exists, with the usual
    0666-less-umask mode, which writing into it keeps), then os.replace(tmp, final)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        usual_mode(tmp)
    except BaseException:
        _unlink(tmp)
        raise
    return Path(tmp), path


def replace_dir(tmp, path) -> None:
    """Move the finished directory tmp to path. An existing path is renamed aside first and removed only after tmp
    took its place: path is never a half-written directory (for an instant between the two renames it is absent),
    and if the second rename fails the old directory is put back."""
    import shutil

    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path, *, marker: str):
    """Write a directory atomically: `with atomic_dir(path, marker=NAME) as tmp:` fill tmp (created beside path,
    NAME among what it writes); on success it replaces path (replace_dir), on an exception it is removed and path is
    left as it was. The directory gets the usual 0777-less-umask mode (mkdtemp alone would leave it 0700).

    Replacing deletes what path held, so an existing path must be an empty directory or one this kind of writer
    made (it holds the file `marker`): saving a model into a project directory, or over a knowledge base, raises
    FileExistsError instead of wiping it (HF's save_pretrained writes into a directory and keeps other files)."""
    import shutil

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise FileExistsError(f"{str(path)!r} exists and is not a directory")
        if not (path / marker).is_file() and any(path.iterdir()):
            raise FileExistsError(
                f"refusing to replace {str(path)!r}: it holds other files and no {marker}, so it is not a directory "
                f"this writes (saving replaces the whole directory); choose a new or empty directory"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        usual_mode(tmp, directory=True)
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _check_passage(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a passage must be an object with 'id', 'title', 'text', got {type(rec).__name__}")
    if "text" not in rec:
        raise ValueError(f"{where}: passage has no 'text' field (keys: {sorted(rec)})")
    if "id" not in rec or rec["id"] is None or str(rec["id"]).strip() == "":
        raise ValueError(f"{where}: passage has no 'id' (keys: {sorted(rec)})")
    text, title = rec["text"], rec.get("title", "") or ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise ValueError(f"{where}: 'text' and 'title' must be strings, got {type(text).__name__} and "
                         f"{type(title).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: passage {rec['id']!r} has empty text")
    return {"id": str(rec["id"]), "title": title, "text": text}


def _detect(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".json"):
        return "json"
    raise ValueError(f"{path}: unknown passage file type (expected .jsonl, .tsv in DPR's id/text/title layout, "
                     f"or a SQuAD .json)")


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON on line {lineno} ({e.msg} at column {e.colno})") from None
            yield where, _check_passage(rec, where)


def _tsv(path: Path) -> Iterator[tuple[str, dict]]:
    # DPR's psgs_w100.tsv quotes text fields the csv way ("" escapes); passages can be long.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return
        if [h.strip().lower() for h in header] != ["id", "text", "title"]:
            raise ValueError(f"{path}:1: expected DPR's TSV header 'id<TAB>text<TAB>title', got {header!r}")
        for row in reader:
            lineno = reader.line_num
            where = f"{path}:{lineno}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 3:
                raise ValueError(f"{where}: expected 3 tab-separated fields (id, text, title), got {len(row)}")
            yield where, _check_passage({"id": row[0], "text": row[1], "title": row[2]}, where)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON on line {e.lineno} ({e.msg})") from None


def _squad_data(path: Path, doc: Any) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    return doc["data"]


def _squad_passages(path: Path) -> Iterator[tuple[str, dict]]:
    for ai, art in enumerate(_squad_data(path, _load_json(path))):
        title = art.get("title", "")
        for j, par in enumerate(art.get("paragraphs", [])):
            where = f"{path}: article {ai} paragraph {j}"
            yield where, _check_passage({"id": f"{title}#{j}", "title": title.replace("_", " "),
                                         "text": par.get("context", "")}, where)


def iter_passages(source) -> Iterator[tuple[str, dict]]:
    """Yield (where, {"id", "title", "text"}) from a path (.jsonl / DPR .tsv / SQuAD .json) or an iterable of
    dicts; `where` locates the record for error messages (file:line, or "passage #i")."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"passages file not found: {str(path)!r}")
        kind = _detect(path)
        if kind == "jsonl":
            yield from _jsonl(path)
        elif kind == "tsv":
            yield from _tsv(path)
        else:
            yield from _squad_passages(path)
        return
    if isinstance(source, dict) or not isinstance(source, Iterable):
        raise TypeError(f"passages must be a path or an iterable of dicts, got {type(source).__name__}")
    for i, rec in enumerate(source):
        where = f"passage #{i}"
        yield where, _check_passage(rec, where)


def read_passages(source) -> list[dict]:
    """All passages of `source` (see iter_passages) as a list of {"id", "title", "text"}."""
    return [rec for _, rec in iter_passages(source)]


def _squad_answers(qa: dict, where: str) -> list[str]:
    answers = qa.get("answers", [])
    if not isinstance(answers, list):
        raise ValueError(f"{where}: 'answers' must be a list of {{\"text\": ...}} objects, got {answers!r}")
    out = []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("text"), str):
            raise ValueError(f"{where}: answer {i} must be an object with a 'text' string, got {a!r}")
        out.append(a["text"])
    return out


def read_squad(path) -> tuple[list[dict], list[dict]]:
    """(passages, questions) of a SQuAD v1.1 (or v2.0) file.

    passages: {"id": "title#j", "title", "text"} for every paragraph in file order.
    questions: {"id", "question", "answers": [str], "gold_ids": ["title#j"], "article": article index}.
    SQuAD v2.0's unanswerable questions ("is_impossible": true, or no answers) are skipped, with one
    UserWarning giving their count (they have no answer to find and no gold passage). A question without a
    'question' string, or a malformed answer, is a ValueError naming the file, article, paragraph and question."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {str(path)!r}")
    passages = [rec for _, rec in _squad_passages(path)]
    questions, skipped = [], 0
    for ai, art in enumerate(_squad_data(path, _load_json(path))):
        for j, par in enumerate(art.get("paragraphs", [])):
            for qi, qa in enumerate(par.get("qas", [])):
                where = f"{path}: article {ai} paragraph {j} question {qi}"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    keys = sorted(qa) if isinstance(qa, dict) else type(qa).__name__
                    raise ValueError(f"{where}: expected an object with a 'question' string (got {keys})")
                answers = _squad_answers(qa, where)
                if qa.get("is_impossible") or not answers:
                    skipped += 1
                    continue
                questions.append({"id": qa.get("id", ""), "question": qa["question"], "answers": answers,
                                  "gold_ids": [f"{art.get('title', '')}#{j}"], "article": ai})
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unanswerable question(s) (SQuAD v2.0 'is_impossible' or no "
                      f"answers); {len(questions)} kept", stacklevel=2)
    return passages, questions


def _gold_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(g, (str, int)) and not isinstance(g, bool)
                                                for g in value):
        return [str(g) for g in value]
    raise ValueError(f"{where}: {key!r} must be a passage id or a list of them, got {value!r}")


def read_qa(path) -> list[dict]:
    """Questions with answers (and gold passage ids when known) from SQuAD JSON, a JSON list, or JSONL.

    Each record becomes {"question": str, "answers": [str], "gold_ids": [str] (possibly empty)}.
    SQuAD JSON: see read_squad (gold = the question's paragraph "title#j"; unanswerable questions skipped).
    JSON(L) records need "question" (a non-empty str) and "answers" (a non-empty list of non-empty str, or one
    str; "answer" is taken when "answers" is absent); the gold passage id(s), optional, come from the first of
    these keys present and not null: "gold_ids" (list or one id), "gold_id", "passage_id" (one id, as pyrag's
    demo corpus writes); else DPR's "positive_ctxs" (their "passage_id"s).
    A malformed record is a ValueError naming the file and line (JSONL) or item (JSON list)."""
    return [rec for _, rec in read_qa_located(path)]


def read_qa_located(path) -> list[tuple[str, dict]]:
    """read_qa's records as (where, record) pairs: `where` locates each one for later error messages ("file:line"
    for JSONL, "file: item i" for a JSON list, "file: question id X" for SQuAD)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file not found: {str(path)!r}")
    if path.name.lower().endswith(".jsonl"):
        recs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        recs.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: malformed JSON on line {lineno} ({e.msg})") from None
    else:
        try:
            doc = _load_json(path)
        except ValueError as e:
            if _first_line_is_object(path):  # one JSON object per line: JSONL under another name
                raise ValueError(f"{e}; it looks like JSONL (one JSON object per line): name it .jsonl") from None
            raise
        if isinstance(doc, dict) and "data" in doc:
            return [(f"{path}: question id {q['id']!r}" if q.get("id") else f"{path}: article {q['article']}", q)
                    for q in read_squad(path)[1]]
        if not isinstance(doc, list):
            raise ValueError(f"{path}: expected SQuAD JSON, a JSON list of questions, or JSONL")
        recs = [(f"{path}: item {i}", r) for i, r in enumerate(doc)]
    out = []
    for where, r in recs:
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not r["question"].strip():
            raise ValueError(f"{where}: expected an object with a non-empty 'question' string, got {r!r}"[:300])
        key = "answers" if "answers" in r or "answer" not in r else "answer"
        answers = r.get(key)
        answers = [answers] if isinstance(answers, str) else answers
        if (not isinstance(answers, (list, tuple)) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise ValueError(f"{where}: {key!r} must be a non-empty list of non-empty strings (or one string), got "
                             f"{r.get(key)!r}"[:300])
        gold: list[str] = []
        for k in ("gold_ids", "gold_id", "passage_id"):
            if r.get(k) is not None:
                gold = _gold_list(r[k], k, where)
                break
        if not gold and "positive_ctxs" in r:
            ctxs = r["positive_ctxs"]
            if not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs):
                raise ValueError(f"{where}: 'positive_ctxs' must be a list of objects, got {ctxs!r}")
            gold = [str(c["passage_id"]) for c in ctxs if "passage_id" in c]
        out.append((where, {"question": r["question"], "answers": list(answers), "gold_ids": gold}))
    return out


def _first_line_is_object(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            line = next((ln for ln in f if ln.strip()), "")
        return isinstance(json.loads(line), dict)
    except (ValueError, OSError):
        return False
