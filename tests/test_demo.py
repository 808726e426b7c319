"""End-to-end tests of `pyrag demo` through its Python entry point: with --quick, report structure, RAG beating
closed-book on unseen facts, resuming a stopped run without redoing finished stages, Ctrl-C handling and argument
errors; with the defaults (the README's main job), the quality the README reports."""

from __future__ import annotations

import json

import pytest
import torch

from pyrag.demo import demo_cli
from pyrag.demo.run import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A --quick run stopped after the retriever stage, then resumed to the end; returns (out, records after the
    stop, records at the end, captured output of the second run)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo_cli(["--quick", "--out", str(out), "--no-progress", "--stop-after", "retriever"]) == 0
    first = json.loads((out / "stages.json").read_text())
    assert demo_cli(["--quick", "--out", str(out), "--no-progress"]) == 0
    final = json.loads((out / "stages.json").read_text())
    return out, first, final


def test_quick_demo_writes_report_with_the_issue_structure(quick_run):
    out, _, _ = quick_run
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) == {"closed_book", "rag_frozen", "rag_token", "rag_sequence", "retrieval", "seconds"}
    for key in ("closed_book", "rag_frozen", "rag_token", "rag_sequence"):
        assert set(rep[key]) == {"em", "f1"}
        assert 0.0 <= rep[key]["em"] <= rep[key]["f1"] <= 1.0
    assert set(rep["retrieval"]) == {"recall@1_before", "recall@5_before", "recall@1_after", "recall@5_after"}
    for v in rep["retrieval"].values():
        assert 0.0 <= v <= 1.0
    assert rep["retrieval"]["recall@1_before"] <= rep["retrieval"]["recall@5_before"]
    assert rep["seconds"] > 0


def test_quick_demo_rag_beats_closed_book_on_unseen_entities(quick_run):
    out, _, _ = quick_run
    rep = json.loads((out / "report.json").read_text())
    closed = rep["closed_book"]
    for key in ("rag_frozen", "rag_token", "rag_sequence"):
        assert rep[key]["f1"] > closed["f1"], (key, rep)
    assert max(rep[k]["em"] for k in ("rag_frozen", "rag_token", "rag_sequence")) > closed["em"], rep


def test_quick_demo_keeps_models_that_load_and_answer(quick_run):
    from pyrag.models.rag import RagModel

    out, _, _ = quick_run
    for name in ("rag_frozen", "rag_token", "rag_sequence"):
        assert (out / name / "model").is_dir()
    model = RagModel.from_pretrained(out / "rag_token" / "model")
    test = [json.loads(line) for line in (out / "corpus" / "test.jsonl").read_text().splitlines()]
    g = model.generate([test[0]["question"]], num_beams=1, max_new_tokens=8)
    assert len(g.answers) == 1 and len(g.ids[0]) == model.n_docs
    assert torch.allclose(g.doc_prior.sum(1), torch.ones(1))


def test_stopped_run_resumes_without_redoing_finished_stages(quick_run):
    _, first, final = quick_run
    assert set(first) == {"corpus", "kb", "retriever"}
    assert set(final) == set(STAGES)
    for name in first:  # recorded once, never redone: the records are the very same
        assert final[name] == first[name]


def test_rerun_of_a_finished_run_redoes_nothing(quick_run, capsys):
    out, _, final = quick_run
    report = (out / "report.json").read_text()
    assert demo_cli(["--quick", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "stages.json").read_text()) == final
    assert (out / "report.json").read_text() == report
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == len(STAGES)
    assert "test EM" in printed


def test_other_settings_on_the_same_out_are_refused(quick_run, capsys):
    out, _, _ = quick_run
    assert demo_cli(["--out", str(out), "--no-progress"]) == 2  # default settings, not --quick
    assert "other settings" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_with_exit_130_and_keeps_state(tmp_path, monkeypatch, capsys):
    from pyrag.demo import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_stage_kb", interrupted)
    out = tmp_path / "run"
    assert demo_cli(["--quick", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--out" in err and str(out) in err
    records = json.loads((out / "stages.json").read_text())
    assert set(records) == {"corpus"}
    assert (out / "corpus" / "passages.jsonl").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps"),
    (["--n-docs", "-1"], "--n-docs"),
    (["--eval-questions", "0"], "--eval-questions"),
    (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--stop-after", "nothing"], "--stop-after"),
    (["--frobnicate"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys):
    assert demo_cli(argv) == 2
    assert needle in capsys.readouterr().err


def test_out_that_is_a_file_or_a_foreign_directory_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert demo_cli(["--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("keep me")
    assert demo_cli(["--out", str(tmp_path / "other")]) == 2
    assert "not a pyrag demo run" in capsys.readouterr().err
    assert (tmp_path / "other" / "data.txt").read_text() == "keep me"


def test_default_demo_reaches_what_the_readme_reports(tmp_path):
    """`pyrag demo` with its defaults (the README's main job, ~5-6 min on 2 cores): retrieval-augmented answers on
    entities never seen in a training answer, joint training at least as good as a frozen retriever, and the
    question encoder improving from the generator's loss alone. Margins are well inside the README's run
    (closed-book EM 0.018; RAG 0.56 / 0.63 / 0.64; recall@1 0.82 -> 0.93)."""
    out = tmp_path / "run"
    assert demo_cli(["--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    em = {k: rep[k]["em"] for k in ("closed_book", "rag_frozen", "rag_token", "rag_sequence")}
    assert em["closed_book"] <= 0.1, rep
    for k in ("rag_frozen", "rag_token", "rag_sequence"):
        assert em[k] >= em["closed_book"] + 0.3, rep
    for k in ("rag_token", "rag_sequence"):
        assert em[k] >= em["rag_frozen"], rep  # training the question encoder jointly does not hurt
    r = rep["retrieval"]
    assert r["recall@1_after"] >= r["recall@1_before"] + 0.05, rep
