"""Tests of the demo's synthetic corpus generator: determinism, entity-disjoint splits, answers as spans of their
gold passages, counts and look-alike distractors."""

from __future__ import annotations

import collections

import pytest

from pyrag.demo.corpus import generate_corpus


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(seed=3, n_people=60, n_places=30, n_orgs=20)


def test_same_seed_gives_identical_corpus_and_other_seed_differs(corpus):
    again = generate_corpus(seed=3, n_people=60, n_places=30, n_orgs=20)
    assert again.passages == corpus.passages
    assert (again.train, again.dev, again.test) == (corpus.train, corpus.dev, corpus.test)
    other = generate_corpus(seed=4, n_people=60, n_places=30, n_orgs=20)
    assert other.passages != corpus.passages


def test_counts_two_passages_per_entity_and_one_question_per_fact(corpus):
    assert len(corpus.passages) == 2 * (60 + 30 + 20)
    assert len({p["id"] for p in corpus.passages}) == len(corpus.passages)
    n_questions = 60 * 5 + 30 * 4 + 20 * 4
    assert len(corpus.train) + len(corpus.dev) + len(corpus.test) == n_questions
    titles = collections.Counter(p["title"] for p in corpus.passages)
    assert set(titles.values()) == {2}
    # the requested fractions, up to rounding at the entity level
    assert 0.12 < len(corpus.test) / n_questions < 0.28
    assert 0.04 < len(corpus.dev) / n_questions < 0.16


def test_splits_are_disjoint_by_entity(corpus):
    ents = {name: {q["entity"] for q in getattr(corpus, name)} for name in ("train", "dev", "test")}
    assert ents["train"] and ents["dev"] and ents["test"]
    assert not ents["train"] & ents["test"]
    assert not ents["train"] & ents["dev"]
    assert not ents["dev"] & ents["test"]
    # no (entity, attribute) fact of the test split is ever a training target
    train_facts = {(q["entity"], q["attribute"]) for q in corpus.train}
    assert not train_facts & {(q["entity"], q["attribute"]) for q in corpus.test}


def test_every_answer_is_a_span_of_its_gold_passage_about_its_entity(corpus):
    for q in corpus.train + corpus.dev + corpus.test:
        gold = corpus.passage(q["passage_id"])
        assert gold["title"] == q["entity"]
        assert len(q["answers"]) == 1 and q["answers"][0] in gold["text"], (q, gold)
        assert q["entity"] in q["question"]
        assert q["question"].endswith("?")


def test_questions_are_phrased_differently_from_passages(corpus):
    # At least some questions share no verb phrase with their passage ("born" vs "came into the world").
    differs = sum("born" in q["question"] and "born" not in corpus.passage(q["passage_id"])["text"]
                  for q in corpus.train + corpus.dev + corpus.test)
    assert differs > 0


def test_corpus_contains_look_alike_distractors(corpus):
    # Family members share a surname, so an entity's surname alone does not identify its passages.
    surnames = collections.Counter(p["title"].split(" ")[1] for p in corpus.passages[: 2 * 60])
    assert max(surnames.values()) >= 4  # two passages each for at least two people with the same surname


def test_variety_one_phrases_each_fact_and_question_one_way():
    c = generate_corpus(seed=3, n_people=30, n_places=10, n_orgs=10, variety=1)
    people = c.passages[: 2 * 30: 2]  # each person's first passage: birth
    assert all(p["text"].startswith(f"{p['title']} was born in ") for p in people)
    birthplace = [q for q in c.train + c.dev + c.test if q["attribute"] == "person.birthplace"]
    assert {q["question"].replace(q["entity"], "X") for q in birthplace} == {"Where was X born?"}
    # the facts themselves do not depend on the phrasing
    full = generate_corpus(seed=3, n_people=30, n_places=10, n_orgs=10)
    assert [p["title"] for p in full.passages] == [p["title"] for p in c.passages]


@pytest.mark.parametrize("kwargs", [{"n_people": 2}, {"n_orgs": "5"}, {"test_fraction": 0.0},
                                    {"dev_fraction": 0.5, "test_fraction": 0.6}, {"variety": 5}])
def test_bad_arguments_raise_value_error_naming_them(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_corpus(**kwargs)
