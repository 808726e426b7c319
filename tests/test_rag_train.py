"""Joint RAG training: a tiny RAG-Token model learns a synthetic task where both answer EM and the retriever's
gold-passage recall@1 must rise (the question encoder learns from the generator's loss alone); exact resume;
NaN handling; and the `pyrag train / ask / eval` commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_rag_model import tiny_setup

from pyrag.metrics import exact_match, f1_score
from pyrag.models.rag import RagModel
from pyrag.train.rag import evaluate_rag, train_rag
from pyrag.train.rag_cli import ask_cli, eval_cli, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_kwargs(**kw):
    base = {"batch_size": 8, "lr_generator": 3e-3, "lr_question_encoder": 1e-3, "warmup_steps": 10,
                "warmup_steps_question_encoder": 60, "show_progress": False}
    base.update(kw)
    return base


@pytest.mark.parametrize("seed", [0, 1])
def test_training_raises_answer_em_and_gold_passage_recall(tmp_path, seed):
    model, _passages, qa, kb = tiny_setup(tmp_path, n=64, n_docs=3, seed=seed)
    dev = qa[:40]
    before = evaluate_rag(model, dev, ks=(1, 3))
    # the bag-of-words retriever ranks two distractors above every gold passage, but keeps it in the top 3
    assert before["gold_recall@1"] == 0.0 and before["gold_recall@3"] == 1.0
    assert before["em"] <= 0.1
    kb_vectors = kb.vectors(torch.arange(len(kb))).clone()
    qe_before = {n: p.detach().clone() for n, p in model.question_encoder.named_parameters()}
    res = train_rag(model, qa, dev, steps=150, out_dir=tmp_path / "run", eval_every=75, **_train_kwargs())
    after = evaluate_rag(model, dev, ks=(1, 3))
    assert after["em"] >= 0.8, after
    assert after["gold_recall@1"] >= 0.8, after
    assert res["finished"] and res["dev"]["em"] == after["em"]
    # only the question encoder moved the retrieval: the stored passage vectors are untouched
    torch.testing.assert_close(kb.vectors(torch.arange(len(kb))), kb_vectors, rtol=0, atol=0)
    assert any(not torch.equal(p, qe_before[n]) for n, p in model.question_encoder.named_parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "dev_em" in r] == [75, 150]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines if "loss" in r)
    # the saved model answers like the trained one
    loaded = RagModel.from_pretrained(res["model"])
    qs = [r["question"] for r in dev[:8]]
    assert loaded.generate(qs, num_beams=1).answers == model.generate(qs, num_beams=1).answers


def test_resume_is_exact(tmp_path):
    # log windows of 2 steps, the stop at step 3 inside one: the resumed log must still equal the straight one
    kw = _train_kwargs(grad_accum=2, batch_size=4, eval_every=0, save_every=3, log_every=2, seed=3, warmup_steps=2,
                       warmup_steps_question_encoder=3)
    straight, _, qa, _ = tiny_setup(tmp_path / "a", n=16, gen_dropout=0.1)
    train_rag(straight, qa, steps=8, out_dir=tmp_path / "a" / "run", **kw)

    first, _, _, _ = tiny_setup(tmp_path / "b", n=16, gen_dropout=0.1)
    res = train_rag(first, qa, steps=8, out_dir=tmp_path / "b" / "run", stop_at=3, **kw)
    assert res["step"] == 3 and not res["finished"] and "model" not in res
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    second, _, _, _ = tiny_setup(tmp_path / "c", n=16, gen_dropout=0.1)
    res = train_rag(second, qa, steps=8, out_dir=tmp_path / "b" / "run", **kw)
    assert res["step"] == 8 and res["finished"]

    a, b = straight.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # a checkpoint refuses settings that would not continue the same run
    res = train_rag(first, qa, steps=8, out_dir=tmp_path / "d" / "run", stop_at=2, **kw)
    before = {n: p.detach().clone() for n, p in first.state_dict().items()}
    for change in ({"lr_generator": 1e-2}, {"steps": 9}, {"grad_accum": 1}, {"seed": 4}, {"weight_decay": 0.1},
                   {"max_grad_norm": 5.0}):
        with pytest.raises(ValueError, match=f"written with {next(iter(change))}="):
            train_rag(first, qa, out_dir=tmp_path / "d" / "run", **{"steps": 8, **kw, **change})
    # refused before anything was loaded: the caller's model is as it was
    assert all(torch.equal(p, before[n]) for n, p in first.state_dict().items())
    log_a = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in log_a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in log_b]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    model, _, qa, _ = tiny_setup(tmp_path, n=16)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] > 5:  # steps 1-5 are fine, the 6th forward produces NaN logits
            output.logits = output.logits * float("nan")
        return output

    model.generator.model.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 6.*checkpoint .*\(step 4\)"):
        train_rag(model, qa, steps=10, out_dir=tmp_path / "run", save_every=2,
                  **_train_kwargs(warmup_steps_question_encoder=5))
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "model").exists()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"question": r["question"], "answers": r["answers"]}) + "\n" for r in rows))


def test_cli_train_ask_eval(tmp_path, capsys, monkeypatch):
    _, _passages, qa, kb = tiny_setup(tmp_path, n=32)
    _write_jsonl(tmp_path / "train.jsonl", qa)
    _write_jsonl(tmp_path / "dev.jsonl", qa[:8])
    out = tmp_path / "out"
    rc = train_cli(["--kb", str(kb.path), "--train", str(tmp_path / "train.jsonl"), "--dev",
                    str(tmp_path / "dev.jsonl"), "--generator", str(tmp_path / "generator"), "--mode", "sequence",
                    "--out", str(out), "--steps", "6", "--n-docs", "3", "--eval-every", "6", "--lr-generator",
                    "1e-3", "--no-progress"])
    assert rc == 0
    assert (out / "model" / "pyrag_rag.json").is_file() and (out / "checkpoint").is_dir()
    assert json.loads((out / "model" / "pyrag_rag.json").read_text())["mode"] == "sequence"
    capsys.readouterr()

    assert ask_cli(["--model", str(out), "--json", "--num-beams", "2", "--max-new-tokens", "4",
                    qa[0]["question"], qa[1]["question"]]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["question"] for r in got] == [qa[0]["question"], qa[1]["question"]]
    for r in got:
        assert len(r["passages"]) == 3
        assert abs(sum(p["prior"] for p in r["passages"]) - 1) < 1e-5
        assert abs(sum(p["posterior"] for p in r["passages"]) - 1) < 1e-5
        assert all(p["title"] in r["question"] for p in r["passages"][:1])  # the name-matching passages

    assert ask_cli(["--model", str(out), qa[0]["question"]]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Q: {qa[0]['question']}\nA: ") and "posterior" in text

    # SQuAD JSON works as well as JSONL
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": str(i), "question": r["question"], "answers": [{"text": a, "answer_start": 0} for a in r["answers"]]}
        for i, r in enumerate(qa[:6])]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    for data in ("dev.jsonl", "dev.json"):
        assert eval_cli(["--model", str(out / "model"), "--data", str(tmp_path / data), "--no-progress",
                         "--n-docs", "2", "--out", str(tmp_path / "metrics.json")]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert set(rep) >= {"em", "f1", "recall@1", "recall@2", "mrr", "n"} and 0 <= rep["em"] <= rep["f1"] <= 1
        assert rep["n"] == (8 if data == "dev.jsonl" else 6)
        preds = json.loads((tmp_path / "metrics.json").read_text())["predictions"]
        assert len(preds) == rep["n"]
        # the reported EM / F1 are those of the written predictions against the gold answers
        gold = [r["answers"] for r in qa[: rep["n"]]]
        assert rep["em"] == pytest.approx(sum(exact_match(p, a) for p, a in zip(preds, gold)) / rep["n"])
        assert rep["f1"] == pytest.approx(sum(f1_score(p, a) for p, a in zip(preds, gold)) / rep["n"])

    # RAG-Token through the command line as well
    # (--dev without --eval-every: evaluated once, at the end)
    rc = train_cli(["--kb", str(kb.path), "--train", str(tmp_path / "train.jsonl"), "--generator",
                    str(tmp_path / "generator"), "--mode", "token", "--out", str(tmp_path / "tok"), "--steps", "2",
                    "--n-docs", "2", "--no-progress", "--dev", str(tmp_path / "dev.jsonl")])
    assert rc == 0
    assert json.loads((tmp_path / "tok" / "model" / "pyrag_rag.json").read_text())["mode"] == "token"
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and res["dev"]["n"] == 8
    assert eval_cli(["--model", str(tmp_path / "tok"), "--data", str(tmp_path / "dev.jsonl"), "--limit", "-1"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err

    # Ctrl-C during training: exit 130, naming the checkpoint a rerun resumes from
    import pyrag.train.rag as train_mod

    def interrupted(*a, out_dir, **k):
        (Path(out_dir) / "checkpoint").mkdir(parents=True)
        (Path(out_dir) / "checkpoint" / "state.json").write_text('{"step": 7}')
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_rag", interrupted)
    assert train_cli(["--kb", str(kb.path), "--train", str(tmp_path / "train.jsonl"), "--generator",
                      str(tmp_path / "generator"), "--out", str(tmp_path / "cut"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last checkpoint is step 7" in err and "Rerun the same command" in err

    assert eval_cli(["--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "dev.jsonl")]) == 2
    assert "no pyrag RAG model" in capsys.readouterr().err
    assert train_cli(["--kb", str(tmp_path / "nokb"), "--train", str(tmp_path / "train.jsonl"), "--generator",
                      str(tmp_path / "generator"), "--out", str(tmp_path / "o2")]) == 2
    assert "knowledge base directory not found" in capsys.readouterr().err


def _logged_lrs(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["lr_generator"], r["lr_question_encoder"]) for r in lines if "lr_generator" in r]


def test_bad_hyperparameters_are_refused(tmp_path):
    model, _passages, qa, _kb = tiny_setup(tmp_path, n=16, n_docs=2)
    for kw, msg in (({"lr_generator": -1e-3}, "lr_generator must be a finite number >= 0"),
                    ({"lr_question_encoder": float("nan")}, "lr_question_encoder must be a finite"),
                    ({"weight_decay": -0.1}, "weight_decay must be"),
                    ({"max_grad_norm": -1.0}, "max_grad_norm must be a number >= 0"),
                    ({"eval_every": -2}, "eval_every must be an int >= 0"),
                    ({"n_docs": 99}, "n_docs=99 is larger than the knowledge base")):
        with pytest.raises(ValueError, match=msg):
            train_rag(model, qa, steps=100, out_dir=tmp_path / "run", **{**_train_kwargs(), **kw})
    assert not (tmp_path / "run").exists()  # refused before anything was written
    from pyrag.models.rag import RagToken

    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        RagToken.from_parts(model.question_encoder, tmp_path / "generator", model.kb, label_smoothing="0.1")
    with pytest.raises(ValueError, match="questions is empty"):
        model([], [])
    with pytest.raises(ValueError, match="questions is empty"):
        model.generate([])


def test_separate_learning_rates_and_warmups(tmp_path):
    # generator: warmup 2 then linear decay to 0 at step 4; question encoder: its own, longer warmup (4 steps)
    model, _passages, qa, _kb = tiny_setup(tmp_path, n=16, n_docs=2)
    train_rag(model, qa, steps=4, out_dir=tmp_path / "run", log_every=1, save_model=False,
              **_train_kwargs(batch_size=4, lr_generator=1e-3, lr_question_encoder=2e-4, warmup_steps=2,
                              warmup_steps_question_encoder=4))
    want = [(1e-3, 1e-4), (1e-3, 1.5e-4), (5e-4, 2e-4), (0.0, 0.0)]  # lr in effect after steps 1..4
    got = _logged_lrs(tmp_path / "run")
    assert len(got) == 4
    for (g, q), (wg, wq) in zip(got, want):
        assert g == pytest.approx(wg, abs=1e-12) and q == pytest.approx(wq, abs=1e-12), got


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # 2 micro-batches of 4 questions = one batch of 8 (same questions in the same order, mean loss): same update
    results, logs = [], []
    for name, bs, accum in (("a", 8, 1), ("b", 4, 2)):
        model, _passages, qa, _kb = tiny_setup(tmp_path / name, n=16, n_docs=2)
        train_rag(model, qa, steps=1, out_dir=tmp_path / name / "run", grad_accum=accum, max_grad_norm=None,
                  save_model=False, log_every=1,
                  **_train_kwargs(batch_size=bs, warmup_steps=0, warmup_steps_question_encoder=0))
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        logs.append(json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0]))
    # the mean loss and the (pre-clip) gradient norm: a sum instead of a mean would double both
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-5), logs
    assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-4), logs
    a, b = results
    assert a.keys() == b.keys()
    # Adam's first step moves every weight by about +-lr (3e-3) whatever its gradient's size, so where a gradient
    # is tiny rounding shows: a tolerance of a few % of lr. Key biases are skipped: their gradient is zero up to
    # rounding (softmax ignores a shift common to every key), so rounding alone decides their update.
    for n in a:
        if not n.endswith("k_proj.bias"):
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # and the update did something (the comparison is not between two untouched models)
    model, *_ = tiny_setup(tmp_path / "c", n=16, n_docs=2)
    assert any(not torch.equal(p, a[n]) for n, p in model.named_parameters())


def test_clipping_caps_the_update(tmp_path, monkeypatch):
    # The gradients AdamW steps with: their global norm (over both parts) is the logged pre-clip norm without
    # clipping, and max_grad_norm with it whenever the logged norm is larger
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    moved = {}
    for clip in (None, 1e-4):
        seen.clear()
        model, _passages, qa, _kb = tiny_setup(tmp_path / str(clip), n=16, n_docs=2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = tmp_path / str(clip) / "run"
        train_rag(model, qa, steps=2, out_dir=out, max_grad_norm=clip, save_model=False, log_every=1,
                  **_train_kwargs(batch_size=4, warmup_steps=0, warmup_steps_question_encoder=0))
        logged = [json.loads(x)["grad_norm"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(seen) == len(logged) == 2
        for pre, post in zip(logged, seen):
            assert pre > 1e-3  # the clip below is active
            want = pre if clip is None else clip
            assert post == pytest.approx(want, rel=1e-3), (clip, pre, post)
        moved[clip] = sum(float((p.detach() - before[n]).abs().sum()) for n, p in model.named_parameters())
    # Adam's first steps are scale-free, so clipping shows only from step 2 on: it must still change the update
    assert moved[1e-4] != pytest.approx(moved[None], rel=1e-3), moved
