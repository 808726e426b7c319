"""SQuAD v1.1 normalisation / exact match / F1, answer-in-passage matching, recall@k, gold recall, MRR."""

from __future__ import annotations

import json

import pytest

from pyrag.metrics import (
    answer_hits,
    exact_match,
    f1_score,
    gold_hits,
    has_answer,
    mrr,
    normalize_answer,
    recall_at_k,
    retrieval_report,
)


def test_normalize_answer_follows_squad_v11():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos", "Broncos"]) == 0.0
    assert exact_match("Broncos.", "broncos") == 1.0


def test_f1_is_token_overlap_max_over_golds():
    # pred "denver broncos team" vs gold "broncos": p=1/3, r=1 -> f1=0.5 ; vs "denver broncos": p=2/3, r=1 -> 0.8
    assert f1_score("Denver Broncos team", ["Broncos", "Denver Broncos"]) == pytest.approx(0.8)
    assert f1_score("x b b", ["b b c"]) == pytest.approx(2 / 3)  # multiset overlap: 2 shared of 3 and 3
    assert f1_score("nothing here", ["Broncos"]) == 0.0
    assert f1_score("the", ["a"]) == 0.0  # both normalise to empty
    with pytest.raises(ValueError, match="golds is empty"):
        f1_score("x", [])


def test_has_answer_matches_whole_normalised_words():
    text = "In 1990, the Broncos won Super Bowl XXIV in New Orleans."
    assert has_answer(text, ["super bowl xxiv"])
    assert has_answer(text, ["the New Orleans"])  # articles and case are normalised away
    assert not has_answer(text, ["199"])  # not a partial word
    assert not has_answer(text, ["Bowl X"])
    assert not has_answer(text, ["the"])  # an answer that normalises to nothing never matches
    assert has_answer(text, ["Denver", "1990"])


def test_recall_at_k_and_mrr():
    hits = [[False, True, False], [True, False, False], [False, False, False], [False, False, True]]
    assert recall_at_k(hits, (1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}
    assert mrr(hits) == pytest.approx((1 / 2 + 1 + 0 + 1 / 3) / 4)
    assert mrr(hits, k=2) == pytest.approx((1 / 2 + 1) / 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(hits, (0,))
    with pytest.raises(ValueError, match="empty"):
        mrr([])


def test_answer_and_gold_hits_and_report():
    texts = [["paris is in france", "berlin"], ["rome", "the tiber flows through rome"]]
    ids = [["p1", "p2"], ["p3", "p4"]]
    assert answer_hits(texts, [["Paris"], ["Tiber"]]) == [[True, False], [False, True]]
    assert gold_hits(ids, ["p2", ["p3", "p9"]]) == [[False, True], [True, False]]
    rep = retrieval_report(texts, ids, [["Paris"], ["Tiber"]], ["p2", "p3"], ks=(1, 2))
    assert rep["recall@1"] == 0.5 and rep["recall@2"] == 1.0
    assert rep["gold_recall@1"] == 0.5 and rep["gold_mrr"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="differ in length"):
        answer_hits(texts, [["x"]])


def test_eval_retriever_cli_help_exits_cleanly(capsys):
    from pyrag.metrics import eval_retriever_cli

    with pytest.raises(SystemExit) as e:
        eval_retriever_cli(["--help"])
    assert e.value.code == 0
    assert "recall@k" in capsys.readouterr().out


def test_read_qa_accepts_squad_and_jsonl(tmp_path):
    from pyrag.kb_io import read_qa

    squad = {"data": [{"title": "T", "paragraphs": [{"context": "c0", "qas": []},
                                                     {"context": "c1", "qas": [{"id": "q", "question": "Q?",
                                                                                 "answers": [{"text": "A"}]}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    assert read_qa(tmp_path / "s.json")[0]["gold_ids"] == ["T#1"]
    (tmp_path / "q.jsonl").write_text('{"question": "Q?", "answers": ["A"], "gold_id": "x"}\n\n{"question": 3}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:3"):
        read_qa(tmp_path / "q.jsonl")
