"""The on-disk container every pyrag index is saved in: a fixed header (magic, format version, kind, dim, dtype,
count, payload length, payload CRC-32, header CRC-32), a JSON block, then 64-byte-aligned array sections.

Layout (little-endian):

    offset 0    header, HEADER_SIZE bytes (struct _HEADER, zero padded)
    offset 128  payload = JSON meta (utf-8, meta_len bytes) + zero padding + sections, each starting at a
                multiple of 64 bytes from the start of the file so they can be memory-mapped in place.

The payload CRC covers every byte after the header, so a truncated file, a flipped bit or a foreign file is
refused before anything is used. Writes go to a temporary file in the target's directory, are fsync'ed, then
renamed over the target (os.replace), so a crash never leaves a half-written index under the real name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

MAGIC = b"PYRAGIDX"
FORMAT_VERSION = 1
HEADER_SIZE = 128
ALIGN = 64
_CHUNK = 1 << 24  # bytes per read/write/CRC step: bounded memory for the checksum pass over big files
# magic, version, kind, dtype, dim, count, meta_len, payload_len, payload_crc, then header_crc over all that.
_HEADER = struct.Struct("<8sI16s16sQQQQI")
_HEADER_CRC = struct.Struct("<I")

# How each stored tensor dtype is written; bfloat16 has no numpy dtype, so it travels as its raw 16-bit pattern.
_NP_DTYPE = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("<u2"),
    torch.int8: np.dtype("i1"),
    torch.int64: np.dtype("<i8"),
}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int64": torch.int64,
}
_NAME_OF = {v: k for k, v in _DTYPE_NAMES.items()}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes_view(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU tensor as a flat uint8 array (no copy when t is already contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def save_container(path, *, kind: str, dim: int, dtype: str, count: int, meta: dict,
                   sections: dict[str, torch.Tensor]) -> None:
    """Atomically write one index file.

    kind/dim/dtype/count go in the fixed header (what `load_index` dispatches on); meta is any JSON-able dict;
    sections maps a name to a CPU-movable tensor of a dtype in _NP_DTYPE (stored contiguous, little-endian)."""
    path = Path(path)
    for name, t in sections.items():
        if t.dtype not in _NP_DTYPE:
            raise TypeError(f"section {name!r} has unsupported dtype {t.dtype}")
    # Section offsets depend on the JSON length, which contains the offsets: lay out, then redo until the JSON stops
    # changing (offsets only grow with the JSON, in 64-byte steps, so this settles in two or three rounds).
    table: dict[str, dict] = {}
    meta_bytes = b""
    for _ in range(8):
        pos = _align(HEADER_SIZE + len(meta_bytes))
        new_table = {}
        for name, t in sections.items():
            nbytes = t.numel() * t.element_size()
            new_table[name] = {"offset": pos, "nbytes": nbytes, "dtype": _NAME_OF[t.dtype], "shape": list(t.shape)}
            pos = _align(pos + nbytes)
        new_meta = json.dumps({"meta": meta, "sections": new_table}, sort_keys=True).encode()
        if new_table == table and new_meta == meta_bytes:
            break
        table, meta_bytes = new_table, new_meta
    else:
        raise RuntimeError("index file layout did not converge")  # cannot happen: offsets move in 64-byte steps
    end = max([HEADER_SIZE + len(meta_bytes)] + [s["offset"] + s["nbytes"] for s in table.values()])
    payload_len = end - HEADER_SIZE

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            crc = 0
            written = HEADER_SIZE

            def put(buf) -> None:
                nonlocal crc, written
                mv = memoryview(buf).cast("B")
                for i in range(0, len(mv), _CHUNK):
                    piece = mv[i:i + _CHUNK]
                    f.write(piece)
                    crc = zlib.crc32(piece, crc)
                written += len(mv)

            put(meta_bytes)
            for name, t in sections.items():
                put(b"\0" * (table[name]["offset"] - written))
                put(_as_bytes_view(t))
            put(b"\0" * (end - written))
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, kind.encode(), dtype.encode(), dim, count,
                                  len(meta_bytes), payload_len, crc)
            header += _HEADER_CRC.pack(zlib.crc32(header))
            f.seek(0)
            f.write(header.ljust(HEADER_SIZE, b"\0"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the index the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    # Read, not set-and-restore (os.umask is process-wide and would race with other threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


class Container:
    """A parsed, validated index file: header fields, `meta` (dict) and `section(name)` tensors."""

    def __init__(self, path: Path, kind: str, dtype: str, dim: int, count: int, meta: dict, table: dict,
                 mmap: bool):
        self.path, self.kind, self.dtype, self.dim, self.count = path, kind, dtype, dim, count
        self.meta, self._table, self._mmap = meta, table, mmap

    def has(self, name: str) -> bool:
        return name in self._table

    def section(self, name: str) -> torch.Tensor:
        """The named array as a CPU tensor: mapped from the file (copy-on-write, the file is never modified)
        when loaded with mmap=True, else read into memory."""
        if name not in self._table:
            raise ValueError(f"{self.path}: index file has no section {name!r} (sections: {sorted(self._table)})")
        s = self._table[name]
        tdtype = _DTYPE_NAMES[s["dtype"]]
        npdtype = _NP_DTYPE[tdtype]
        shape = tuple(s["shape"])
        n = int(np.prod(shape)) if shape else 1
        if n == 0:
            return torch.empty(shape, dtype=tdtype)
        if self._mmap:
            arr = np.memmap(self.path, dtype=npdtype, mode="c", offset=s["offset"], shape=shape)
            t = torch.from_numpy(arr)
        else:
            with open(self.path, "rb") as f:
                f.seek(s["offset"])
                arr = np.fromfile(f, dtype=npdtype, count=n)
            if arr.size != n:
                raise ValueError(f"{self.path}: section {name!r} is truncated")
            t = torch.from_numpy(arr.reshape(shape))
        if tdtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t

    def raw_bytes(self, name: str) -> bytes:
        s = self._table[name]
        with open(self.path, "rb") as f:
            f.seek(s["offset"])
            return f.read(s["nbytes"])


def read_header(path) -> tuple[str, str, int, int, int, int, int]:
    """Validate the fixed header of `path` and return (kind, dtype, dim, count, meta_len, payload_len, crc).

    Raises ValueError naming the path for a missing/short file, wrong magic, header corruption, unsupported
    format version, or a file size that disagrees with the header (truncated or trailing bytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < _HEADER.size + _HEADER_CRC.size:
        raise ValueError(f"{path}: not a pyrag index file (only {size} bytes, shorter than the header)")
    magic = raw[:8]
    if magic != MAGIC:
        raise ValueError(f"{path}: not a pyrag index file (magic {magic!r}, expected {MAGIC!r})")
    fields = _HEADER.unpack_from(raw)
    (stored_crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if zlib.crc32(raw[:_HEADER.size]) != stored_crc:
        raise ValueError(f"{path}: index header is corrupted (header checksum mismatch)")
    _, version, kind, dtype, dim, count, meta_len, payload_len, crc = fields
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: index format version {version} is not supported by this pyrag "
                         f"(it reads version {FORMAT_VERSION})")
    expected = HEADER_SIZE + payload_len
    if size < expected:
        raise ValueError(f"{path}: index file is truncated ({size} bytes, header says {expected})")
    if size > expected:
        raise ValueError(f"{path}: index file has {size - expected} unexpected trailing bytes "
                         f"({size} bytes, header says {expected})")
    return (kind.rstrip(b"\0").decode(), dtype.rstrip(b"\0").decode(), dim, count, meta_len, payload_len, crc)


def peek_kind(path) -> str:
    """The index kind recorded in the header of `path` (validated as read_header does)."""
    return read_header(path)[0]


def load_container(path, *, kind: str | None = None, mmap: bool = True, verify: bool = True) -> Container:
    """Open an index file written by save_container.

    kind: the expected index kind (None accepts any). verify: recompute the payload CRC-32 — one sequential read
    of the whole file (roughly the disk/page-cache bandwidth, ~1 s per GB cold); pass False to skip it when the
    file is trusted and a fast memory-mapped open matters."""
    path = Path(path)
    file_kind, dtype, dim, count, meta_len, payload_len, crc = read_header(path)
    if kind is not None and file_kind != kind:
        raise ValueError(f"{path}: holds a {file_kind!r} index, not a {kind!r} index "
                         f"(use pyrag.index.load_index to open any kind)")
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        if verify:
            got = 0
            left = payload_len
            meta_raw = b""
            while left:
                piece = f.read(min(_CHUNK, left))
                if not piece:
                    break
                if len(meta_raw) < meta_len:
                    meta_raw += piece[:meta_len - len(meta_raw)]
                got = zlib.crc32(piece, got)
                left -= len(piece)
            if left or got != crc:
                raise ValueError(f"{path}: index file is corrupted (payload checksum {got:#010x} != "
                                 f"recorded {crc:#010x})")
        else:
            meta_raw = f.read(meta_len)
    try:
        doc = json.loads(meta_raw.decode())
        meta, table = doc["meta"], doc["sections"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: index metadata is corrupted ({e})") from e
    end = HEADER_SIZE + payload_len
    for name, s in table.items():
        try:
            ok = (s["dtype"] in _DTYPE_NAMES and s["offset"] % ALIGN == 0 and s["offset"] + s["nbytes"] <= end
                  and int(np.prod(s["shape"])) * _NP_DTYPE[_DTYPE_NAMES[s["dtype"]]].itemsize == s["nbytes"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: index section {name!r} is malformed ({s})")
    return Container(path, file_kind, dtype, dim, count, meta, table, mmap)
