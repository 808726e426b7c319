"""Training-loop and CLI audit fixes: a checkpoint refuses a run with other settings (model, data, KB...);
over-long answers and malformed records are named by file and line before training; the commands turn user errors
into one-line messages; a torn metrics line does not block a resume; Ctrl-C writes a checkpoint; per-part
learning rates are logged by name; the example order is built once per epoch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from test_rag_model import tiny_setup

import pyrag.train.rag as train_mod
from pyrag.kb_io import read_qa
from pyrag.models.rag import RagSequence, RagToken
from pyrag.train.rag import evaluate_rag, train_rag
from pyrag.train.rag_cli import eval_cli, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {"batch_size": 4, "lr_generator": 1e-3, "lr_question_encoder": 1e-4, "warmup_steps": 1, "log_every": 1,
      "show_progress": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, qa, kb): a tiny KB and generator (with dropout, so that the RNG state matters) saved under root;
    fresh() builds a new model from them."""
    root = tmp_path_factory.mktemp("audit")
    _, _, qa, kb = tiny_setup(root, n=16, n_docs=3, gen_dropout=0.1)
    return root, qa, kb


def fresh(setup, cls=RagToken, **kw):
    root, _, kb = setup
    return cls.from_parts(None, root / "generator", kb, **{"n_docs": 3, **kw})


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _state_dict(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ---- 1: a checkpoint resumes only its own run ----

def test_resume_refuses_changed_model_data_or_kb_settings(setup, tmp_path):
    from pyrag.kb import build_kb

    root, qa, kb = setup
    out = tmp_path / "run"
    train_rag(fresh(setup), qa, steps=4, out_dir=out, stop_at=2, **KW)
    other_qa = [*qa[:-1], {**qa[-1], "answers": ["somewhere else"]}]
    frozen = fresh(setup)
    frozen.question_encoder.requires_grad_(False)
    rows = list(range(len(kb) - 1))
    passages = [{"id": i, "title": t, "text": x} for i, t, x in zip(kb.ids(rows), *kb.passages(rows))]
    other_kb = build_kb(passages, tmp_path / "kb", encoder=kb.encoder, show_progress=False)
    for model, data, key in ((fresh(setup, label_smoothing=0.1), qa, "epsilon="),
                             (fresh(setup, n_docs=2), qa, "n_docs="),
                             (fresh(setup, RagSequence), qa, "model_mode="),
                             (fresh(setup, max_combined_length=40), qa, "model_input_format.max_combined_length="),
                             (frozen, qa, "trainable_parameters.question_encoder="),
                             (RagToken.from_parts(None, root / "generator", other_kb, n_docs=3), qa, "kb="),
                             (fresh(setup), other_qa, "train_data=")):
        before = _state_dict(model)
        with pytest.raises(ValueError, match=key) as e:
            train_rag(model, data, steps=4, out_dir=out, **KW)
        assert "(now " in str(e.value) and "new out_dir (--out)" in str(e.value)
        # refused before anything was loaded into the model
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    # a checkpoint from before n_docs / epsilon were recorded as used holds them as passed (None): still this run
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["n_docs"] == 3 and state["epsilon"] == 0.0
    state.update(n_docs=None, epsilon=None)
    state_file.write_text(json.dumps(state))
    # the same settings (the same data, now from a file: its path is only shown, not compared) resume
    res = train_rag(fresh(setup), _jsonl(tmp_path / "train.jsonl", qa), steps=4, out_dir=out, **KW)
    assert res["step"] == 4 and res["finished"]


def test_cli_rerun_of_a_finished_run_is_a_noop_and_other_flags_are_refused(setup, tmp_path, capsys):
    root, qa, kb = setup
    train = _jsonl(tmp_path / "train.jsonl", [{"question": r["question"], "answers": r["answers"]} for r in qa])
    out = tmp_path / "out"
    base = ["--kb", str(kb.path), "--train", str(train), "--generator", str(root / "generator"), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--n-docs", "3", "--no-progress"]
    assert train_cli(base) == 0
    cfg = out / "model" / "pyrag_rag.json"
    saved, mtime = cfg.read_text(), cfg.stat().st_mtime_ns
    capsys.readouterr()
    assert train_cli(base) == 0  # finished, same settings: nothing to do, nothing rewritten
    assert cfg.stat().st_mtime_ns == mtime
    for flags, key in ((["--label-smoothing", "0.1"], "epsilon=0.0"), (["--n-docs", "2"], "n_docs=3"),
                       (["--mode", "sequence"], "model_mode='token'"),
                       (["--max-combined-length", "64"], "model_input_format.max_combined_length="),
                       (["--lr-generator", "1e-3"], "lr_generator=3e-05")):
        assert train_cli(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert key in err and "(now " in err and "--out" in err, (flags, err)
    _jsonl(train, [{"question": r["question"], "answers": r["answers"][::-1] + ["x"]} for r in qa])
    assert train_cli(base) == 2
    err = capsys.readouterr().err
    assert "train_data=" in err and str(train) in err  # the fingerprint differs; the path is shown
    assert cfg.read_text() == saved and cfg.stat().st_mtime_ns == mtime


# ---- 2: over-long answers are found before training ----

def test_overlong_answer_is_named_by_file_line_before_training(setup, tmp_path):
    _, qa, _ = setup
    model = fresh(setup)
    limit = model.generator.max_answer_length
    rows = [{"question": r["question"], "answers": r["answers"]} for r in qa]
    rows[4] = {**rows[4], "answers": ["paris " * (limit + 5), "paris"]}
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=rf"max_answer_length={limit} tokens: \S*train\.jsonl:5 \(\d+ tokens.*drop"):
        train_rag(model, path, steps=20, out_dir=tmp_path / "run", **KW)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"1 training answer.*train_data\[4\]"):
        train_rag(model, rows, steps=20, out_dir=tmp_path / "run", **KW)
    # only the first answer is trained on: a long alias further back is fine
    rows[4] = {**rows[4], "answers": ["paris", "paris " * (limit + 5)]}
    assert train_rag(model, rows, steps=1, out_dir=tmp_path / "ok", save_model=False, **KW)["step"] == 1


# ---- 3: user errors of the commands are one-line messages ----

def test_cli_user_errors_are_messages_not_tracebacks(setup, tmp_path, capsys, monkeypatch):
    root, qa, kb = setup
    train = _jsonl(tmp_path / "train.jsonl", [{"question": r["question"], "answers": r["answers"]} for r in qa])
    nowt = tmp_path / "gen_nowt"
    shutil.copytree(root / "generator", nowt)
    for f in nowt.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "afile").write_text("x")

    def train_args(**over):
        a = {"--kb": str(kb.path), "--train": str(train), "--generator": str(root / "generator"),
             "--out": str(tmp_path / "o"), "--steps": "2", "--batch-size": "4", "--n-docs": "3"}
        a.update(over)
        return [x for k, v in a.items() for x in (k, v)] + ["--no-progress"]

    cases = [(train_args(**{"--generator": str(nowt)}), str(nowt)),
             (train_args(**{"--out": str(tmp_path / "afile")}), "exists and is not a directory"),
             (train_args(**{"--device": "bogus"}), "--device must be cpu, cuda or cuda:N"),
             (train_args(**{"--eval-every": "2"}), "--eval-every 2 needs --dev")]
    if not torch.cuda.is_available():
        cases.append((train_args(**{"--device": "cuda"}), "sees no CUDA device"))
    for argv, msg in cases:
        assert train_cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pyrag train: error:") and msg in err and "Traceback" not in err, err

    # a damaged checkpoint: the file is named
    out = tmp_path / "run"
    assert train_cli(train_args(**{"--out": str(out), "--steps": "4"})) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    for name in ("trainer.pt", "model.safetensors"):
        f = out / "checkpoint" / name
        good = f.read_bytes()
        f.write_bytes(good[: len(good) // 2])
        assert train_cli(train_args(**{"--out": str(out), "--steps": "4"})) == 2
        err = capsys.readouterr().err
        assert str(f) in err and ("damaged" in err or "cannot be loaded" in err), err
        f.write_bytes(good)

    # eval --out a directory / --device bogus: refused before any evaluation
    monkeypatch.setattr(train_mod, "evaluate_rag", lambda *a, **k: pytest.fail("evaluated anyway"))
    for extra, msg in ((["--out", str(tmp_path)], "is a directory"), (["--device", "nope"], "--device must be"),
                       (["--limit", "0"], "--limit must be >= 1"), (["--batch-size", "0"], "--batch-size must be")):
        assert eval_cli(["--model", str(tmp_path / "o"), "--data", str(train), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


# ---- 4: a torn metrics line ----

def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(setup, tmp_path):
    _, qa, _ = setup
    out = tmp_path / "run"
    train_rag(fresh(setup), qa, steps=4, out_dir=out, stop_at=2, **KW)
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 3, "loss": 1.2')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: dropped the last line"):
        res = train_rag(fresh(setup), qa, steps=4, out_dir=out, stop_at=3, **KW)
    assert res["step"] == 3
    lines = metrics.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    metrics.write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON log line"):
        train_rag(fresh(setup), qa, steps=4, out_dir=out, **KW)


# ---- 5: evaluate_rag's batch_size ----

@pytest.mark.parametrize("bs", [0, -1, 2.0, True])
def test_evaluate_rejects_bad_batch_size(setup, bs):
    _, qa, _ = setup
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {bs!r}"):
        evaluate_rag(fresh(setup), qa[:2], batch_size=bs)


# ---- 6: learning rates by part ----

def test_frozen_question_encoder_logs_no_question_encoder_lr(setup, tmp_path):
    _, qa, _ = setup
    model = fresh(setup)
    model.question_encoder.requires_grad_(False)
    train_rag(model, qa, steps=3, out_dir=tmp_path / "run", save_model=False,
              **{**KW, "lr_generator": 1e-3, "lr_question_encoder": 5e-4, "warmup_steps": 0})
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_question_encoder"] for r in lines] == [None] * 3
    assert [r["lr_generator"] for r in lines] == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])


# ---- 7: data errors name the file ----

def test_data_errors_name_the_file_and_line(setup, tmp_path):
    model = fresh(setup)
    ok = {"question": "q?", "answers": ["a"]}
    for bad, msg in (({"question": "q?", "answers": [""]}, "'answers' must be a non-empty list of non-empty"),
                     ({"question": "  ", "answers": ["a"]}, "expected an object with a non-empty 'question' string")):
        path = _jsonl(tmp_path / "bad.jsonl", [ok, ok, bad])
        with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {msg}"):
            read_qa(path)
        with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {msg}"):
            train_rag(model, path, steps=2, out_dir=tmp_path / "run", **KW)
    # in-memory records: the same rules, named by position
    with pytest.raises(ValueError, match=r"train_data\[1\] needs 'answers'"):
        train_rag(model, [ok, {"question": "q?", "answers": [""]}], steps=2, out_dir=tmp_path / "run", **KW)
    # "answer" (one string) is read as it is accepted in memory
    assert read_qa(_jsonl(tmp_path / "one.jsonl", [{"question": "q?", "answer": "a"}]))[0]["answers"] == ["a"]
    # empty inputs name the file
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*holds no usable questions \(the file is empty\)"):
        train_rag(model, tmp_path / "empty.jsonl", steps=2, out_dir=tmp_path / "run", **KW)
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "v2.json").write_text(json.dumps(squad))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"v2\.json.*only unanswerable"):
            evaluate_rag(model, tmp_path / "v2.json")
    # JSONL under a .json name
    (tmp_path / "lines.json").write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n")
    with pytest.raises(ValueError, match=r"lines\.json: malformed JSON.*name it \.jsonl"):
        read_qa(tmp_path / "lines.json")
    assert not (tmp_path / "run").exists()


# ---- 8: Ctrl-C writes a checkpoint ----

@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test: a run started in the background (`cmd &`, nohup) inherits SIGINT
    ignored, and train_rag leaves a handler that is not Python's alone."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(setup, tmp_path, default_sigint):
    _, qa, _ = setup
    kw = {**KW, "grad_accum": 2, "save_every": 0, "log_every": 2}
    straight = fresh(setup)
    train_rag(straight, qa, steps=6, out_dir=tmp_path / "a", **kw)

    model, calls = fresh(setup), {"n": 0}

    def ctrl_c(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGINT)
        return output

    hook = model.generator.model.register_forward_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_rag(model, qa, steps=6, out_dir=tmp_path / "b", **kw)
    hook.remove()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    torch.manual_seed(99)
    resumed = fresh(setup)
    assert train_rag(resumed, qa, steps=6, out_dir=tmp_path / "b", **kw)["finished"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    # a Ctrl-C during the last step is not swallowed: the run finishes and is saved, then the caller stops
    calls["n"] = 0
    model = fresh(setup)
    hook = model.generator.model.register_forward_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="during its last step 3; the run finished and was saved"):
        train_rag(model, qa, steps=3, out_dir=tmp_path / "c", **kw)
    hook.remove()
    assert (tmp_path / "c" / "model" / "pyrag_rag.json").is_file()
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                     for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]


def test_cli_interrupt_message_and_help_are_true(setup, tmp_path, capsys, monkeypatch):
    root, qa, kb = setup
    train = _jsonl(tmp_path / "train.jsonl", [{"question": r["question"], "answers": r["answers"]} for r in qa])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_rag", interrupted)
    assert train_cli(["--kb", str(kb.path), "--train", str(train), "--generator", str(root / "generator"),
                      "--out", str(tmp_path / "cut"), "--save-every", "5", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "--save-every N writes them" not in err
    with pytest.raises(SystemExit):
        train_cli(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "when Ctrl-C stops training" in out and "(0: only at the end and on Ctrl-C) (default: 500)" in out


# ---- 9: --eval-every without a dev set ----

def test_eval_every_needs_dev_data(setup, tmp_path):
    _, qa, _ = setup
    with pytest.raises(ValueError, match="eval_every=5 needs dev_data"):
        train_rag(fresh(setup), qa, steps=10, eval_every=5, out_dir=tmp_path / "run", **KW)
    assert not (tmp_path / "run").exists()


# ---- 10: the example order ----

def test_example_order_builds_each_epochs_permutation_once(monkeypatch):
    n, seed = 7, 3
    want = [int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + pos // n))[pos % n])
            for pos in range(3 * n + 2)]
    calls = {"n": 0}
    randperm = torch.randperm

    def counting(*a, **k):
        calls["n"] += 1
        return randperm(*a, **k)

    monkeypatch.setattr(torch, "randperm", counting)
    order = train_mod.EpochOrder(n, seed)
    assert [order[pos] for pos in range(3 * n + 2)] == want  # the order train_rag always had
    assert calls["n"] == 4  # one permutation per epoch, not per example
