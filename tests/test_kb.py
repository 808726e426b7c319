"""Knowledge bases: build -> open -> search (dense, BM25, hybrid), input formats, resumable sharded builds,
no-op rebuilds, and clear errors for bad input, corrupted files and encoder mismatches."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from retriever_helpers import BASE_WORDS, tiny_encoder

import pyrag
import pyrag.kb as kbmod
from pyrag.kb import KnowledgeBase, build_kb
from pyrag.metrics import has_answer
from pyrag.models.encoders import BiEncoder, Encoder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zorvex", "quillan", "marbeth", "tovanni", "elkhorn", "brisa", "caldor", "umbrin", "vesska", "dolmar"]
WORDS = BASE_WORDS + NAMES


def _passages(n=37):
    attrs = ["river", "mountain", "lake", "island", "city"]
    colors = ["red", "green", "blue"]
    return [{"id": f"p{i}", "title": f"{NAMES[i % 10]} {attrs[i % 5]}",
             "text": f"the {colors[i % 3]} {attrs[(i // 5) % 5]} of {NAMES[(i * 3) % 10]} is "
                     f"{'old ' * (i % 4)}and {NAMES[(i * 7) % 10]} lived there"} for i in range(n)]


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc") / "m"
    tiny_encoder(d, WORDS)
    return d


@pytest.fixture
def enc(enc_dir):
    return Encoder.from_pretrained(enc_dir, pooling="mean", max_length=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory, enc_dir):
    out = tmp_path_factory.mktemp("kb") / "kb"
    build_kb(_passages(), out, encoder=Encoder.from_pretrained(enc_dir, pooling="mean", max_length=64),
             shard_size=8, batch_size=5, show_progress=False)
    return out


def _table(path):
    con = sqlite3.connect(path / "passages.sqlite")
    try:
        return con.execute("SELECT row, id, title, text FROM passages ORDER BY row").fetchall()
    finally:
        con.close()


def test_build_open_search_matches_brute_force(built, enc):
    ps = _passages()
    kb = KnowledgeBase.open(built)
    assert len(kb) == len(ps) and kb.dim == enc.dim
    want_p = enc.encode_passages([p["title"] for p in ps], [p["text"] for p in ps], show_progress=False)
    torch.testing.assert_close(kb.vectors(torch.arange(len(ps))), want_p, rtol=1e-5, atol=1e-5)
    qs = ["where did zorvex live", "the blue lake of brisa", "old caldor river"]
    res = kb.search(qs, 5)
    q = enc.encode(qs, show_progress=False)
    ref_scores, ref_rows = torch.topk(q @ want_p.T, 5)
    assert torch.equal(res.rows, ref_rows)
    torch.testing.assert_close(res.scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert res.vectors.shape == (3, 5, enc.dim)
    torch.testing.assert_close(res.vectors, want_p[res.rows], rtol=1e-5, atol=1e-5)
    assert res.ids == [[ps[r]["id"] for r in row] for row in res.rows.tolist()]
    assert res.texts == [[ps[r]["text"] for r in row] for row in res.rows.tolist()]
    assert res.titles == [[ps[r]["title"] for r in row] for row in res.rows.tolist()]
    # Vectors in, same answer; passages() / ids() / row_of agree.
    assert torch.equal(kb.search(q, 5).rows, res.rows)
    titles, texts = kb.passages(torch.tensor([[3, 4], [5, 6]]))
    assert texts == [[ps[3]["text"], ps[4]["text"]], [ps[5]["text"], ps[6]["text"]]] and titles[1][0] == ps[5]["title"]
    assert kb.row_of("p17") == 17
    for bad in ([1.5], [True]):  # not truncated / read as 0-1
        for fetch in (kb.passages, kb.ids, kb.vectors):
            with pytest.raises(TypeError, match="integer"):
                fetch(bad)
    with pytest.raises(KeyError, match="nope"):
        kb.row_of("nope")
    with pytest.raises(ValueError, match="k must be"):
        kb.search(qs, len(ps) + 1)
    with pytest.raises(ValueError, match=r"\[Q, 32\]"):
        kb.search(torch.zeros(2, 7), 3)


def test_bm25_mode_ranks_by_bm25s_scores(built):
    import bm25s

    ps = _passages()
    kb = KnowledgeBase.open(built)
    qs = ["zorvex river", "green island of umbrin"]
    res = kb.search(qs, 4, mode="bm25")
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize([f"{p['title']} {p['text']}" for p in ps], stopwords="en", show_progress=False),
              show_progress=False)
    for i, q in enumerate(qs):
        s = torch.from_numpy(ref.get_scores(bm25s.tokenize([q], stopwords="en", return_ids=False,
                                                            show_progress=False)[0]))
        torch.testing.assert_close(res.scores[i], s[res.rows[i]])
        assert float(res.scores[i, -1]) >= float(s.sort(descending=True).values[3]) - 1e-6
    assert (built / "bm25").is_dir()  # cached for the next open
    assert torch.equal(KnowledgeBase.open(built).search(qs, 4, mode="bm25").rows, res.rows)
    with pytest.raises(ValueError, match="needs the question texts"):
        kb.search(torch.zeros(1, kb.dim), 3, mode="bm25")


def test_bm25_save_replaces_atomically_and_checks_its_arguments(tmp_path, monkeypatch):
    import os
    import threading

    from pyrag import kb_io
    from pyrag.bm25 import BM25

    b = BM25.build(["paris is in france", "berlin is in germany", "rome is in italy"])
    b.save(tmp_path / "bm25")
    want = b.search(["paris"], 2)
    # Readers during repeated re-saves find a whole index or none (the instant between replace_dir's two
    # renames), never a half-written one: every load that does not raise FileNotFoundError must be right. How many
    # loads land in that instant is the machine's timing (a CI run lost 30 of 40; under load the writer and the
    # reader can fall into step and lose all 40), so no count is asserted; the order of the states is pinned
    # deterministically below.
    errors, stop = [], threading.Event()

    def resave():
        while not stop.is_set():
            b.save(tmp_path / "bm25")

    t = threading.Thread(target=resave)
    t.start()
    try:
        for _ in range(40):
            try:
                got = BM25.load(tmp_path / "bm25").search(["paris"], 2)
                assert torch.equal(got[1], want[1])
            except FileNotFoundError as e:  # the instant between replace_dir's two renames
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert torch.equal(BM25.load(tmp_path / "bm25").search(["paris"], 2)[1], want[1])  # the last save is whole
    # Probing the path at each rename of a re-save with a different index: absent once (old one moved aside), then
    # the new index whole. The old rmtree-then-rename, or writing into the path, would show other states.
    b2 = BM25.build(["rome is in italy", "paris paris is in texas", "paris is in france", "oslo is in norway"])
    real_replace, states = os.replace, []

    def probing_replace(src, dst):
        real_replace(src, dst)
        if (tmp_path / "bm25").exists():
            states.append(BM25.load(tmp_path / "bm25").search(["paris"], 2)[1].tolist())
        else:
            states.append("absent")

    monkeypatch.setattr(kb_io.os, "replace", probing_replace)
    b2.save(tmp_path / "bm25")
    monkeypatch.undo()
    assert states == ["absent", b2.search(["paris"], 2)[1].tolist()] and states[1] != want[1].tolist()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="no n_docs.txt"):
        b.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"
    for k in (2.7, "2", True):
        with pytest.raises(TypeError, match="k must be an int"):
            b.search(["paris"], k)
    with pytest.raises(ValueError, match="hold no indexable word"):
        BM25.build(["the of and", "!?"])


def test_hybrid_is_dense_plus_weighted_bm25_over_the_union(built):
    kb = KnowledgeBase.open(built)
    qs = ["where did zorvex live", "the blue lake of brisa"]
    lam = 0.5
    res = kb.search(qs, 6, mode="hybrid", hybrid_weight=lam, candidates=8)
    q = kb.encode_questions(qs)
    bm = list(kb.bm25.iter_scores(qs))
    dense_rows = kb.search(q, 8).rows
    bm_rows = kb.search(qs, 8, mode="bm25").rows
    for i in range(len(qs)):
        union = sorted(set(dense_rows[i].tolist()) | set(bm_rows[i].tolist()))
        fused = {r: float(kb.vectors(torch.tensor([r]))[0] @ q[i]) + lam * float(bm[i][r]) for r in union}
        want = sorted(union, key=lambda r: (-fused[r], r))[:6]
        assert res.rows[i].tolist() == want
        torch.testing.assert_close(res.scores[i], torch.tensor([fused[r] for r in want]), rtol=1e-5, atol=1e-5)
    # lambda = 0 is the dense ranking; a huge lambda is the BM25 ranking.
    assert torch.equal(kb.search(qs, 6, mode="hybrid", hybrid_weight=0.0).rows, kb.search(qs, 6).rows)
    top = kb.search(qs, 3, mode="hybrid", hybrid_weight=1e6).rows[:, 0].tolist()
    assert [float(bm[i][r]) for i, r in enumerate(top)] == [float(b.max()) for b in bm]  # dense only breaks ties


def _count_encoded(monkeypatch) -> list[int]:
    """Patches Encoder.encode_passages to record how many passages each call encodes; returns that record."""
    encoded = []
    real_encode = Encoder.encode_passages

    def counting(self, titles, texts, *a, **k):
        encoded.append(len(texts))
        return real_encode(self, titles, texts, *a, **k)

    monkeypatch.setattr(Encoder, "encode_passages", counting)
    return encoded


def _interrupted_build(monkeypatch, *args, **kw) -> None:
    """build_kb(*args, **kw) interrupted (KeyboardInterrupt) after its second encoded shard is saved."""
    real_save, saved = kbmod._save_shard, []

    def crash_after_two(path, vectors):
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_save(path, vectors)
        saved.append(path.name)

    monkeypatch.setattr(kbmod, "_save_shard", crash_after_two)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_kb(*args, **kw)
    finally:
        monkeypatch.setattr(kbmod, "_save_shard", real_save)


def test_interrupted_build_resumes_to_the_same_kb(tmp_path, enc, monkeypatch):
    ps = _passages()
    build_kb(ps, tmp_path / "whole", encoder=enc, shard_size=8, show_progress=False)

    _interrupted_build(monkeypatch, ps, tmp_path / "resumed", encoder=enc, shard_size=8, show_progress=False)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        KnowledgeBase.open(tmp_path / "resumed")

    encoded = _count_encoded(monkeypatch)
    kb = build_kb(ps, tmp_path / "resumed", encoder=enc, shard_size=8, show_progress=False)
    assert sum(encoded) == len(ps) - 16  # the two finished shards were not encoded again
    whole = KnowledgeBase.open(tmp_path / "whole")
    assert torch.equal(kb.vectors(torch.arange(len(ps))), whole.vectors(torch.arange(len(ps))))
    assert _table(tmp_path / "resumed") == _table(tmp_path / "whole")
    assert kb.meta["files"] == whole.meta["files"]  # byte-identical index and passages files
    assert not (tmp_path / "resumed" / "build").exists()

    # A different input for the unfinished-build directory is refused instead of mixing shards.
    _interrupted_build(monkeypatch, ps, tmp_path / "other", encoder=enc, shard_size=8, show_progress=False)
    with pytest.raises(ValueError, match="unfinished build that differs in passages"):
        build_kb(ps[:-1], tmp_path / "other", encoder=enc, shard_size=8, show_progress=False)


def test_rebuilding_a_finished_kb_is_a_no_op(built, enc, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir() if p.is_file()}

    def no_encoding(*a, **k):
        raise AssertionError("a finished KB must not be re-encoded")

    monkeypatch.setattr(Encoder, "encode", no_encoding)
    kb = build_kb(_passages(), built, encoder=enc, shard_size=8, show_progress=False)
    assert len(kb) == len(_passages())
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir() if p.is_file()} == before
    changed = _passages()
    changed[3]["text"] += " extra"
    with pytest.raises(ValueError, match="differs in passages"):
        build_kb(changed, built, encoder=enc, show_progress=False)


def test_progress_bar_shows_rate_and_eta(tmp_path, enc, capsys):
    build_kb(_passages(), tmp_path / "kb", encoder=enc, shard_size=8, show_progress=True)
    err = capsys.readouterr().err
    assert "encoding passages" in err and "37/37" in err and "passage/s" in err and "<" in err  # "elapsed<eta"


def test_input_files_jsonl_tsv_squad(tmp_path, enc):
    ps = _passages(12)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ps))
    tsv = "id\ttext\ttitle\n" + "".join(f'{p["id"]}\t"{p["text"]}, ""quoted"""\t{p["title"]}\n' for p in ps)
    (tmp_path / "p.tsv").write_text(tsv)
    squad = {"data": [{"title": "Zorvex_River", "paragraphs": [{"context": ps[0]["text"], "qas": []},
                                                                {"context": ps[1]["text"], "qas": []}]},
                      {"title": "Brisa", "paragraphs": [{"context": ps[2]["text"], "qas": []}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    kb = build_kb(tmp_path / "p.jsonl", tmp_path / "kb1", encoder=enc, show_progress=False)
    assert kb.ids(torch.arange(12)) == [p["id"] for p in ps]
    kb = build_kb(tmp_path / "p.tsv", tmp_path / "kb2", encoder=enc, show_progress=False)
    assert kb.passages(torch.tensor([5]))[1] == [ps[5]["text"] + ', "quoted"']
    assert kb.passages(torch.tensor([5]))[0] == [ps[5]["title"]]
    kb = build_kb(tmp_path / "s.json", tmp_path / "kb3", encoder=enc, show_progress=False)
    assert kb.ids(torch.arange(3)) == ["Zorvex_River#0", "Zorvex_River#1", "Brisa#0"]
    assert kb.passages(torch.tensor([1])) == (["Zorvex River"], [ps[1]["text"]])


def test_bad_inputs_give_clear_errors(tmp_path, enc):
    good = json.dumps(_passages(1)[0])
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{{\"id\": \"x\", \"text\": oops}}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON on line 3"):
        build_kb(tmp_path / "bad.jsonl", tmp_path / "kb", encoder=enc, show_progress=False)
    assert not (tmp_path / "kb").exists()  # nothing encoded: no empty out_dir left behind
    dup = _passages(5) + [{"id": "p2", "title": "", "text": "again"}]
    with pytest.raises(ValueError, match=r"duplicate passage id 'p2': at passage #2 and again at passage #5"):
        build_kb(dup, tmp_path / "kb", encoder=enc, show_progress=False)
    with pytest.raises(ValueError, match=r"passage #1: passage 'e' has empty text"):
        build_kb([_passages(1)[0], {"id": "e", "title": "t", "text": "  "}], tmp_path / "kb", encoder=enc,
                 show_progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_kb(tmp_path / "missing.jsonl", tmp_path / "kb", encoder=enc, show_progress=False)
    (tmp_path / "h.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="expected DPR's TSV header"):
        build_kb(tmp_path / "h.tsv", tmp_path / "kb", encoder=enc, show_progress=False)
    with pytest.raises(ValueError, match="no passages"):
        build_kb([], tmp_path / "kb", encoder=enc, show_progress=False)
    with pytest.raises(ValueError, match="index must be"):
        build_kb(_passages(3), tmp_path / "kb", encoder=enc, index="ivf")
    with pytest.raises(FileNotFoundError, match="not a knowledge base"):
        KnowledgeBase.open(tmp_path)


def test_encoder_mismatch_is_refused(built, enc_dir, tmp_path):
    other = tiny_encoder(tmp_path / "other", WORDS, seed=5)
    with pytest.raises(ValueError, match="encoder mismatch"):
        KnowledgeBase.open(built, encoder=other)
    cls_pooled = Encoder.from_pretrained(enc_dir, pooling="cls", max_length=64)
    with pytest.raises(ValueError, match="encoder mismatch.*pooling=cls"):
        KnowledgeBase.open(built, encoder=cls_pooled)
    with pytest.raises(ValueError, match="differs in passage_fingerprint"):
        build_kb(_passages(), built, encoder=other, show_progress=False)
    same = Encoder.from_pretrained(enc_dir, pooling="mean", max_length=64)
    assert KnowledgeBase.open(built, encoder=same).encoder is same


def test_corrupted_files_are_refused(tmp_path, enc):
    build_kb(_passages(9), tmp_path / "kb", encoder=enc, show_progress=False)
    db = tmp_path / "kb" / "passages.sqlite"
    raw = bytearray(db.read_bytes())
    raw[-100] ^= 0xFF
    db.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum differs"):
        KnowledgeBase.open(tmp_path / "kb")
    (tmp_path / "kb" / "index.pyragidx").write_bytes(b"short")
    with pytest.raises(ValueError, match="size 5 differs"):
        KnowledgeBase.open(tmp_path / "kb", verify=False)
    # a meta.json that parses but is not the object it should be: named, not an AttributeError / KeyError
    meta_file = tmp_path / "kb" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for bad, match in (([meta], "a JSON list, not an object"), ({**meta, "files": None}, "'files' is missing")):
        meta_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            KnowledgeBase.open(tmp_path / "kb", verify=False)


@pytest.mark.parametrize("index,dtype,tol", [("flat", "float16", 2e-3), ("flat", "int8", 3e-2),
                                             ("hnsw", "float32", 1e-6)])
def test_other_index_kinds_and_dtypes(tmp_path, enc, index, dtype, tol):
    if index == "hnsw":
        import hnswlib  # noqa: F401 -- a hard dependency on CPU: a broken install must fail, not skip
    ps = _passages()
    kb = build_kb(ps, tmp_path / "kb", encoder=enc, index=index, dtype=dtype, show_progress=False)
    assert kb.meta["index"] == index and kb.meta["dtype"] == dtype
    want = enc.encode_passages([p["title"] for p in ps], [p["text"] for p in ps], show_progress=False)
    got = KnowledgeBase.open(tmp_path / "kb").vectors(torch.arange(len(ps)))
    assert (got - want).abs().max() <= tol * want.abs().max()
    res = kb.search(["where did zorvex live"], 3)
    assert torch.equal(res.rows[0], torch.topk(enc.encode(["where did zorvex live"], show_progress=False) @ got.T,
                                               3).indices[0])


def test_sketch_option_gives_the_same_search_and_is_recorded(tmp_path, enc, built):
    ps = _passages()
    kb = build_kb(ps, tmp_path / "kb", encoder=enc, sketch=True, shard_size=8, show_progress=False)
    assert kb.index.sketch and kb.meta["sketch"] is True
    again = KnowledgeBase.open(tmp_path / "kb")
    assert again.index.sketch
    plain = KnowledgeBase.open(built)
    assert not plain.index.sketch and plain.meta.get("sketch", False) is False
    questions = ["where did zorvex live", "what did the committee decide", "who wrote it"]
    for a, b in zip(plain.search(questions, 5).rows, again.search(questions, 5).rows):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"differs in sketch; .*kb.index.build_sketch\(\)"):
        build_kb(ps, built, encoder=enc, sketch=True, show_progress=False)
    with pytest.raises(ValueError, match="sketch=True needs index='flat' with a float dtype"):
        build_kb(ps, tmp_path / "kb8", encoder=enc, dtype="int8", sketch=True, show_progress=False)


def test_trained_in_memory_encoder_is_saved_with_the_kb(tmp_path, enc):
    with torch.no_grad():
        enc.model.embeddings.word_embeddings.weight.mul_(1.5)  # now differs from its directory
    build_kb(_passages(10), tmp_path / "kb", encoder=enc, show_progress=False)
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.meta["passage_encoder"]["path"] == "passage_encoder"
    assert kb.encoder.fingerprint() == enc.fingerprint()


def test_separate_encoders_record_both(tmp_path, enc_dir):
    bi = BiEncoder.from_pretrained(enc_dir, shared=False, pooling="mean", max_length=64)
    with torch.no_grad():
        bi.question_encoder.model.embeddings.word_embeddings.weight.mul_(0.5)
    build_kb(_passages(10), tmp_path / "kb", encoder=bi, show_progress=False)
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert not kb.meta["shared_encoder"]
    assert kb.encoder.fingerprint() == bi.question_encoder.fingerprint()
    assert kb.passage_encoder.fingerprint() == bi.passage_encoder.fingerprint()
    with pytest.raises(ValueError, match="encoder mismatch"):
        KnowledgeBase.open(tmp_path / "kb", encoder=bi.question_encoder)
    q = bi.question_encoder.encode(["zorvex river"], show_progress=False)
    assert torch.equal(kb.search(["zorvex river"], 3).rows, kb.search(q, 3).rows)


def test_build_and_eval_commands(tmp_path, enc_dir, capsys):
    from pyrag.kb import build_kb_cli
    from pyrag.metrics import eval_retriever_cli

    ps = _passages(15)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ps))
    assert build_kb_cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "kb"), "--encoder", str(enc_dir),
                         "--no-progress", "--shard-size", "4"]) == 0
    qa = [{"question": f"{p['title']}", "answers": [p["title"].split()[0]], "gold_ids": [p["id"]]} for p in ps]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    capsys.readouterr()
    assert eval_retriever_cli(["--kb", str(tmp_path / "kb"), "--qa", str(tmp_path / "qa.jsonl"), "--k", "1", "3",
                               "--mode", "bm25", "--out", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    kb = KnowledgeBase.open(tmp_path / "kb")
    res = kb.search([q["question"] for q in qa], 3, mode="bm25")
    want = sum(any(has_answer(t, q["answers"]) for t in ts[:1]) for ts, q in zip(res.texts, qa)) / len(qa)
    assert rep["recall@1"] == pytest.approx(want) and "gold_recall@3" in rep and rep["questions"] == 15
    assert build_kb_cli([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "kb2")]) == 2
    assert "not found" in capsys.readouterr().err
    # --index / --dtype reach the saved index
    for index, dtype in (("hnsw", "float32"), ("flat", "int8")):
        out = tmp_path / f"kb_{index}_{dtype}"
        assert build_kb_cli([str(tmp_path / "p.jsonl"), "--out", str(out), "--encoder", str(enc_dir), "--no-progress",
                             "--index", index, "--dtype", dtype]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["index"] == index and meta["dtype"] == dtype, meta
        kb2 = KnowledgeBase.open(out)
        assert len(kb2.search([ps[3]["title"]], 3).ids[0]) == 3
        if index == "hnsw":  # the inner-product graph by default (DPR's augmentation loses recall on real data)
            assert kb2.index.space == "ip" and meta["hnsw_options"]["space"] == "ip"
    # --sketch reaches the saved flat index
    out = tmp_path / "kb_sketch"
    assert build_kb_cli([str(tmp_path / "p.jsonl"), "--out", str(out), "--encoder", str(enc_dir), "--no-progress",
                         "--sketch"]) == 0
    assert json.loads((out / "meta.json").read_text())["sketch"] is True and KnowledgeBase.open(out).index.sketch


def test_command_help_exits_cleanly(capsys):
    from pyrag.kb import build_kb_cli
    from pyrag.train.retriever import train_retriever_cli

    for fn, word in ((build_kb_cli, "resume"), (train_retriever_cli, "hard negatives")):
        with pytest.raises(SystemExit) as e:
            fn(["--help"])
        assert e.value.code == 0 and word in capsys.readouterr().out


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
def test_search_on_cuda_matches_cpu(built):
    qs = ["where did zorvex live", "the blue lake of brisa", "old caldor river"]
    kb = KnowledgeBase.open(built)
    cpu = kb.search(qs, 5)
    kb.to("cuda")
    kb.encoder.to("cuda")
    for res in (kb.search(qs, 5), kb.search(kb.encode_questions(qs), 5), kb.search(qs, 5, mode="hybrid")):
        assert res.rows.device.type == "cuda" and res.vectors.device.type == "cuda"
    gpu = kb.search(qs, 5)
    assert torch.equal(gpu.rows.cpu(), cpu.rows) and gpu.ids == cpu.ids
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.vectors.cpu(), cpu.vectors)


def test_default_encoder_kb_records_a_portable_reference(tmp_path):
    ps = [{"id": "a", "title": "Paris", "text": "Paris is the capital of France."},
          {"id": "b", "title": "Bananas", "text": "Bananas are yellow fruit."}]
    build_kb(ps, tmp_path / "kb", show_progress=False)  # encoder=None: the packaged MiniLM
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.meta["passage_encoder"]["path"] == kbmod.DEFAULT_ENCODER_REF  # not this machine's site-packages
    assert kb.meta["passage_encoder"]["normalize"] and kb.hybrid_weight == kbmod.DEFAULT_HYBRID_WEIGHT[True]
    assert kb.search(["What is the capital of France?"], 1).ids == [["a"]]


def test_atomic_dir_replaces_whole_or_leaves_the_old_directory(tmp_path):
    from pyrag.kb_io import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target, marker="m.json") as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "m.json").write_text("{}")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(target, marker="m.json") as tmp:
        (tmp / "a.txt").write_text("two, half written")
        raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "one"  # the old directory, untouched
    with atomic_dir(target, marker="m.json") as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, nothing of the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old directories left behind
    # what it would delete is not its own (no marker): refused, kept
    with pytest.raises(FileExistsError, match="refusing to replace.*no m.json"), \
            atomic_dir(target, marker="m.json") as tmp:
        (tmp / "c.txt").write_text("four")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_kb_built_before_the_hnsw_space_option_still_reruns_as_a_no_op(tmp_path, enc_dir):
    # meta.json of an older pyrag recorded no graph space: that KB was built "augmented" and must stay so
    ps = _passages(12)
    out = tmp_path / "kb"
    build_kb(ps, out, encoder=Encoder.from_pretrained(enc_dir), index="hnsw", hnsw_options={"space": "augmented"},
             show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    del meta["hnsw_options"]["space"]
    (out / "meta.json").write_text(json.dumps(meta))
    kb = build_kb(ps, out, encoder=Encoder.from_pretrained(enc_dir), index="hnsw", show_progress=False)
    assert kb.index.space == "augmented"
    with pytest.raises(ValueError, match="differs in hnsw_options"):
        build_kb(ps, out, encoder=Encoder.from_pretrained(enc_dir), index="hnsw", hnsw_options={"space": "ip"},
                 show_progress=False)


def test_bad_index_options_are_refused_before_any_encoding(tmp_path, enc, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("options must be checked before encoding")

    monkeypatch.setattr(Encoder, "encode_passages", no_encoding)
    ps = _passages(12)
    for opts, match in (({"M": 1}, r"hnsw_options: M must be an int >= 2, got 1"),
                        ({"ef_construction": 0}, "ef_construction must be an int >= 1, got 0"),
                        ({"ef_search": -3}, "ef_search must be an int >= 1, got -3"),
                        ({"space": "l2"}, "space must be one of"),
                        ({"norm_headroom": float("nan")}, "norm_headroom"),
                        ({"m": 16}, r"unknown option\(s\) \['m'\]")):
        with pytest.raises(ValueError, match=match):
            build_kb(ps, tmp_path / "kb", encoder=enc, index="hnsw", hnsw_options=opts, show_progress=False)
    with pytest.raises(ValueError, match="hnsw_options are for index='hnsw' only"):
        build_kb(ps, tmp_path / "kb", encoder=enc, index="flat", hnsw_options={"M": 16}, show_progress=False)
    with pytest.raises(TypeError, match="hnsw_options must be a dict"):
        build_kb(ps, tmp_path / "kb", encoder=enc, index="hnsw", hnsw_options=[("M", 16)], show_progress=False)
    assert not (tmp_path / "kb").exists()  # nothing written, so a corrected rerun starts cleanly


def test_build_kb_cli_checks_options_before_encoding(tmp_path, enc_dir, capsys, monkeypatch):
    from pyrag.kb import build_kb_cli

    def no_encoding(*a, **k):
        raise AssertionError("options must be checked before encoding")

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _passages(12)))
    monkeypatch.setattr(Encoder, "encode_passages", no_encoding)
    base = [str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "kb"), "--encoder", str(enc_dir), "--no-progress"]
    threads = torch.get_num_threads()
    for extra, match in ((["--index", "hnsw", "--hnsw-m", "1"], "M must be an int >= 2, got 1"),
                         (["--index", "hnsw", "--hnsw-ef-search", "0"], "ef_search must be an int >= 1, got 0"),
                         (["--threads", "-1"], "--threads must be >= 1, got -1"),
                         (["--threads", "0"], "--threads must be >= 1, got 0")):
        assert build_kb_cli(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyrag build-kb: error: ") and match in err and "Traceback" not in err
    assert torch.get_num_threads() == threads and not (tmp_path / "kb").exists()


def test_resume_with_other_index_options_rebuilds_only_the_index(tmp_path, enc, monkeypatch):
    ps = _passages()
    out = tmp_path / "kb"
    _interrupted_build(monkeypatch, ps, out, encoder=enc, index="hnsw", hnsw_options={"M": 8}, shard_size=8,
                       show_progress=False)
    # A build state written by an older pyrag that took a bad option (M=1) still resumes with a good one.
    state = json.loads((out / "build" / "state.json").read_text())
    (out / "build" / "state.json").write_text(json.dumps({**state, "hnsw_options": {"M": 1, "space": "ip"}}))
    encoded = _count_encoded(monkeypatch)
    kb = build_kb(ps, out, encoder=enc, index="hnsw", hnsw_options={"M": 16, "ef_search": 50}, shard_size=8,
                  show_progress=False)
    assert sum(encoded) == len(ps) - 16  # the two finished shards were reused
    want = {"M": 16, "ef_construction": 200, "ef_search": 50, "space": "ip", "norm_headroom": 1.0, "seed": 100}
    assert kb.meta["hnsw_options"] == want  # every option as used, defaults filled in
    assert (kb.index.M, kb.index.ef_search, kb.index.space) == (16, 50, "ip")
    # Rerunning the finished KB with the same options (given partly) is a no-op; other options are refused.
    assert build_kb(ps, out, encoder=enc, index="hnsw", hnsw_options={"M": 16, "ef_search": 50},
                    show_progress=False).meta == kb.meta
    with pytest.raises(ValueError, match="finished knowledge base that differs in hnsw_options"):
        build_kb(ps, out, encoder=enc, index="hnsw", hnsw_options={"M": 16}, show_progress=False)

    # index and dtype can change on resume too: flat int8 from shards encoded for an hnsw build
    _interrupted_build(monkeypatch, ps, tmp_path / "kb2", encoder=enc, index="hnsw", shard_size=8,
                       show_progress=False)
    encoded.clear()
    kb2 = build_kb(ps, tmp_path / "kb2", encoder=enc, dtype="int8", shard_size=8, show_progress=False)
    assert sum(encoded) == len(ps) - 16
    assert (kb2.meta["index"], kb2.meta["dtype"], kb2.meta["hnsw_options"]) == ("flat", "int8", {})
    assert kb2.search(["where did zorvex live"], 3).rows.tolist() == kb.search(["where did zorvex live"], 3,
                                                                                 ).rows.tolist()
    # what the shards depend on still must match
    _interrupted_build(monkeypatch, ps, tmp_path / "kb3", encoder=enc, shard_size=8, show_progress=False)
    with pytest.raises(ValueError, match="unfinished build that differs in shard_size"):
        build_kb(ps, tmp_path / "kb3", encoder=enc, shard_size=4, show_progress=False)


def test_kb_files_follow_the_umask(tmp_path, enc):
    import os
    import stat

    with torch.no_grad():  # an encoder changed in memory is saved with the KB (atomic_dir)
        next(enc.parameters()).add_(0.01)
    old = os.umask(0o027)
    try:
        kb = build_kb(_passages(12), tmp_path / "kb", encoder=enc, bm25=True, show_progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "kb"
    # mkstemp / mkdtemp would leave 0600 / 0700: other users and containers could not read the KB
    for name in ("meta.json", "passages.sqlite", "index.pyragidx"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE((out / "bm25").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "passage_encoder").stat().st_mode) == 0o750  # saved with the KB
    assert stat.S_IMODE((out / "passage_encoder" / "config.json").stat().st_mode) == 0o640
    assert kb.meta["passage_encoder"]["path"] == "passage_encoder"


def test_search_input_checks(built):
    kb = KnowledgeBase.open(built)
    qs = ["where did zorvex live", "the blue lake of brisa"]
    want = kb.search(qs, 3)
    # any iterable of str, used once (a generator is not consumed by the type check)
    for form in ((q for q in qs), tuple(qs), iter(qs)):
        assert kb.search(form, 3).ids == want.ids
        assert kb.search(form if not hasattr(form, "__next__") else (q for q in qs), 3, mode="bm25").ids == \
            kb.search(qs, 3, mode="bm25").ids
    assert kb.search((q for q in qs), 3, mode="hybrid").ids == kb.search(qs, 3, mode="hybrid").ids
    with pytest.raises(TypeError, match="item 1 is int"):
        kb.search(["a", 3], 1)
    with pytest.raises(TypeError, match="questions must be an iterable of str"):
        kb.search("one question", 1)
    # question_vectors: one row per question, the KB's dim
    q = kb.encode_questions(qs)
    assert kb.search(qs, 3, mode="hybrid", question_vectors=q).ids == kb.search(qs, 3, mode="hybrid").ids
    for mode in ("dense", "hybrid"):
        with pytest.raises(ValueError, match=rf"\[2, {kb.dim}\].*got \(3, {kb.dim}\) for 2 questions"):
            kb.search(qs, 1, mode=mode, question_vectors=torch.randn(3, kb.dim))
        with pytest.raises(ValueError, match=r"got \(2, 7\)"):
            kb.search(qs, 1, mode=mode, question_vectors=torch.randn(2, 7))
    with pytest.raises(ValueError, match="questions is already a tensor"):
        kb.search(q, 1, question_vectors=q)


def test_hybrid_weight_must_be_finite_and_non_negative(built):
    kb = KnowledgeBase.open(built)
    qs = ["where did zorvex live", "the blue lake of brisa"]
    for bad in (float("nan"), float("inf"), -float("inf"), -0.5):
        with pytest.raises(ValueError, match=r"hybrid_weight must be a finite float >= 0.*got " + repr(bad)):
            kb.search(qs, 2, mode="hybrid", hybrid_weight=bad)
    with pytest.raises(TypeError, match="hybrid_weight must be a float, got str"):
        kb.search(qs, 2, mode="hybrid", hybrid_weight="0.5")
    with pytest.raises(ValueError, match="candidates must be an int >= 1, got candidates=0"):
        kb.search(qs, 2, mode="hybrid", candidates=0)
    kb.hybrid_weight = float("nan")
    with pytest.raises(ValueError, match="kb.hybrid_weight must be a finite float"):
        kb.search(qs, 2, mode="hybrid")
    assert kb.search(qs, 2, mode="dense").rows.shape == (2, 2)  # only hybrid uses it


def test_eval_retriever_cli_errors_and_defaults(tmp_path, enc_dir, capsys):
    from pyrag.metrics import eval_retriever_cli

    ps = _passages(15)
    build_kb(ps, tmp_path / "kb", encoder=Encoder.from_pretrained(enc_dir), show_progress=False)
    # the demo corpus names the gold passage "passage_id"
    qa = [{"question": p["title"], "answers": [p["title"].split()[0]], "passage_id": p["id"]} for p in ps]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    kb_arg = ["--kb", str(tmp_path / "kb")]
    qa_arg = ["--qa", str(tmp_path / "qa.jsonl")]

    def run(*argv):
        rc = eval_retriever_cli(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return rc, out, err

    rc, out, _ = run(*kb_arg, *qa_arg, "--mode", "bm25")
    rep = json.loads(out)
    # default cut-offs 1 5 20 on a 15-passage KB: 20 is replaced by the KB size
    assert rc == 0 and sorted(k for k in rep if k.startswith("recall@")) == ["recall@1", "recall@15", "recall@5"]
    assert rep["recall@15"] == 1.0 and rep["gold_recall@15"] == 1.0 and "gold_mrr" in rep
    rc, out, _ = run(*kb_arg, *qa_arg, "--limit", "4")
    assert rc == 0 and json.loads(out)["questions"] == 4

    # a BiEncoder directory (what `pyrag train-retriever` writes to out/final): its question encoder is used
    bi = BiEncoder(Encoder.from_pretrained(enc_dir), Encoder.from_pretrained(enc_dir))
    bi.save_pretrained(tmp_path / "train" / "final")
    rc, out, _ = run(*kb_arg, *qa_arg, "--encoder", str(tmp_path / "train" / "final"))
    assert rc == 0 and json.loads(out)["questions"] == 15

    other = tmp_path / "enc8"
    tiny_encoder(other, WORDS, hidden=8, heads=2)
    capsys.readouterr()
    cases = [
        ((*qa_arg, "--kb", str(tmp_path / "nokb")), "knowledge base directory not found"),
        ((*kb_arg, "--qa", str(tmp_path / "no.jsonl")), "QA file not found"),
        ((*kb_arg, *qa_arg, "--k", "1", "50"), "--k 50 is out of range: each cut-off must be in [1, 15]"),
        ((*kb_arg, *qa_arg, "--k", "0"), "--k 0 is out of range"),
        ((*kb_arg, *qa_arg, "--limit", "-1"), "--limit must be >= 0"),
        ((*kb_arg, *qa_arg, "--limit", "0"), "no questions to evaluate"),
        ((*kb_arg, *qa_arg, "--batch-size", "0"), "--batch-size must be >= 1"),
        ((*kb_arg, *qa_arg, "--encoder", str(tmp_path / "train")), str(tmp_path / "train" / "final")),
        ((*kb_arg, *qa_arg, "--encoder", str(tmp_path)), "neither an encoder directory"),
        ((*kb_arg, *qa_arg, "--encoder", str(other)), "question encoder dim 8 != KB dim 32"),
    ]
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q", "answers": []}]}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(squad))
    cases.append(((*kb_arg, "--qa", str(tmp_path / "bad.json")), "article 0 paragraph 0 question 0"))
    for argv, match in cases:
        rc, _, err = run(*argv)
        assert rc == 2 and err.startswith("pyrag eval-retriever: error: ") and match in err, (argv, err)
