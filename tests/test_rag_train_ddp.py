"""Data-parallel RAG training over torch.distributed (two gloo processes on the CPU): the same update as one process
on the global batch, the same weights on every rank (rank 0's broadcast at the start), exact resume with every
rank's RNG, distributed dev evaluation equal to a single process's, a bad loss on one rank stopping all ranks, and a
checkpoint refused under another world size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_helpers import free_port, spawn_ranks
from test_rag_model import tiny_setup

from pyrag.train.rag import evaluate_rag, train_rag

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {"lr_generator": 3e-3, "lr_question_encoder": 1e-3, "show_progress": False, "log_every": 1, "seed": 5,
      "distributed": True}


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    # The models first: under an initialised process group transformers' save_pretrained writes on rank 0 only,
    # and tiny_setup saves and reloads its generator.
    model, _, qa, _ = tiny_setup(Path(root) / f"setup{rank}", n=16, n_docs=2)
    straight, first, second = (tiny_setup(Path(root) / f"drop{rank}{x}", n=16, n_docs=2, gen_dropout=0.2)[0]
                               for x in "abc")
    poisoned_model, _, _, _ = tiny_setup(Path(root) / f"nan{rank}", n=16, n_docs=2)
    extra = [tiny_setup(Path(root) / f"extra{rank}{x}", n=16, n_docs=2)[0] for x in "abc"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    try:
        # 1. two ranks x 4 questions = one process x 8; rank 1 starts from other weights, which rank 0's replace
        if rank == 1:
            with torch.no_grad():
                for p in model.generator.parameters():
                    p.add_(0.05)
        res = train_rag(model, qa, qa[:6], steps=3, batch_size=4, out_dir=os.path.join(root, "ddp"), eval_every=3,
                        eval_kwargs={"ks": (1, 2)}, **KW)
        out["params"], out["result"] = _params(model), res
        # 7 questions: not a multiple of the world size; one question per batch, so that both runs compute each
        # answer with the very same batch
        dev = qa[:7]
        ev = {"ks": (1, 2), "batch_size": 1, "return_predictions": True}
        out["eval_dist"] = evaluate_rag(model, dev, distributed=True, **ev)
        out["eval_alone"] = evaluate_rag(model, dev, **ev)

        # 2. exact resume, with dropout (so every rank's RNG state matters) and gradient accumulation
        kw = {**KW, "steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 1}
        train_rag(straight, qa, out_dir=os.path.join(root, "straight"), **kw)
        out["stopped"] = train_rag(first, qa, out_dir=os.path.join(root, "split"), stop_at=2, **kw)["step"]
        torch.manual_seed(100 + rank)  # the resumed run must not depend on the RNG state it starts with
        train_rag(second, qa, out_dir=os.path.join(root, "split"), **kw)
        out["straight"], out["resumed"] = _params(straight), _params(second)

        # 3. a non-finite loss on rank 1 only stops both ranks (no rank left waiting in a collective)
        model = poisoned_model
        if rank == 1:
            calls = {"n": 0}
            forward = model.forward

            def poisoned(*a, **k):
                o = forward(*a, **k)
                calls["n"] += 1
                if calls["n"] == 3:
                    o.loss = o.loss * float("nan")
                return o

            model.forward = poisoned
        try:
            train_rag(model, qa, steps=5, batch_size=2, out_dir=os.path.join(root, "nan"), save_every=1, **KW)
            out["nan"] = None
        except FloatingPointError as e:
            out["nan"] = str(e)

        # 4. data refused on one rank only (answers too long for rank 1's generator): both refuse, before training
        model = extra[0]
        limit = model.generator.max_answer_length
        if rank == 1:
            model.generator.max_answer_length = 1
        try:
            train_rag(model, qa, steps=3, batch_size=2, out_dir=os.path.join(root, "refused"), **KW)
            out["refused"] = None
        except ValueError as e:
            out["refused"] = str(e)
        model.generator.max_answer_length = limit
        # an error on one rank only, during a step: both stop
        if rank == 1:
            forward = model.forward

            def failing(*a, **k):
                raise ValueError("this rank's batch failed")

            model.forward = failing
        try:
            train_rag(model, qa, steps=3, batch_size=2, out_dir=os.path.join(root, "err"), **KW)
            out["err"] = None
        except (ValueError, RuntimeError) as e:
            out["err"] = f"{type(e).__name__}: {e}"
        if rank == 1:
            model.forward = forward

        # 5. out_dirs not shared: rank 0 alone writes the checkpoint, into its own directory; resuming from it is
        # refused on both ranks (not a hang, not rank 1 silently starting over)
        local = os.path.join(root, f"local{rank}")
        train_rag(extra[1], qa, steps=2, batch_size=2, out_dir=local, stop_at=1, **KW)
        try:
            train_rag(extra[1], qa, steps=2, batch_size=2, out_dir=local, **KW)
            out["unshared"] = None
        except ValueError as e:
            out["unshared"] = str(e)

        # 6. without distributed=True a call on one rank trains that rank alone (no collective to wait in)
        if rank == 0:
            kw = {**KW, "distributed": False}
            out["alone"] = train_rag(extra[2], qa, steps=1, batch_size=2, out_dir=os.path.join(root, "alone"),
                                     **kw)["step"]
        dist.barrier()
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, (2, free_port(), str(root)), 2, 600, "data-parallel workers")
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_make_the_update_of_one_process_on_the_global_batch(two_ranks, tmp_path):
    root, (r0, r1) = two_ranks
    for n in r0["params"]:  # every rank holds the same model, bit for bit
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    model, _, qa, _ = tiny_setup(tmp_path / "one", n=16, n_docs=2)
    train_rag(model, qa, qa[:6], steps=3, batch_size=8, out_dir=tmp_path / "run", eval_every=3,
              eval_kwargs={"ks": (1, 2)}, **{**KW, "distributed": False})
    one = _params(model)
    start, *_ = tiny_setup(tmp_path / "start", n=16, n_docs=2)
    assert any(not torch.equal(p, one[n]) for n, p in start.named_parameters())  # training moved the weights
    # Summation order differs (two half-batch means averaged vs one mean): rounding only, at a few % of lr (see
    # test_rag_train.test_gradient_accumulation_equals_the_larger_batch; key biases have ~zero gradients)
    for n in one:
        if not n.endswith("k_proj.bias"):
            torch.testing.assert_close(r0["params"][n], one[n], rtol=1e-4, atol=2e-4, msg=lambda m, n=n: f"{n}: {m}")
    # rank 0 alone wrote the log: one line per step (+ the dev line), with the global batch's loss and norm
    ddp_log = [json.loads(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in ddp_log] == [sorted(r) for r in one_log]
    for a, b in zip(ddp_log, one_log):
        if "loss" in a:
            assert a["examples"] == b["examples"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert r0["result"]["finished"] and r0["result"]["dev"] == r1["result"]["dev"]
    assert (root / "ddp" / "model").is_dir()


def test_distributed_evaluation_equals_one_process(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        assert r["eval_dist"] == r["eval_alone"], (r["eval_dist"], r["eval_alone"])
        assert r["eval_dist"]["n"] == 7 and len(r["eval_dist"]["predictions"]) == 7


def test_resume_is_exact_across_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["stopped"] == r1["stopped"] == 2
    for r in (r0, r1):
        for n in r["straight"]:
            assert torch.equal(r["straight"][n], r["resumed"][n]), n
    # dropout drew different masks on the two ranks, yet both hold the same (averaged) model
    assert all(torch.equal(r0["resumed"][n], r1["resumed"][n]) for n in r0["resumed"])


def test_a_bad_loss_on_one_rank_stops_every_rank(two_ranks):
    root, (r0, r1) = two_ranks
    # rank 1's third forward (step 3) is poisoned: both ranks stop there, the step-2 checkpoint stays
    assert r1["nan"] is not None and "loss is nan at step 3" in r1["nan"], r1["nan"]
    assert r0["nan"] is not None and "loss is non-finite on another rank at step 3" in r0["nan"], r0["nan"]
    assert "(step 2)" in r0["nan"]
    state = json.loads((root / "nan" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2


def test_a_checkpoint_is_refused_under_another_world_size(two_ranks, tmp_path):
    root, _ = two_ranks
    model, _, qa, _ = tiny_setup(tmp_path / "one", n=16, n_docs=2)
    kw = {**KW, "steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 1, "distributed": False}
    with pytest.raises(ValueError, match="written with world_size=2 \\(now 1\\)"):
        train_rag(model, qa, out_dir=root / "split", **kw)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        train_rag(model, qa, out_dir=tmp_path / "x", **{**kw, "distributed": True})


def test_pyrag_train_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m pyrag train ...` (each process joins the group from torchrun's environment):
    the saved model equals `pyrag train` in one process with twice the batch, and only rank 0 prints."""
    import subprocess
    import sys

    import pyrag
    from pyrag.models.rag import RagModel
    from pyrag.train.rag_cli import train_cli

    _, _, qa, kb = tiny_setup(tmp_path, n=16, n_docs=2)
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"question": r["question"], "answers": r["answers"]}) + "\n" for r in qa)
    common = ["--kb", str(kb.path), "--train", str(tmp_path / "train.jsonl"), "--generator",
              str(tmp_path / "generator"), "--steps", "2", "--n-docs", "2", "--lr-generator", "3e-3",
              "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(pyrag.__file__)), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "pyrag", "train", *common, "--batch-size", "4", "--out", str(tmp_path / "ddp")],
        check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"finished": true') == 1, proc.stdout  # the result, printed by rank 0 alone
    assert train_cli([*common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    ddp, one = (RagModel.from_pretrained(tmp_path / d / "model") for d in ("ddp", "one"))
    a, b = dict(ddp.named_parameters()), dict(one.named_parameters())
    assert a.keys() == b.keys()
    for n, value in a.items():
        if not n.endswith("k_proj.bias"):
            torch.testing.assert_close(value, b[n], rtol=1e-4, atol=2e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_an_error_on_one_rank_stops_every_rank(two_ranks):
    root, (r0, r1) = two_ranks
    assert r1["err"] is not None and "ValueError: this rank's batch failed" in r1["err"], r1["err"]
    assert r0["err"] is not None and "another rank failed at step 1" in r0["err"], r0["err"]
    # refused up front on one rank: every rank refuses, naming it, before anything is written
    assert r1["refused"] is not None and "max_answer_length=1 tokens" in r1["refused"], r1["refused"]
    assert r0["refused"] is not None and r0["refused"].startswith("rank 1 refused the training data"), r0["refused"]
    assert not (root / "refused").exists()


def test_out_dir_must_be_shared_by_the_ranks(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        assert r["unshared"] is not None and "visible on rank(s) [0] only" in r["unshared"], r["unshared"]


def test_without_distributed_one_rank_trains_alone(two_ranks):
    _, (r0, _) = two_ranks
    assert r0["alone"] == 1
