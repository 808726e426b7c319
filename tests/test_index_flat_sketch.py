"""FlatIndex(sketch=True): same results as without the sketch, built incrementally, saved and loaded (mapped), and
refused where it makes no sense."""

from __future__ import annotations

import pytest
import torch

import pyrag
from pyrag.index import FlatIndex, ShardedIndex, _format, load_index

FLOATS = ["float32", "float16", "bfloat16"]


def _pair(dtype, batches, d=24, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    plain, sk = FlatIndex(d, dtype), FlatIndex(d, dtype, sketch=True)
    start = 0
    for n in batches:
        x = torch.randn(n, d, generator=g)
        ids = torch.arange(start, start + n) * 3 + 7 if labels else None
        plain.add(x, ids=ids)
        sk.add(x, ids=ids)
        start += n
    return plain, sk


@pytest.mark.parametrize("dtype", FLOATS)
def test_sketch_index_gives_identical_results_across_appends(dtype):
    plain, sk = _pair(dtype, [1, 700, 3000, 13], labels=True)
    assert sk.sketch and not plain.sketch and "sketch=True" in repr(sk)
    g = torch.Generator().manual_seed(1)
    for nq in (1, 5, 12, 13, 40):
        q = torch.randn(nq, 24, generator=g)
        for k in (1, 10, 3714):
            for a, b in zip(plain.search(q, k), sk.search(q, k)):
                assert torch.equal(a, b), (nq, k)
    ids = torch.tensor([7, 10, 7 + 3 * 3713])
    assert torch.equal(plain.reconstruct(ids), sk.reconstruct(ids))


@pytest.mark.parametrize("mmap", [True, False])
def test_sketch_round_trips_through_save_and_load(tmp_path, mmap):
    plain, sk = _pair("float32", [2000])
    path = tmp_path / "sk.idx"
    sk.save(path)
    loaded = FlatIndex.load(path, mmap=mmap)
    assert loaded.sketch and len(loaded) == 2000
    assert isinstance(load_index(path), FlatIndex) and load_index(path).sketch
    q = torch.randn(3, 24)
    for a, b in zip(plain.search(q, 50), loaded.search(q, 50)):
        assert torch.equal(a, b)
    loaded.add(torch.randn(5, 24))  # appending after a (mapped) load extends the sketch too
    plain.add(loaded.reconstruct(torch.arange(2000, 2005)))
    for a, b in zip(plain.search(q, 50), loaded.search(q, 50)):
        assert torch.equal(a, b)


def test_files_without_sketch_meta_still_load(tmp_path):
    # Indexes saved before sketches existed carry no "sketch" key in their meta.
    x = torch.randn(40, 8)
    path = tmp_path / "old.idx"
    _format.save_container(path, kind="flat", dim=8, dtype="float32", count=40, meta={"extra": {}},
                           sections={"vectors": x})
    loaded = FlatIndex.load(path)
    assert not loaded.sketch and torch.equal(loaded.reconstruct(torch.arange(40)), x)


def test_inconsistent_sketch_sections_are_refused(tmp_path):
    x = torch.randn(40, 8)
    path = tmp_path / "bad.idx"
    sections = {"vectors": x, "sketch_codes": torch.zeros(39, 8, dtype=torch.int8)}
    sections.update({f"sketch_{n}": torch.zeros(40) for n in ("scale", "norm", "res")})
    _format.save_container(path, kind="flat", dim=8, dtype="float32", count=40,
                           meta={"extra": {}, "sketch": True}, sections=sections)
    with pytest.raises(ValueError, match=r"sketch_codes section is torch.int8 \(39, 8\), expected torch.int8 \(40, 8\)"):
        FlatIndex.load(path)
    _format.save_container(path, kind="flat", dim=8, dtype="int8", count=40,
                           meta={"extra": {}, "sketch": True}, sections={"vectors": x.to(torch.int8)})
    with pytest.raises(ValueError, match="invalid sketch=True .* dtype=int8"):
        FlatIndex.load(path)


def test_sketch_sections_of_the_wrong_dtype_are_refused_at_load(tmp_path):
    x = torch.randn(40, 8)
    path = tmp_path / "badtype.idx"
    sections = {"vectors": x, "sketch_codes": torch.zeros(40, 8)}
    sections.update({f"sketch_{n}": torch.zeros(40) for n in ("scale", "norm", "res")})
    _format.save_container(path, kind="flat", dim=8, dtype="float32", count=40,
                           meta={"extra": {}, "sketch": True}, sections=sections)
    with pytest.raises(ValueError, match=r"badtype.idx: sketch_codes section is torch.float32 \(40, 8\), expected "
                                         r"torch.int8"):
        FlatIndex.load(path)


@pytest.mark.parametrize("sketch", [False, True])
def test_embeddings_that_overflow_the_storage_dtype_are_refused(sketch):
    index = FlatIndex(4, "bfloat16", sketch=sketch)
    x = torch.ones(3, 4)
    x[1, 2] = 3.4e38  # finite in fp32, inf in bfloat16 (its largest finite value is 3.3895e38)
    with pytest.raises(ValueError, match="embeddings exceed the bfloat16 range"):
        index.add(x)
    assert len(index) == 0
    with pytest.raises(ValueError, match="embeddings exceed the float32 range"):
        FlatIndex(4, sketch=sketch).add(torch.full((2, 4), 1e39, dtype=torch.float64))


def test_bad_sketch_arguments():
    with pytest.raises(ValueError, match="sketch=True is for float storage"):
        FlatIndex(8, "int8", sketch=True)
    with pytest.raises(TypeError, match="sketch must be True or False, got 'int8'"):
        FlatIndex(8, sketch="int8")


def test_build_sketch_on_an_existing_index(tmp_path):
    plain, _ = _pair("bfloat16", [500, 77])
    path = tmp_path / "plain.idx"
    plain.save(path)
    late = FlatIndex.load(path)
    assert not late.sketch
    assert late.build_sketch() is late and late.sketch
    late.build_sketch()  # idempotent
    q = torch.randn(4, 24)
    for a, b in zip(plain.search(q, 30), late.search(q, 30)):
        assert torch.equal(a, b)
    late.save(tmp_path / "late.idx")
    assert FlatIndex.load(tmp_path / "late.idx").sketch
    with pytest.raises(ValueError, match="build_sketch\\(\\) is for float storage"):
        FlatIndex(8, "int8").build_sketch()


def test_sharded_sketch_flag_is_refused_with_a_given_local_index():
    # sketch=True configures the default local FlatIndex; silently ignoring it next to local=... would surprise.
    with pytest.raises(ValueError, match="sketch=True configures the default local FlatIndex"):
        ShardedIndex(8, sketch=True, local=FlatIndex(8))


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
def test_sketched_index_moves_its_sketch_to_cuda_with_the_same_results():
    plain, sk = _pair("float16", [3000])
    q = torch.randn(5, 24)
    plain.to("cuda")
    sk.to("cuda")
    assert all(b.buf.device.type == "cuda" for b in sk._sketch)  # the CUDA kernel reads it (up to 8 queries)
    for a, b in zip(plain.search(q, 40), sk.search(q, 40)):
        assert a.device.type == "cuda" and torch.equal(a, b)
    sk.to("cpu")
    assert all(b.buf.device.type == "cpu" for b in sk._sketch)
    sk.to("cuda").build_sketch()  # idempotent
    sk.add(torch.randn(3, 24))   # appends reach the sketch on the GPU
    assert sk._sketch[0].n == len(sk) == 3003 and sk._sketch[0].buf.device.type == "cuda"
