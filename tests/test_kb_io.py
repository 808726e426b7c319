"""kb_io: atomic writes get the usual umask-derived permissions; QA / SQuAD readers accept the documented gold-id
keys, skip SQuAD v2.0's unanswerable questions with a count, and locate malformed records."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest

from pyrag.kb_io import atomic_dir, atomic_path, read_qa, read_squad, write_json_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_027):
    # mkstemp / mkdtemp alone give 0600 / 0700 whatever the umask: others could not read a KB or a model.
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o640 and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    tmp, final = atomic_path(tmp_path / "b.bin")
    assert _mode(tmp) == 0o640
    tmp.write_bytes(b"data")  # writing into the temporary keeps its mode
    os.replace(tmp, final)
    assert _mode(final) == 0o640
    with atomic_dir(tmp_path / "model", marker="w.txt") as d:
        (d / "w.txt").write_text("w")
    assert _mode(tmp_path / "model") == 0o750 and _mode(tmp_path / "model" / "w.txt") == 0o640
    os.umask(0o002)
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert _mode(tmp_path / "a.json") == 0o664


def _squad(qas, title="T"):
    return {"version": "v2.0", "data": [{"title": title, "paragraphs": [{"context": "c0", "qas": []},
                                                                        {"context": "c1", "qas": qas}]}]}


def test_read_squad_skips_unanswerable_questions_with_a_count(tmp_path):
    qas = [{"id": "a", "question": "Q1?", "answers": [{"text": "A", "answer_start": 0}], "is_impossible": False},
           {"id": "b", "question": "Q2?", "answers": [], "is_impossible": True,
            "plausible_answers": [{"text": "c", "answer_start": 0}]},
           {"id": "c", "question": "Q3?", "answers": []}]
    (tmp_path / "v2.json").write_text(json.dumps(_squad(qas)))
    with pytest.warns(UserWarning, match=r"skipped 2 unanswerable question\(s\).*1 kept"):
        passages, questions = read_squad(tmp_path / "v2.json")
    assert [q["id"] for q in questions] == ["a"] and questions[0]["gold_ids"] == ["T#1"]
    assert len(passages) == 2
    with pytest.warns(UserWarning, match="skipped 2"):
        assert [q["question"] for q in read_qa(tmp_path / "v2.json")] == ["Q1?"]
    # a v1.1 file (all answerable) warns about nothing
    (tmp_path / "v1.json").write_text(json.dumps(_squad(qas[:1])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_squad(tmp_path / "v1.json")[1]) == 1


@pytest.mark.parametrize("qa, match", [
    ({"id": "x", "answers": [{"text": "A"}]}, "article 0 paragraph 1 question 1: expected an object with a 'question'"),
    ({"id": "x", "question": "Q?", "answers": [{"answer_start": 3}]}, "question 1: answer 0 must be an object"),
    ({"id": "x", "question": "Q?", "answers": "A"}, "question 1: 'answers' must be a list"),
])
def test_read_squad_locates_malformed_questions(tmp_path, qa, match):
    good = {"id": "g", "question": "G?", "answers": [{"text": "A"}]}
    (tmp_path / "s.json").write_text(json.dumps(_squad([good, qa])))
    for reader in (read_squad, read_qa):
        with pytest.raises(ValueError, match=match) as e:
            reader(tmp_path / "s.json")
        assert "s.json" in str(e.value)


def test_read_qa_gold_keys(tmp_path):
    recs = [{"question": "a?", "answers": ["x"], "gold_ids": ["p1", "p2"]},
            {"question": "b?", "answers": "x", "gold_id": "p3"},
            {"question": "c?", "answers": ["x"], "passage_id": "p4"},  # pyrag's demo corpus
            {"question": "d?", "answers": ["x"], "passage_id": 7},
            {"question": "e?", "answers": ["x"], "positive_ctxs": [{"passage_id": "p5", "text": "t"}]},
            {"question": "f?", "answers": ["x"]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = read_qa(tmp_path / "q.jsonl")
    assert [g["gold_ids"] for g in got] == [["p1", "p2"], ["p3"], ["p4"], ["7"], ["p5"], []]
    assert got[1]["answers"] == ["x"]
    (tmp_path / "l.json").write_text(json.dumps(recs[2:3]))
    assert read_qa(tmp_path / "l.json")[0]["gold_ids"] == ["p4"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps({**recs[2], "passage_id": {}}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'passage_id' must be a passage id"):
        read_qa(tmp_path / "bad.jsonl")
