"""pyrag.compat against the installed transformers: hf_rag_*_nll and marginalize equal HF's RAG get_nll /
marginalize (forward and gradients, fp32, max abs error <= 1e-5), patch_transformers() on real tiny RAG
models, and clear errors for bad input."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import BartConfig, DPRConfig, RagConfig
from transformers.models.rag.modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

import pyrag
from pyrag import compat
from pyrag.compat import hf_rag_sequence_nll, hf_rag_token_marginalize, hf_rag_token_nll

assert not compat.is_transformers_patched(), "another test left transformers patched"
HF_SEQ_GET_NLL = RagSequenceForGeneration.__dict__["get_nll"]
HF_TOK_GET_NLL = RagTokenForGeneration.__dict__["get_nll"]
HF_TOK_MARGINALIZE = RagTokenForGeneration.__dict__["marginalize"]

PAD, BOS, START = 1, 0, 2  # BART's ids: decoder inputs start with </s> (2), then <s> (0)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _always_unpatched():
    yield
    compat.unpatch_transformers()


def _stub(n_docs, pad=PAD, top_bos=None, generator_bos=BOS):
    """The parts of a RAG model HF's get_nll reads: config.n_docs, config.bos_token_id, config.generator.*,
    and (RAG-Token) self.marginalize — bound to HF's original so the reference never runs pyrag code."""
    stub = types.SimpleNamespace(config=types.SimpleNamespace(
        n_docs=n_docs, bos_token_id=top_bos,
        generator=types.SimpleNamespace(pad_token_id=pad, bos_token_id=generator_bos)))
    stub.marginalize = types.MethodType(HF_TOK_MARGINALIZE, stub)
    return stub


def _hf_nll(mode, seq_logits, doc_scores, target, *, n_docs, reduce_loss, epsilon, exclude_bos_score, **stub_kw):
    stub = _stub(n_docs, **stub_kw)
    if mode == "sequence":
        return HF_SEQ_GET_NLL(stub, seq_logits, doc_scores, target, reduce_loss=reduce_loss, epsilon=epsilon,
                              exclude_bos_score=exclude_bos_score, n_docs=n_docs)
    return HF_TOK_GET_NLL(stub, seq_logits, doc_scores, target, reduce_loss=reduce_loss, epsilon=epsilon,
                          n_docs=n_docs)


PYRAG_NLL = {"sequence": hf_rag_sequence_nll, "token": hf_rag_token_nll}


def _inputs(B, K, T, V, *, lengths=None, bos_rows="all", seed=0, device="cpu"):
    """Random seq_logits [B*K, T, V], doc_scores [B, K] and HF decoder inputs [B, T]: START, then BOS on the
    rows bos_rows selects ("all" / "some" / "none"), then tokens, padded after lengths[b]."""
    g = torch.Generator().manual_seed(seed)
    seq_logits = (torch.randn(B * K, T, V, generator=g) * 2).to(device).requires_grad_()
    doc_scores = (torch.randn(B, K, generator=g) * 2).to(device).requires_grad_()
    target = torch.randint(3, V, (B, T), generator=g)
    target[:, 0] = START
    if T >= 2:
        with_bos = {"all": range(B), "some": range(1), "none": range(0)}[bos_rows]
        target[list(with_bos), 1] = BOS
    for b, n in enumerate(lengths or []):
        target[b, n:] = PAD
    return seq_logits, doc_scores, target.to(device)


def _assert_close(name, got, want, atol=ATOL):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != HF {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != HF {want.dtype}"
    assert torch.isfinite(want).all(), f"{name}: HF's value is not finite; the test inputs are wrong"
    diff = (got.double() - want.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() and diff.max() > atol:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        pytest.fail(f"{name}: max abs error {diff.max().item():.3g} > {atol} at index {idx}: "
                    f"pyrag {got[idx].item()!r} vs HF {want[idx].item()!r}")


def _compare(mode, B, K, T, V, *, lengths, bos_rows, exclude_bos_score, reduce_loss, epsilon, seed=0, device="cpu",
             **stub_kw):
    seq_logits, doc_scores, target = _inputs(B, K, T, V, lengths=lengths, bos_rows=bos_rows, seed=seed,
                                             device=device)
    want = _hf_nll(mode, seq_logits, doc_scores, target, n_docs=K, reduce_loss=reduce_loss, epsilon=epsilon,
                   exclude_bos_score=exclude_bos_score, **stub_kw)
    # An absolute 1e-5 bound means something only while one fp32 ulp of the loss is below it (|loss| < 128);
    # any two summation orders (HF's and the kernel's) may differ by an ulp.
    assert want.abs().max() < 128, "test inputs give losses too large for an absolute 1e-5 comparison"
    stub = _stub(K, **stub_kw)
    bos = stub.config.bos_token_id or stub.config.generator.bos_token_id
    got = PYRAG_NLL[mode](seq_logits, doc_scores, target, pad_token_id=PAD, bos_token_id=bos, n_docs=K,
                          reduce_loss=reduce_loss, epsilon=epsilon, exclude_bos_score=exclude_bos_score)
    _assert_close(f"{mode} loss", got, want)
    # A non-uniform upstream gradient exercises the backward beyond loss.sum().
    w = (torch.rand(want.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(device)
    gw = torch.autograd.grad((want * w).sum(), [seq_logits, doc_scores])
    gg = torch.autograd.grad((got * w).sum(), [seq_logits, doc_scores])
    _assert_close(f"{mode} d/d seq_logits", gg[0], gw[0])
    _assert_close(f"{mode} d/d doc_scores", gg[1], gw[1])


SHAPES = {  # (B, K, T, V, lengths): ragged sizes, rows padded at different places
    "ragged": (3, 5, 7, 1001, [7, 4, 2]),  # row 2: shifted position 1 is padding -> no passage prior (HF)
    "T1": (2, 3, 1, 1001, None),           # everything is the appended pad: HF's loss is -log K
    "T2": (3, 2, 2, 1001, [2, 2, 1]),      # position 1 is always the appended pad
}


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("exclude_bos_score", [False, True])
@pytest.mark.parametrize("bos_rows", ["all", "some"])
@pytest.mark.parametrize("reduce_loss", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_hf_nll_matches_transformers_get_nll(mode, shape, exclude_bos_score, bos_rows, reduce_loss, epsilon):
    B, K, T, V, lengths = SHAPES[shape]
    _compare(mode, B, K, T, V, lengths=lengths, bos_rows=bos_rows, exclude_bos_score=exclude_bos_score,
             reduce_loss=reduce_loss, epsilon=epsilon)


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("reduce_loss", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_hf_nll_matches_transformers_get_nll_with_bart_vocabulary(mode, reduce_loss, epsilon):
    # V = 50265 (BART's): long vocabulary rows, and smoothing sums of ~5e5 whose fp32 rounding HF also carries.
    _compare(mode, 2, 3, 5, 50265, lengths=[5, 3], bos_rows="all", exclude_bos_score=True,
             reduce_loss=reduce_loss, epsilon=epsilon)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_hf_nll_matches_transformers_with_an_all_padding_row_and_no_bos(mode):
    # Row 1 has only its start token (every shifted position is padding); bos_token_id None is T5's case.
    _compare(mode, 3, 4, 6, 1001, lengths=[6, 1, 3], bos_rows="all", exclude_bos_score=True,
             reduce_loss=False, epsilon=0.1, generator_bos=None)


@pytest.mark.parametrize("top_bos, generator_bos", [(None, 0), (0, None), (5, 0)])
def test_sequence_bos_lookup_follows_hf_or_quirk(top_bos, generator_bos):
    # HF reads `config.bos_token_id or config.generator.bos_token_id`: a top-level 0 falls through to the
    # generator's id (None here, so no BOS exclusion); the patched method must do the same.
    seq_logits, doc_scores, target = _inputs(2, 3, 6, 101, lengths=[6, 4])
    stub = _stub(3, top_bos=top_bos, generator_bos=generator_bos)
    want = HF_SEQ_GET_NLL(stub, seq_logits, doc_scores, target, epsilon=0.1, exclude_bos_score=True)
    with compat.patch_transformers():
        got = RagSequenceForGeneration.get_nll(stub, seq_logits, doc_scores, target, epsilon=0.1,
                                               exclude_bos_score=True)
    _assert_close("patched sequence get_nll", got, want)


def test_bos_exclusion_changes_the_loss_only_when_every_row_starts_with_bos():
    # Guards the test inputs themselves: exclusion must matter for "all" and be a no-op for "some".
    for bos_rows, differs in (("all", True), ("some", False)):
        seq_logits, doc_scores, target = _inputs(3, 2, 5, 101, bos_rows=bos_rows)
        a, b = (hf_rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=PAD, bos_token_id=BOS,
                                    n_docs=2, exclude_bos_score=e) for e in (False, True))
        assert (not torch.allclose(a, b)) == differs


def test_token_marginalize_matches_transformers():
    seq_logits, doc_scores, _ = _inputs(3, 5, 7, 1001)
    want = HF_TOK_MARGINALIZE(_stub(5), seq_logits, doc_scores)
    got = hf_rag_token_marginalize(seq_logits, doc_scores, n_docs=5)
    _assert_close("marginalize", got, want)
    # Upstream gradient scaled by 1/sqrt(V) so d/d seq_logits is O(1), as the 1e-5 absolute bound assumes.
    w = torch.randn(want.shape) / want.shape[-1] ** 0.5
    gw = torch.autograd.grad((want * w).sum(), [seq_logits, doc_scores])
    gg = torch.autograd.grad((got * w).sum(), [seq_logits, doc_scores])
    _assert_close("marginalize d/d seq_logits", gg[0], gw[0])
    _assert_close("marginalize d/d doc_scores", gg[1], gw[1])
    # One decoding step, [B*K, V] -> [B, 1, V], as HF's view gives.
    step = seq_logits[:, 3].detach()
    _assert_close("marginalize one step", hf_rag_token_marginalize(step, doc_scores, n_docs=5),
                  HF_TOK_MARGINALIZE(_stub(5), step, doc_scores))


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_hf_nll_matches_transformers_get_nll_on_cuda(mode, epsilon):
    _compare(mode, 3, 5, 7, 1001, lengths=[7, 4, 2], bos_rows="all", exclude_bos_score=True, reduce_loss=False,
             epsilon=epsilon, device="cuda")
    _compare(mode, 2, 3, 5, 50265, lengths=[5, 3], bos_rows="some", exclude_bos_score=True, reduce_loss=True,
             epsilon=epsilon, device="cuda")


@pytest.mark.skipif(not pyrag.has_cuda_kernels(), reason="needs a GPU and pyrag's CUDA kernels")
def test_token_marginalize_matches_transformers_on_cuda():
    seq_logits, doc_scores, _ = _inputs(3, 5, 7, 1001, device="cuda")
    _assert_close("marginalize (cuda)", hf_rag_token_marginalize(seq_logits, doc_scores, n_docs=5),
                  HF_TOK_MARGINALIZE(_stub(5), seq_logits, doc_scores))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if pyrag.has_cuda_kernels() else []))
def test_result_dtype_follows_hf_under_autocast(device):
    # HF's loss has its log_softmax outputs' dtype: under CUDA autocast that is fp32 even for bf16 logits (CPU
    # autocast leaves log_softmax alone); pyrag's results must have the same dtype and values.
    seq_logits, doc_scores, target = _inputs(2, 3, 5, 101, lengths=[5, 3], device=device)
    z, s = seq_logits.detach().bfloat16(), doc_scores.detach().bfloat16()
    kw = {"n_docs": 3, "reduce_loss": False, "epsilon": 0.1, "exclude_bos_score": False}
    with torch.autocast(device, dtype=torch.bfloat16):
        for mode in ("sequence", "token"):
            want = _hf_nll(mode, z, s, target, **kw)
            got = PYRAG_NLL[mode](z, s, target, pad_token_id=PAD, bos_token_id=BOS, **kw)
            assert got.dtype == want.dtype, mode
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        want = HF_TOK_MARGINALIZE(_stub(3), z, s)
        got = hf_rag_token_marginalize(z, s, n_docs=3)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)


# ---- patch_transformers() on real tiny RAG models (DPR question encoder + BART generator, random weights) ----

def _tiny_rag(cls, *, exclude_bos_score, label_smoothing):
    # initializer_range 0.5 for the question encoder: at the default 0.02 its embedding LayerNorm divides by a
    # std of ~0.03 and amplifies last-bit differences in d loss/d doc_scores to ~2e-5 in the embedding
    # gradients, which would test the model's conditioning rather than pyrag.
    question_encoder = DPRConfig(vocab_size=101, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32,
                                 initializer_range=0.5)
    generator = BartConfig(vocab_size=1001, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=START, decoder_start_token_id=START,
                           forced_bos_token_id=None)
    config = RagConfig(question_encoder=question_encoder.to_dict(), generator=generator.to_dict(), n_docs=3,
                       exclude_bos_score=exclude_bos_score, label_smoothing=label_smoothing)
    torch.manual_seed(0)
    return cls(config=config).eval()  # eval: no dropout, so both runs see the same function


def _rag_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, K, L = 2, 3, 6
    return {
        "input_ids": torch.randint(3, 101, (B, 5), generator=g),
        "context_input_ids": torch.randint(3, 1001, (B * K, L), generator=g),
        "context_attention_mask": torch.ones(B * K, L, dtype=torch.long),
        "passage_vectors": torch.randn(B, K, 16, generator=g),
        "labels": torch.tensor([[START, BOS, 5, 6, 7, START], [START, BOS, 8, START, PAD, PAD]]),
    }


def _rag_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    # doc_scores from the question encoder, as in HF's RAG training without a retriever object: the only path
    # by which the loss reaches the question encoder's parameters.
    q = model.question_encoder(batch["input_ids"])[0]
    doc_scores = torch.bmm(q[:, None], batch["passage_vectors"].transpose(1, 2)).squeeze(1)
    out = model(context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"],
                doc_scores=doc_scores, labels=batch["labels"])
    out.loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("cls", [RagSequenceForGeneration, RagTokenForGeneration])
@pytest.mark.parametrize("exclude_bos_score, label_smoothing", [(False, 0.0), (True, 0.1)])
def test_patch_transformers_gives_same_loss_and_parameter_gradients(cls, exclude_bos_score, label_smoothing):
    model = _tiny_rag(cls, exclude_bos_score=exclude_bos_score, label_smoothing=label_smoothing)
    batch = _rag_batch()
    loss0, logits0, grads0 = _rag_loss_and_grads(model, batch)
    assert any(".question_encoder." in n for n in grads0) and any(".generator." in n for n in grads0)

    handle = compat.patch_transformers()
    assert compat.is_transformers_patched() and handle.applied
    assert cls.__dict__["get_nll"] is not (HF_SEQ_GET_NLL if cls is RagSequenceForGeneration else HF_TOK_GET_NLL)
    loss1, logits1, grads1 = _rag_loss_and_grads(model, batch)
    compat.unpatch_transformers()

    _assert_close("model loss", loss1, loss0)
    _assert_close("model logits (marginalized for RAG-Token)", logits1, logits0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        _assert_close(f"grad {name}", grads1[name], grads0[name])


@pytest.mark.parametrize("cls", [RagSequenceForGeneration, RagTokenForGeneration])
def test_patch_transformers_keeps_float64_models_working(cls):
    # fp64 RAG models (gradient checks, ground-truth runs) take the plain-torch reference through the patch.
    model = _tiny_rag(cls, exclude_bos_score=True, label_smoothing=0.1).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _rag_batch().items()}
    loss0, _, grads0 = _rag_loss_and_grads(model, batch)
    compat.patch_transformers()
    try:
        loss1, _, grads1 = _rag_loss_and_grads(model, batch)
    finally:
        compat.unpatch_transformers()
    assert loss1.dtype == torch.float64
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_hf_nll_second_derivatives_match_transformers(mode):
    # A gradient penalty through the loss (create_graph=True) equals HF's: the fused ops recompute their backward
    # differentiably in that mode instead of treating the saved passage posteriors as constants.
    seq_logits, doc_scores, target = _inputs(3, 4, 6, 29, lengths=[6, 4, 2])
    kw = {"n_docs": 4, "reduce_loss": False, "epsilon": 0.1, "exclude_bos_score": False}
    fns = {"pyrag": lambda z, s: PYRAG_NLL[mode](z, s, target, pad_token_id=PAD, bos_token_id=BOS, **kw),
           "hf": lambda z, s: _hf_nll(mode, z, s, target, **kw)}
    out = {}
    for name, fn in fns.items():
        z, s = seq_logits.detach().clone().requires_grad_(), doc_scores.detach().clone().requires_grad_()
        gz, gs = torch.autograd.grad(fn(z, s).sum(), (z, s), create_graph=True)
        out[name] = torch.autograd.grad((gz ** 2).sum() + (gs ** 2).sum(), (z, s))
    for got, want in zip(out["pyrag"], out["hf"]):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_patched_rag_token_generate_gives_the_same_tokens():
    model = _tiny_rag(RagTokenForGeneration, exclude_bos_score=False, label_smoothing=0.0)
    batch = _rag_batch(seed=3)
    with torch.no_grad():
        q = model.question_encoder(batch["input_ids"])[0]
        doc_scores = torch.bmm(q[:, None], batch["passage_vectors"].transpose(1, 2)).squeeze(1) * 10
    kw = {"context_input_ids": batch["context_input_ids"], "context_attention_mask": batch["context_attention_mask"],
          "doc_scores": doc_scores, "max_length": 8, "num_beams": 2, "n_docs": 3}
    want = model.generate(**kw)
    with compat.patch_transformers():
        got = model.generate(**kw)
    assert torch.equal(got, want)


def test_unpatch_restores_the_original_functions_and_patch_is_idempotent():
    first = compat.patch_transformers()
    patched = RagTokenForGeneration.__dict__["get_nll"]
    second = compat.patch_transformers()  # no double wrapping
    assert first.applied and not second.applied
    assert RagTokenForGeneration.__dict__["get_nll"] is patched
    with second:  # exiting a handle that did not patch leaves the patch in place
        pass
    assert compat.is_transformers_patched()
    compat.unpatch_transformers()
    compat.unpatch_transformers()  # a no-op
    assert not compat.is_transformers_patched()
    assert RagSequenceForGeneration.__dict__["get_nll"] is HF_SEQ_GET_NLL
    assert RagTokenForGeneration.__dict__["get_nll"] is HF_TOK_GET_NLL
    assert RagTokenForGeneration.__dict__["marginalize"] is HF_TOK_MARGINALIZE
    with compat.patch_transformers():
        assert RagTokenForGeneration.__dict__["marginalize"] is not HF_TOK_MARGINALIZE
    assert RagTokenForGeneration.__dict__["marginalize"] is HF_TOK_MARGINALIZE


# ---- bad input ----

def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _bad_cases():
    x, s, y = torch.randn(6, 4, 11), torch.randn(2, 3), torch.randint(0, 11, (2, 4))
    kw = {"pad_token_id": PAD, "bos_token_id": BOS, "n_docs": 3}
    return {
        "B*K not divisible by n_docs": ((torch.randn(7, 4, 11), s, y), kw, ValueError, "divisible by n_docs=3"),
        "target batch mismatch": ((x, s, y[:1]), kw, ValueError, "target.shape"),
        "target length mismatch": ((x, s, y[:, :3]), kw, ValueError, "target.shape"),
        "target 1-D": ((x, s, y[0]), kw, ValueError, "target.shape"),
        "float target": ((x, s, y.float()), kw, TypeError, "target.dtype"),
        "target out of range": ((x, s, _with(y, (1, 2), 11)), kw, ValueError, "target[1, 2] = 11"),
        "negative target": ((x, s, _with(y, (0, 3), -100)), kw, ValueError, "target[0, 3] = -100"),
        "doc_scores shape": ((x, torch.randn(2, 4), y), kw, ValueError, "doc_scores.shape"),
        "integer logits": ((x.long(), s, y), kw, TypeError, "seq_logits.dtype"),
        "complex logits": ((x.to(torch.complex64), s, y), kw, TypeError, "seq_logits.dtype"),
        "epsilon 1": ((x, s, y), {**kw, "epsilon": 1.0}, ValueError, "epsilon=1.0"),
        "4-D logits": ((x.view(2, 3, 4, 11), s, y), kw, ValueError, "seq_logits.shape"),
        "n_docs 0": ((x, s, y), {**kw, "n_docs": 0}, ValueError, "n_docs=0"),
        "pad None": ((x, s, y), {**kw, "pad_token_id": None}, TypeError, "pad_token_id=None"),
        "pad out of vocab": ((x, s, y), {**kw, "pad_token_id": 11}, ValueError, "pad_token_id=11"),
        "doc_scores on meta": ((x, s.to("meta"), y), kw, ValueError, "doc_scores.device"),
    }


@pytest.mark.parametrize("fn", [hf_rag_sequence_nll, hf_rag_token_nll])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_a_clear_error(fn, case):
    args, kw, exc, message = _bad_cases()[case]
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        fn(*args, **kw)


def test_marginalize_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="divisible by n_docs=4"):
        hf_rag_token_marginalize(torch.randn(6, 3, 5), torch.randn(2, 3), n_docs=4)
    with pytest.raises(ValueError, match="doc_scores.shape"):
        hf_rag_token_marginalize(torch.randn(6, 3, 5), torch.randn(3, 2), n_docs=3)
