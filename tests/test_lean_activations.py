"""LeanActivations: linear layers reading one fp32 tensor under autocast share one low-precision copy, and
fc2(gelu(.)) keeps only the GELU input — the same forward values and gradients as plain autograd, bit for bit,
with fewer bytes saved for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pyrag.models.lean_activations import LeanActivations, lean_activations

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # plain torch: no pyrag kernels needed


def _bart(layers=2, d=32):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, vocab_size=97,
                     max_position_embeddings=64, dropout=0.0)
    return BartForConditionalGeneration(cfg).train()


def _saved_bytes(fn) -> tuple[object, int]:
    """Run fn() and count the bytes of the distinct storages autograd saved for backward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _step(model, ids, dec, lean: bool, autocast: bool):
    def fwd():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast), \
                (LeanActivations() if lean else torch.enable_grad()):
            z = model(input_ids=ids, decoder_input_ids=dec).logits
            return z.float().log_softmax(-1)[..., 5].sum()

    loss, saved = _saved_bytes(fwd)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_same_values_and_gradients_with_fewer_saved_bytes(autocast, device):
    torch.manual_seed(0)
    layers, d, N, L, T = 2, 32, 6, 20, 5
    ffn = 2 * d
    plain = _bart(layers, d).to(device)
    lean = copy.deepcopy(plain)
    ids, dec = torch.randint(4, 97, (N, L), device=device), torch.randint(4, 97, (N, T), device=device)
    l1, g1, saved1 = _step(plain, ids, dec, lean=False, autocast=autocast)
    l2, g2, saved2 = _step(lean, ids, dec, lean=True, autocast=autocast)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys()
    for n in g1:  # the same kernels on the same values; per-read gradients summed in fp32 as before
        assert torch.equal(g1[n], g2[n]), n
    # what disappears: each feed-forward block's GELU output, and under autocast 2 of the 3 q/k/v reads per
    # self-attention (encoder and decoder) and all but one of the 2*layers cross-attention k/v reads
    size = 2 if autocast else 4
    expected = layers * (N * L + N * T) * ffn * size
    if autocast:
        expected += (2 * layers * N * L + 2 * layers * N * T + (2 * layers - 1) * N * L) * d * size
    assert saved1 - saved2 >= 0.9 * expected, (saved1, saved2, expected)


def test_frozen_feed_forward_weights_still_pass_the_gradient_through():
    x = torch.randn(5, 8, requires_grad=True)
    w1, w2 = torch.randn(16, 8), torch.randn(4, 16)  # frozen layers (no grad) inside a trained model
    grads = []
    for lean in (True, False):
        with LeanActivations() if lean else torch.enable_grad():
            y = F.linear(F.gelu(F.linear(x, w1)), w2, torch.zeros(4))
        grads.append(torch.autograd.grad(y.square().sum(), x)[0])
    assert torch.equal(grads[0], grads[1])


def test_stands_aside_in_a_non_reentrant_checkpoint():
    """checkpoint recomputes without the mode and hands back what the first pass saved, by position: inside it the
    mode must save what plain autograd saves (here the fc1 output stays referenced, so the GELU rewrite could fire)."""
    from torch.utils.checkpoint import checkpoint

    w1, w2 = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)

    def ffn(x):
        pre = F.linear(x, w1)
        h = F.gelu(pre)
        return F.linear(h, w2)

    for rows in (8, 4):  # square: silently wrong gradients once; otherwise checkpoint's metadata check fires
        x = torch.randn(rows, 8, requires_grad=True)
        grads = []
        for lean in (False, True):
            with LeanActivations() if lean else torch.enable_grad():
                y = checkpoint(ffn, x, use_reentrant=False)
            grads.append(torch.autograd.grad(y.square().sum(), (x, w1, w2)))
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_stands_aside_under_torch_compile():
    x = torch.randn(6, 16)
    w1, wq = torch.randn(32, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    def f(x):
        return F.gelu(F.linear(F.linear(x * 1.0, wq).float(), w1))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.compile(f, backend="aot_eager")(x)
        torch._dynamo.reset()
        with LeanActivations():
            out = torch.compile(f, backend="aot_eager")(x)
    assert torch.equal(out, ref)


def test_a_leaf_read_by_two_linears_under_autocast_is_left_to_autocast():
    """autocast caches the cast of a leaf that requires grad and sums its reads' gradients through that cache:
    the mode leaves such tensors alone, so the gradients stay the same bits."""
    x = torch.randn(5, 8, requires_grad=True)
    w, v = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    grads = []
    for lean in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), (LeanActivations() if lean else torch.enable_grad()):
            y = F.linear(x, w).float().tanh().sum() + F.linear(x, v).float().sin().sum()
        grads.append(torch.autograd.grad(y, (x, w, v)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_gelu_output_read_elsewhere_too_keeps_its_gradient():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    grads = []
    for lean in (True, False):
        with LeanActivations() if lean else torch.enable_grad():
            h = F.gelu(x * 2.0)
            y = F.linear(h, w).sum() + (h * h).sum()  # h is read by the linear and by something else
        grads.append(torch.autograd.grad(y, (x, w)))
    # the GELU backward now runs once per read instead of on the summed gradient: equal up to rounding
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_tensor_modified_in_place_is_cast_again():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), LeanActivations():
        y = x * 1.0
        a = F.linear(y, w)
        with torch.no_grad():
            y.add_(1.0)  # a new version: the cached copy no longer matches
        b = F.linear(y, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_ref = F.linear(x * 1.0, w)
        b_ref = F.linear(x * 1.0 + 1.0, w)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)


def test_entered_only_with_gradients():
    assert isinstance(lean_activations("cpu"), LeanActivations)
    with torch.no_grad():
        assert type(lean_activations("cpu")).__name__ == "nullcontext"
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with LeanActivations():  # no autocast: nothing is cast
        assert F.linear(x, w).dtype == torch.float32


@pytest.mark.parametrize("head_chunk_bytes", [1 << 40, 1])  # whole logits; one question per checkpointed chunk
def test_rag_training_forward_under_autocast_is_unchanged(head_chunk_bytes):
    """RagToken's forward enters the mode (use_lean_activations, on by default): loss and every gradient under
    autocast equal a run without it (use_lean_activations=False), also
    when the vocabulary projection is recomputed in backward (checkpointed chunks, recomputed without the mode)."""
    from pyrag.models.generator import InputFormat, Seq2SeqGenerator
    from pyrag.models.rag import RagToken

    torch.manual_seed(0)
    B, K, L, T = 2, 3, 12, 4
    bart = _bart()
    tok = _DummyTokenizer()
    ids, mask = torch.randint(4, 97, (B * K, L)), torch.ones(B * K, L, dtype=torch.bool)
    labels = torch.randint(4, 97, (B, T))
    labels[:, 0] = 2
    scores0 = torch.randn(B, K)
    runs = []
    for share in (True, False):
        model = RagToken(torch.nn.Identity(), Seq2SeqGenerator(copy.deepcopy(bart), tok, InputFormat()), None,
                         n_docs=K).train()
        model.head_chunk_bytes = head_chunk_bytes
        model.use_lean_activations = share
        scores = scores0.clone().requires_grad_(True)

        def fwd(model=model, scores=scores):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, labels=labels,
                             reduction="sum", return_posterior=False)

        out, saved = _saved_bytes(fwd)
        out.loss.backward()
        runs.append((out.loss.detach(), scores.grad, {n: p.grad for n, p in model.named_parameters()}, saved))
    (l1, s1, g1, saved1), (l2, s2, g2, saved2) = runs
    assert saved1 < saved2  # the forward did share its casts
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


class _DummyTokenizer:
    """Just the ids a Seq2SeqGenerator reads from its tokenizer (the precomputed path tokenizes nothing)."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2
    is_fast = True

    def __len__(self):
        return 97
