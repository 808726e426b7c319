"""FlatIndex: exact search against numpy brute force for every storage dtype, labels, reconstruct, devices,
thread safety, bad inputs, and the on-disk format (save/load, mmap, atomic writes, refusal of damaged files)."""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrag
from pyrag.index import FlatIndex, _format, load_index

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """fp64 scores and ids of the top k (ties -> lower id): the ground truth."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


def assert_topk_correct(scores, ids, q, x, k, rtol=2e-5):
    """Returned scores equal the true top-k scores and each id's true score (fp rounding aside); ids distinct.
    Where neighbouring true scores are separated by more than the tolerance the ids must match exactly."""
    scores, ids = scores.cpu().numpy().astype(np.float64), ids.cpu().numpy()
    true_s, true_i = brute_force(q, x, k)
    tol = rtol * (np.abs(q).sum(1, keepdims=True) * np.abs(x).max() + 1e-30)
    assert scores.shape == ids.shape == (q.shape[0], k)
    worst = np.unravel_index(np.argmax(np.abs(scores - true_s) - tol), scores.shape)
    assert np.all(np.abs(scores - true_s) <= tol), f"score mismatch at {worst}: {scores[worst]} vs {true_s[worst]}"
    own = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, ids, axis=1)
    assert np.all(np.abs(own - scores) <= tol), "a returned score is not the inner product of its returned id"
    assert all(len(set(row)) == k for row in ids), "duplicate ids in a result row"
    gap = np.full(true_s.shape, np.inf)
    gap[:, 1:] = np.minimum(gap[:, 1:], true_s[:, :-1] - true_s[:, 1:])
    gap[:, :-1] = np.minimum(gap[:, :-1], true_s[:, :-1] - true_s[:, 1:])
    # The k-th id is also ambiguous if the (k+1)-th true score is within tolerance of it.
    full = q.astype(np.float64) @ x.astype(np.float64).T
    if k < x.shape[0]:
        nxt = -np.sort(-full, axis=1)[:, k]
        gap[:, -1] = np.minimum(gap[:, -1], true_s[:, -1] - nxt)
    clear = gap > 2 * tol
    assert np.array_equal(ids[clear], true_i[clear]), "ids differ where the true scores are well separated"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,n,d,k", [(1, 1, 7, 1), (3, 1001, 129, 10), (17, 1001, 7, 100), (300, 700, 64, 700)])
def test_flat_search_matches_brute_force_on_dequantised_vectors(dtype, nq, n, d, k):
    x = torch.randn(n, d) * torch.rand(n, 1) * 3  # norms vary by row
    q = torch.randn(nq, d)
    index = FlatIndex(d, dtype)
    index.add(x[: n // 2])
    index.add(x[n // 2:].numpy())  # ndarray input, second batch
    assert len(index) == n and index.dim == d
    stored = index.reconstruct(torch.arange(n)).numpy()  # what the index really holds (dequantised)
    if dtype == "float32":
        assert np.array_equal(stored, x.numpy())
    else:
        tol = {"float16": 1e-3, "bfloat16": 8e-3, "int8": 1.0 / 127}[dtype]
        assert np.all(np.abs(stored - x.numpy()) <= tol * np.abs(x.numpy()).max(axis=1, keepdims=True) + 1e-7)
        if dtype == "int8":  # exactly the dequantised rows: codes * per-row scale
            codes, scale = pyrag.index.flat.quantize_int8(x)
            want = codes.float() * scale[:, None]
        else:  # exactly the rows rounded to the storage dtype
            want = x.to(getattr(torch, dtype)).float()
        assert torch.equal(torch.from_numpy(stored), want)
    scores, ids = index.search(q, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert_topk_correct(scores, ids, q.numpy(), stored, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_exact_ids_and_scores_with_ties_on_integer_data(dtype):
    # Small integers are exact in every storage dtype and their dot products exact in fp32, so scores and ids
    # (including the tie rule: lower id first) must equal brute force bit for bit. For int8 every row holds a
    # +-127, so its scale is exactly 1.
    g = torch.Generator().manual_seed(1)
    lim = 127 if dtype == "int8" else 8
    x = torch.randint(-lim, lim + 1, (500, 24), generator=g).float()
    if dtype == "int8":
        x[:, 0] = 127
    x[250:] = x[:250]  # every vector twice: every score is tied
    q = torch.randint(-3, 4, (9, 24), generator=g).float()
    index = FlatIndex(24, dtype)
    index.add(x)
    scores, ids = index.search(q, 40)
    true_s, true_i = brute_force(q.numpy(), x.numpy(), 40)
    assert np.array_equal(ids.numpy(), true_i)
    assert np.array_equal(scores.numpy().astype(np.float64), true_s)


def test_flat_labels_map_results_and_reject_duplicates():
    x = torch.randn(50, 8)
    labels = torch.randperm(1000)[:50] * 7 - 3000  # distinct, unordered, some negative
    index = FlatIndex(8)
    index.add(x[:30], ids=labels[:30])
    index.add(x[30:], ids=labels[30:].numpy())
    _scores, ids = index.search(x[:5], 3)
    _ref_s, ref_rows = brute_force(x[:5].numpy(), x.numpy(), 3)
    assert np.array_equal(ids.numpy(), labels.numpy()[ref_rows])
    assert torch.equal(index.reconstruct(labels[[4, 40]]), x[[4, 40]])
    # default labels continue after the largest label so far
    extra = torch.randn(2, 8)
    index.add(extra)
    top = int(labels.max())
    assert torch.equal(index.reconstruct(torch.tensor([top + 1, top + 2])), extra)  # fp32: stored exactly
    assert torch.equal(index.reconstruct(labels), x)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(torch.randn(1, 8), ids=labels[:1])
    with pytest.raises(ValueError, match="duplicate label 5"):
        index.add(torch.randn(2, 8), ids=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="one label per embedding"):
        index.add(torch.randn(2, 8), ids=torch.tensor([10**6]))
    with pytest.raises(TypeError, match="integer labels"):
        index.add(torch.randn(1, 8), ids=torch.tensor([1.5]))
    assert len(index) == 52  # failed adds changed nothing


def test_flat_default_labels_are_consecutive_rows():
    index = FlatIndex(4)
    x = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)  # unit rows: each is its own best match
    index.add(x[:6])
    index.add(x[6:])
    _, ids = index.search(x, 1)
    assert torch.equal(ids[:, 0], torch.arange(10))
    assert torch.equal(index.reconstruct(torch.arange(10)), x)


def test_flat_reconstruct_any_shape_and_unknown_id():
    x = torch.randn(20, 5)
    index = FlatIndex(5, "int8")
    index.add(x)
    q, scale = pyrag.index.flat.quantize_int8(x)
    deq = q.float() * scale[:, None]
    assert not torch.equal(deq, x)  # int8 codes round: the dequantised rows are what the index can give back
    ids = torch.tensor([[3, 4, 5], [19, 0, 3]])
    got = index.reconstruct(ids)
    assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    assert torch.equal(got, deq[ids])
    one = index.reconstruct(7)
    assert one.shape == (5,) and torch.equal(one, deq[7])
    assert torch.equal(index.reconstruct(np.array([1, 2])), deq[[1, 2]])
    assert torch.equal(index.reconstruct([[2], [17]]), deq[torch.tensor([[2], [17]])])
    assert index.reconstruct(torch.empty(0, dtype=torch.int64)).shape == (0, 5)
    with pytest.raises(ValueError, match="id 20 is not in the index"):
        index.reconstruct(torch.tensor([1, 20]))
    with pytest.raises(ValueError, match="id -1 is not in the index"):
        index.reconstruct(-1)
    with pytest.raises(TypeError, match="integer labels"):
        index.reconstruct(torch.tensor([1.0]))
    # Python lists of floats / bools are not truncated or read as 0/1 (they returned rows 1, and 1 and 0)
    for bad in ([1.7], [True, False], np.array([True])):
        with pytest.raises(TypeError, match="integer"):
            index.reconstruct(bad)
    with pytest.raises(ValueError, match="out of the int64 range"):
        index.reconstruct(2 ** 70)
    assert torch.equal(index.reconstruct(np.uint64(3)), deq[3])


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_float64_beyond_the_float32_range_is_refused(dtype):
    # finite in float64, inf in the float32 every index computes in (int8 stored NaN rows for it)
    index = FlatIndex(4, dtype)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1e300, 0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"embeddings exceed the float32 range every index computes in \(first embeddings\[1, 0\]"):
        index.add(x)
    assert len(index) == 0
    index.add(x[:1])
    with pytest.raises(ValueError, match="queries exceed the float32 range"):
        index.search(torch.full((1, 4), 1e39, dtype=torch.float64), 1)


@pytest.mark.parametrize("dtype,sketch,mmap", [("float32", False, False), ("float16", True, False),
                                               ("int8", False, False), ("bfloat16", True, True)])
def test_flat_index_pickles_and_deep_copies(tmp_path, dtype, sketch, mmap):
    import copy
    import pickle

    g = torch.Generator().manual_seed(0)
    index = FlatIndex(6, dtype, sketch=sketch)
    index.add(torch.randn(50, 6, generator=g), ids=torch.arange(50) * 3 + 7)
    if mmap:
        index.save(tmp_path / "i.pyrag")
        index = FlatIndex.load(tmp_path / "i.pyrag", mmap=True)
    q = torch.randn(4, 6, generator=g)
    want = index.search(q, 9)
    blob = pickle.dumps(index)
    assert len(blob) < 50 * (6 * 4 + 8) + 4096  # the filled rows only, not the buffers' spare capacity
    for other in (pickle.loads(blob), copy.deepcopy(index)):
        assert repr(other) == repr(index)
        got = other.search(q, 9)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        other.add(torch.randn(2, 6, generator=g))  # independent, with a working lock
        assert len(other) == 52 and len(index) == 50


def test_save_header_count_matches_its_sections_under_a_concurrent_add(tmp_path, monkeypatch):
    # an add() between reading the arrays and writing the header made the file unloadable (count > rows)
    index = FlatIndex(4)
    index.add(torch.randn(10, 4))
    orig = FlatIndex._sections

    def sections_then_add(self):
        out = orig(self)
        self.add(torch.randn(5, 4))  # what another thread may do once the read lock is released
        return out

    monkeypatch.setattr(FlatIndex, "_sections", sections_then_add)
    index.save(tmp_path / "i.pyrag")
    assert len(FlatIndex.load(tmp_path / "i.pyrag")) == 10


def test_int8_quantisation_handles_zero_rows():
    x = torch.randn(6, 9)
    x[2] = 0
    index = FlatIndex(9, "int8")
    index.add(x)
    assert torch.equal(index.reconstruct(2), torch.zeros(9))
    s, _i = index.search(-x[:1], 6)
    assert torch.isfinite(s).all()
    q, scale = pyrag.index.flat.quantize_int8(x)
    assert scale[2] == 0 and (q[2] == 0).all()
    assert (q.abs().amax(dim=1)[[0, 1, 3, 4, 5]] == 127).all()


def test_flat_to_cpu_returns_self_and_keeps_results():
    x, q = torch.randn(100, 16), torch.randn(4, 16)
    index = FlatIndex(16, "float16")
    index.add(x)
    before = index.search(q, 5)
    assert index.to("cpu") is index and index.device.type == "cpu"
    after = index.search(q, 5)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_on_cuda_matches_cpu(dtype):
    x, q = torch.randn(3000, 96), torch.randn(7, 96)
    labels = torch.randperm(10**6)[:3000]
    index = FlatIndex(96, dtype)
    index.add(x, ids=labels)
    cpu_s, _cpu_i = index.search(q, 50)
    index.to("cuda")
    assert index.device.type == "cuda"
    s, i = index.search(q, 50)
    assert s.device.type == "cuda" and i.device.type == "cuda"
    stored = index.reconstruct(labels).cpu().numpy()
    rows = {int(v): r for r, v in enumerate(labels)}
    assert_topk_correct(s, torch.tensor([[rows[int(v)] for v in row] for row in i.cpu()]), q.numpy(), stored, 50,
                        rtol=1e-4)
    torch.testing.assert_close(s.cpu(), cpu_s, rtol=1e-4, atol=1e-4)
    index.add(torch.randn(5, 96))  # appends on the device
    assert len(index) == 3005 and index.reconstruct(labels[:2]).device.type == "cuda"


def test_flat_concurrent_searches_from_threads_are_correct():
    x = torch.randn(5000, 32)
    index = FlatIndex(32)
    index.add(x)
    batches = [torch.randn(1 + 5 * t, 32) for t in range(8)]
    expected = [index.search(b, 10) for b in batches]
    errors, results = [], {}

    def worker(t):
        try:
            for rep in range(5):
                results[t, rep] = index.search(batches[t], 10)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (t, _), (s, i) in results.items():
        assert torch.equal(s, expected[t][0]) and torch.equal(i, expected[t][1])


def test_flat_add_while_searching_keeps_results_valid():
    x = torch.randn(3000, 16) + 3.0  # all positive-ish: stored rows score far above zero for the queries below
    index = FlatIndex(16)
    index.add(x)
    q = x[:20]
    expected = index.search(q, 5)
    stop, errors = threading.Event(), []

    def searcher():
        try:
            while not stop.is_set():
                s, i = index.search(q, 5)
                assert torch.equal(s, expected[0]) and torch.equal(i, expected[1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for th in threads:
        th.start()
    for _ in range(30):
        index.add(torch.zeros(500, 16))  # scores 0: never in the top 5, but forces reallocations
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(index) == 3000 + 30 * 500


def test_flat_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dtype must be one of"):
        FlatIndex(8, "float64")
    with pytest.raises(ValueError, match="dtype must be one of"):
        FlatIndex(8, "int4")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        FlatIndex(0)
    index = FlatIndex(8)
    with pytest.raises(ValueError, match="empty index"):
        index.search(torch.randn(1, 8), 1)
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        index.add(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        index.add(torch.randn(8))
    bad = torch.randn(4, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values \\(first in row 2\\)"):
        index.add(bad)
    with pytest.raises(TypeError, match="float32/float64/float16/bfloat16"):
        index.add(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        index.add([[0.0] * 8])
    index.add(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"k must be in \[1, len\(index\)\] = \[1, 10\], got k=11"):
        index.search(torch.randn(2, 8), 11)
    with pytest.raises(ValueError, match="k=0"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(torch.randn(2, 8), 2.0)
    with pytest.raises(ValueError, match="queries contains NaN"):
        index.search(bad, 2)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, 8\]"):
        index.search(torch.randn(2, 7), 2)
    with pytest.raises(ValueError, match="float16 range"):
        FlatIndex(8, "float16").add(torch.full((1, 8), 1e5))
    s, i = index.search(torch.randn(0, 8), 3)
    assert s.shape == i.shape == (0, 3)
    s, i = index.search(np.random.randn(2, 8), 3)  # float64 numpy queries are accepted
    assert s.shape == (2, 3)
    assert len(index) == 10


# ---- on-disk format ----

def _saved(tmp_path, dtype="float32", n=300, d=12, labels=None) -> tuple[FlatIndex, Path]:
    index = FlatIndex(d, dtype)
    index.add(torch.randn(n, d), ids=labels)
    path = tmp_path / f"flat-{dtype}.idx"
    index.save(path)
    return index, path


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mmap", [True, False])
def test_flat_save_load_gives_identical_results(tmp_path, dtype, mmap):
    labels = torch.randperm(5000)[:300]
    index, path = _saved(tmp_path, dtype, labels=labels)
    q = torch.randn(6, 12)
    loaded = FlatIndex.load(path, mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype) == (300, 12, dtype)
    for a, b in zip(index.search(q, 20), loaded.search(q, 20)):
        assert torch.equal(a, b)
    assert torch.equal(index.reconstruct(labels[:7]), loaded.reconstruct(labels[:7]))
    assert isinstance(load_index(path, mmap=mmap), FlatIndex)
    if mmap:
        assert _mapped(path)  # the vectors are mapped from the file rather than read
    # appending to a loaded (possibly mapped) index never writes into the file
    before = path.read_bytes()
    loaded.add(torch.randn(3, 12))
    assert len(loaded) == 303 and path.read_bytes() == before
    # saving over the file it is mapped from is safe: the new file replaces the old one atomically
    loaded.save(path)
    again = FlatIndex.load(path, mmap=mmap)
    for a, b in zip(loaded.search(q, 20), again.search(q, 20)):
        assert torch.equal(a, b)
    assert len(again) == 303


def test_flat_mmap_load_does_not_map_when_disabled(tmp_path):
    _, path = _saved(tmp_path, n=50)
    loaded = FlatIndex.load(path, mmap=False)
    assert not _mapped(path)
    assert len(loaded) == 50


def test_empty_index_round_trips(tmp_path):
    path = tmp_path / "empty.idx"
    FlatIndex(5, "int8").save(path)
    loaded = FlatIndex.load(path)
    assert len(loaded) == 0 and loaded.dtype == "int8"
    loaded.add(torch.randn(2, 5))
    assert loaded.search(torch.randn(1, 5), 2)[1].shape == (1, 2)


def test_truncated_file_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"{path.name}.*truncated"):
        FlatIndex.load(path)
    path.write_bytes(data[:60])
    with pytest.raises(ValueError, match=rf"{path.name}.*shorter than the header"):
        FlatIndex.load(path)
    path.write_bytes(data + b"x")
    with pytest.raises(ValueError, match="trailing bytes"):
        FlatIndex.load(path)


@pytest.mark.parametrize("where", ["vectors", "meta", "header"])
def test_bit_flip_is_refused(tmp_path, where):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    pos = {"vectors": len(data) - 50, "meta": _format.HEADER_SIZE + 5, "header": 30}[where]
    data[pos] ^= 0x04
    path.write_bytes(bytes(data))
    msg = "header is corrupted" if where == "header" else "corrupted \\(payload checksum"
    with pytest.raises(ValueError, match=rf"{path.name}.*{msg}"):
        load_index(path)


def test_skipping_verification_loads_without_the_checksum_pass(tmp_path):
    _index, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x04  # inside the vectors
    path.write_bytes(bytes(data))
    loaded = FlatIndex.load(path, verify=False)  # documented: no checksum pass, so the flip goes unnoticed
    assert len(loaded) == 300
    with pytest.raises(ValueError, match="checksum"):
        FlatIndex.load(path, verify=True)


def test_foreign_version_and_kind_mismatch_are_refused(tmp_path):
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"foreign.bin: not a pyrag index file \(magic"):
        load_index(foreign)
    with pytest.raises(FileNotFoundError, match="no such index file"):
        load_index(tmp_path / "missing.idx")

    _, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    fields = list(_format._HEADER.unpack_from(raw))
    fields[1] = 99  # format version
    header = _format._HEADER.pack(*fields)
    header += struct.pack("<I", zlib.crc32(header))
    raw[: len(header)] = header
    newer = tmp_path / "newer.idx"
    newer.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"newer.idx: index format version 99 is not supported"):
        load_index(newer)

    kind = bytearray(path.read_bytes())
    fields = list(_format._HEADER.unpack_from(kind))
    fields[2] = b"hnsw"  # a well-formed header of another kind
    header = _format._HEADER.pack(*fields)
    kind[: len(header) + 4] = header + struct.pack("<I", zlib.crc32(header))
    other = tmp_path / "other.idx"
    other.write_bytes(bytes(kind))
    with pytest.raises(ValueError, match=r"other.idx: holds a 'hnsw' index, not a 'flat' index"):
        FlatIndex.load(other)


def _with_header(path: Path, out: Path, **changes) -> Path:
    """A copy of the index file at `path` whose fixed header has `changes` (field: value) and a valid header
    checksum, so that only the disagreement itself can make it fail to load."""
    raw = bytearray(path.read_bytes())
    names = ["magic", "version", "kind", "dtype", "dim", "count", "meta_len", "payload_len", "payload_crc"]
    fields = dict(zip(names, _format._HEADER.unpack_from(raw)))
    fields.update(changes)
    header = _format._HEADER.pack(*(fields[n] for n in names))
    raw[: len(header) + 4] = header + struct.pack("<I", zlib.crc32(header))
    out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize(
    "changes,shown",
    [
        ({"count": 299}, "count=299, dim=12, dtype=float32"),
        ({"count": 301}, "count=301, dim=12, dtype=float32"),
        ({"dim": 6}, "count=300, dim=6, dtype=float32"),
        ({"dim": 13}, "count=300, dim=13, dtype=float32"),
        ({"dtype": b"float16"}, "count=300, dim=12, dtype=float16"),
        ({"dtype": b"int8"}, "count=300, dim=12, dtype=int8"),
    ],
    ids=["fewer", "more", "narrower", "wider", "float16", "int8"],
)
def test_header_disagreeing_with_the_vectors_is_refused(tmp_path, changes, shown):
    index, path = _saved(tmp_path)
    same = _with_header(path, tmp_path / "same.idx")  # the rewrite itself keeps the file valid
    assert torch.equal(FlatIndex.load(same).reconstruct(torch.arange(300)), index.reconstruct(torch.arange(300)))
    bad = _with_header(path, tmp_path / "bad.idx", **changes)
    want = rf"bad.idx: vectors section \(300, 12\) torch.float32 does not match the header \({shown}\)"
    for mmap in (True, False):
        with pytest.raises(ValueError, match=want):
            FlatIndex.load(bad, mmap=mmap)
    with pytest.raises(ValueError, match=want):
        load_index(bad)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    index, path = _saved(tmp_path)
    before = path.read_bytes()
    index.add(torch.randn(10, 12))

    def boom(t):
        raise OSError("disk full")

    monkeypatch.setattr(_format, "_as_bytes_view", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    index.save(path)
    assert len(FlatIndex.load(path)) == 310


def test_load_index_on_a_directory_points_to_sharded_load(tmp_path):
    from pyrag.index import load_index

    with pytest.raises(ValueError, match=r"is a directory, not an index file.*ShardedIndex\.load"):
        load_index(tmp_path)


@pytest.mark.parametrize("dtype,sketch", [("float32", False), ("int8", False), ("float16", True)])
def test_rollback_undoes_every_add_since_the_snapshot(dtype, sketch):
    # ShardedIndex undoes a rank's successful add when another rank's failed: the index must be as it was, labels
    # (which switch from implicit rows to an explicit map) and sketch included, and keep working afterwards.
    g = torch.Generator().manual_seed(0)
    index = FlatIndex(6, dtype, sketch=sketch)
    index.add(torch.randn(30, 6, generator=g))
    q = torch.randn(3, 6, generator=g)
    want = index.search(q, 5)
    snap = index._snapshot()
    index.add(torch.randn(2000, 6, generator=g) * 3, ids=torch.arange(2000) + 100)  # reallocates every buffer
    index._rollback(snap)
    assert len(index) == 30 and index._labels.identity
    got = index.search(q, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="not in the index"):
        index.reconstruct(100)
    index.add(torch.randn(4, 6, generator=g), ids=[100, 101, 102, 103])  # the undone labels are free again
    assert len(index) == 34 and index.reconstruct(103).shape == (6,)
