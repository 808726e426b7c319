"""pyrag's RagToken / RagSequence against transformers' RagTokenForGeneration / RagSequenceForGeneration sharing
the same tiny random DPRQuestionEncoder + BartForConditionalGeneration modules: losses (with and without label
smoothing), gradients of both encoders, and generated token ids (RAG-Token greedy and beam 4, RAG-Sequence
thorough beam 4) on HF's precomputed-context path."""

from __future__ import annotations

import pytest
import torch
from test_rag_model import bart_tokenizer, bert_tokenizer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from pyrag.models.encoders import Encoder
from pyrag.models.generator import Seq2SeqGenerator
from pyrag.models.rag import RagSequence, RagToken

B, K, D = 8, 3, 16
BOS, PAD, EOS = 0, 1, 2
GEN = {"bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": EOS}


pytestmark = pytest.mark.usefixtures("one_thread")


def _modules(seed=0):
    torch.manual_seed(seed)
    btok = bart_tokenizer()
    V = len(btok)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.3, forced_eos_token_id=EOS,
        **GEN)).eval()
    with torch.no_grad():  # make </s> likely enough that hypotheses end at different lengths
        bart.final_logits_bias[0, EOS] = 3.0
    qtok = bert_tokenizer([f"w{i}" for i in range(40)])
    dpr = DPRQuestionEncoder(DPRConfig(vocab_size=len(qtok), hidden_size=D, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       projection_dim=0)).eval()
    return bart, btok, dpr, qtok


def _inputs(V, seed=1, K=K):
    g = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(5, 40, (B, 7), generator=g)
    q_mask = torch.ones_like(q_ids)
    q_mask[::3, 5:] = 0
    doc_emb = torch.randn(B, K, D, generator=g)
    L = 20
    ctx = torch.randint(4, V, (B * K, L), generator=g)
    ctx[:, 0] = BOS
    lens = torch.randint(8, L + 1, (B * K,), generator=g)
    mask = torch.arange(L)[None, :] < lens[:, None]
    ctx[torch.arange(B * K), lens - 1] = EOS
    ctx = ctx.masked_fill(~mask, PAD)
    T = 9
    labels = torch.randint(4, V, (B, T), generator=g)
    labels[:, 0], labels[:, 1] = EOS, BOS  # decoder start, then <s>, as generation produces them
    tl = torch.randint(4, T + 1, (B,), generator=g)
    labels[torch.arange(B), tl - 1] = EOS
    labels = labels.masked_fill(torch.arange(T)[None, :] >= tl[:, None], PAD)
    return q_ids, q_mask, doc_emb, ctx, mask.long(), labels


@pytest.fixture(scope="module")
def parts():
    bart, btok, dpr, qtok = _modules()
    cfg = RagConfig.from_question_encoder_generator_configs(dpr.config, bart.config, n_docs=K, **GEN)
    hf_tok = RagTokenForGeneration(config=cfg, question_encoder=dpr, generator=bart).eval()
    hf_seq = RagSequenceForGeneration(config=cfg, question_encoder=dpr, generator=bart).eval()
    qe = Encoder(dpr, qtok, pooling="cls")
    gen = Seq2SeqGenerator(bart, btok)
    return {"hf_token": hf_tok, "hf_sequence": hf_seq, "token": RagToken(qe, gen, None, n_docs=K).eval(),
            "sequence": RagSequence(qe, gen, None, n_docs=K).eval(), "dpr": dpr, "bart": bart, "V": len(btok)}


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _rel_err(a: dict, b: dict) -> float:
    """Largest per-parameter relative error of gradients a against b. Attention key biases get exactly zero
    gradient in exact arithmetic (softmax ignores a shift shared by all keys), so both sides hold rounding noise
    there: those must merely be negligible next to the whole gradient."""
    assert a.keys() == b.keys()
    total = torch.sqrt(sum(g.norm() ** 2 for g in b.values()))
    errs = []
    for n, ga in a.items():
        if n.endswith(("k_proj.bias", "key.bias")):
            assert max(ga.norm(), b[n].norm()) <= 1e-6 * total, n
        else:
            errs.append(float((ga - b[n]).norm() / b[n].norm().clamp_min(1e-30)))
    return max(errs)


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_rag_loss_and_gradients_match_hf(parts, mode, epsilon):
    hf, ours, dpr, bart = parts[f"hf_{mode}"], parts[mode], parts["dpr"], parts["bart"]
    q_ids, q_mask, doc_emb, ctx, ctx_mask, labels = _inputs(parts["V"])
    hf.config.label_smoothing = epsilon
    excl = mode == "sequence"

    def run(fn):
        dpr.zero_grad(set_to_none=True)
        bart.zero_grad(set_to_none=True)
        q = dpr(q_ids, attention_mask=q_mask).pooler_output
        scores = torch.bmm(q[:, None, :], doc_emb.transpose(1, 2)).squeeze(1)
        loss = fn(scores)
        loss.sum().backward()
        return loss.detach(), _grads(dpr), _grads(bart)

    kw = {"exclude_bos_score": True} if excl else {}
    l_hf, gq_hf, gg_hf = run(lambda s: hf(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=s,
                                          labels=labels, n_docs=K, reduce_loss=False, **kw).loss)
    # the question encoder as pyrag wraps it (Encoder, CLS pooling) gives the same vectors as HF's DPR
    enc = ours.question_encoder
    torch.testing.assert_close(enc(q_ids, q_mask), dpr(q_ids, attention_mask=q_mask).pooler_output)

    def pyrag_loss(s):
        return ours(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=s, labels=labels,
                    epsilon=epsilon, exclude_bos_score=excl, reduction="none").loss

    l_py, gq_py, gg_py = run(pyrag_loss)
    torch.testing.assert_close(l_py, l_hf, atol=1e-5, rtol=1e-5)
    assert _rel_err(gq_py, gq_hf) <= 1e-4, _rel_err(gq_py, gq_hf)
    assert _rel_err(gg_py, gg_hf) <= 1e-4, _rel_err(gg_py, gg_hf)
    # reduce_loss=True is HF's sum over questions
    s = torch.randn(B, K)
    l_sum = ours(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=s, labels=labels,
                 epsilon=epsilon, exclude_bos_score=excl, reduction="sum").loss
    with torch.no_grad():
        h_sum = hf(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=s, labels=labels, n_docs=K,
                   reduce_loss=True, **kw).loss
    torch.testing.assert_close(l_sum.detach(), h_sum, atol=1e-4, rtol=1e-5)


def _hf_padded(out: torch.Tensor) -> list[list[int]]:
    """HF's sequences without the trailing padding (so that both sides compare as token lists)."""
    rows = []
    for r in out.tolist():
        while len(r) > 1 and r[-1] == PAD:
            r.pop()
        rows.append(r)
    return rows


SETTINGS = {"forced_bos_token_id": BOS, "forced_eos_token_id": EOS, "length_penalty": 1.0, "early_stopping": False,
                "no_repeat_ngram_size": 0}


@pytest.mark.parametrize("num_beams,extra", [(1, {}), (4, {}),
                                             (4, {"length_penalty": 0.5, "early_stopping": True}),
                                             (4, {"no_repeat_ngram_size": 2, "early_stopping": "never"})])
def test_rag_token_generate_matches_hf(parts, num_beams, extra):
    hf, ours = parts["hf_token"], parts["token"]
    _, _, _, ctx, ctx_mask, _ = _inputs(parts["V"], seed=3)
    scores = torch.randn(B, K, generator=torch.Generator().manual_seed(4)) * 2
    s = {**SETTINGS, **extra}
    max_new = 10
    with torch.no_grad():
        out = hf.generate(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=scores, n_docs=K,
                          num_beams=num_beams, max_length=max_new + 1, min_length=0, do_sample=False,
                          output_scores=True, output_logits=True, return_dict_in_generate=True, **GEN, **s)
    ref = out.sequences
    got = ours.generate(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=scores,
                        num_beams=num_beams, max_new_tokens=max_new, **s)
    assert _hf_padded(got.sequences) == _hf_padded(ref)
    assert len({tuple(r) for r in _hf_padded(ref)}) > 1  # the questions really get different answers
    # scores: the answer's log-prob, the sum of its tokens' marginal log-probs
    if num_beams == 1:  # greedy: the model's own (unprocessed) marginal log-probs at the chosen tokens
        toks = ref[:, 1:]
        lp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(2, toks[:, :, None]).squeeze(2)
        lp = lp.masked_fill(torch.cumsum(toks == EOS, 1) - (toks == EOS).long() > 0, 0.0)  # after </s>: padding
        torch.testing.assert_close(got.scores, lp.sum(1), rtol=1e-4, atol=1e-4)
    else:  # beam: HF's sequences_scores is the length-normalised form, reported beside it
        torch.testing.assert_close(got.extra["beam_scores"], out.sequences_scores, rtol=1e-4, atol=1e-4)
        lp = s["length_penalty"]
        torch.testing.assert_close(got.scores, got.extra["beam_scores"] * (got.lengths - 1).float() ** lp,
                                   rtol=1e-4, atol=1e-4)


def _unpadded(ctx, mask):
    """Every context row cut to the same length (no padding): HF's RagSequenceForGeneration.generate calls the
    generator's generate with attention_mask=None, and transformers 5 no longer infers the mask from padding for
    encoder-decoders, so HF's per-passage beams attend to pad tokens. Without padding both sides are exact."""
    L = int(mask.sum(1).min())
    ctx = ctx[:, :L].clone()
    ctx[:, -1] = EOS
    return ctx, torch.ones_like(ctx)


def _hf_thorough_with_mask(hf, bart, ctx, mask, scores, num_beams, max_length, s, K=K):
    """HF's RAG-Sequence thorough decoding assembled from HF's own parts, with the attention mask passed to the
    per-passage beam search (what HF's generate does when the mask is not lost) and n_docs=K passed on to the
    re-scoring forward (HF's generate re-scores with the config's n_docs, and fails for any other)."""
    out = []
    for b in range(B):
        rows = slice(b * K, (b + 1) * K)
        hyps = bart.generate(ctx[rows], attention_mask=mask[rows], num_beams=num_beams,
                             num_return_sequences=num_beams, max_length=max_length, do_sample=False, **GEN, **s)
        hyps = torch.stack(list({str(h.tolist()): h for h in hyps}.values()))
        n = hyps.shape[0]
        loss = hf(context_input_ids=ctx[rows].repeat(n, 1), context_attention_mask=mask[rows].repeat(n, 1),
                  doc_scores=scores[b:b + 1].repeat(n, 1), labels=hyps, exclude_bos_score=True, n_docs=K).loss
        out.append(hyps[int(torch.argmax(-loss))].tolist())
    return out


@pytest.mark.parametrize("num_beams,extra", [(4, {}), (4, {"length_penalty": 2.0, "early_stopping": True}),
                                             (1, {})])
def test_rag_sequence_thorough_generate_matches_hf(parts, num_beams, extra):
    hf, ours = parts["hf_sequence"], parts["sequence"]
    hf.config.label_smoothing = 0.0
    _, _, _, ctx, ctx_mask, _ = _inputs(parts["V"], seed=5)
    scores = torch.randn(B, K, generator=torch.Generator().manual_seed(6)) * 2
    s = {**SETTINGS, **extra}
    max_new = 8
    flat_ctx, flat_mask = _unpadded(ctx, ctx_mask)
    with torch.no_grad():
        ref = hf.generate(context_input_ids=flat_ctx, context_attention_mask=flat_mask, doc_scores=scores, n_docs=K,
                          num_beams=num_beams, max_length=max_new + 1, do_sample=False, **GEN, **s)
    got = ours.generate(context_input_ids=flat_ctx, context_attention_mask=flat_mask, doc_scores=scores,
                        num_beams=num_beams, max_new_tokens=max_new, decoding="thorough", **s)
    assert _hf_padded(got.sequences) == _hf_padded(ref)
    assert len({tuple(r) for r in _hf_padded(ref)}) > 1
    # padded contexts: against HF's algorithm with the attention mask kept
    with torch.no_grad():
        ref = _hf_thorough_with_mask(hf, parts["bart"], ctx, ctx_mask, scores, num_beams, max_new + 1, s)
    got = ours.generate(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=scores,
                        num_beams=num_beams, max_new_tokens=max_new, decoding="thorough", **s)
    assert _hf_padded(got.sequences) == _hf_padded(torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r) for r in ref], batch_first=True, padding_value=PAD))


@pytest.mark.parametrize("n_docs", [2, 5])
@pytest.mark.parametrize("mode,num_beams", [("token", 1), ("token", 4), ("sequence", 4)])
def test_generate_with_another_n_docs_than_training_matches_hf(parts, mode, num_beams, n_docs):
    # HF issues #7874 / #14394: n_docs at generation other than the config's (K=3 here). Both models were built
    # with n_docs=3 and are given n_docs passages per question.
    hf, ours = parts[f"hf_{mode}"], parts[mode]
    hf.config.label_smoothing = 0.0
    _, _, _, ctx, ctx_mask, _ = _inputs(parts["V"], seed=7, K=n_docs)
    scores = torch.randn(B, n_docs, generator=torch.Generator().manual_seed(8)) * 2
    max_new = 8
    with torch.no_grad():
        if mode == "token":
            ref = hf.generate(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=scores,
                              n_docs=n_docs, num_beams=num_beams, max_length=max_new + 1, min_length=0,
                              do_sample=False, **GEN, **SETTINGS)
        else:
            ref = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in _hf_thorough_with_mask(
                hf, parts["bart"], ctx, ctx_mask, scores, num_beams, max_new + 1, SETTINGS, K=n_docs)],
                batch_first=True, padding_value=PAD)
    got = ours.generate(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=scores,
                        num_beams=num_beams, max_new_tokens=max_new, n_docs=n_docs,
                        **({"decoding": "thorough"} if mode == "sequence" else {}), **SETTINGS)
    assert _hf_padded(got.sequences) == _hf_padded(ref)
    assert got.doc_prior.shape == (B, n_docs)
    assert len({tuple(r) for r in _hf_padded(ref)}) > 1
