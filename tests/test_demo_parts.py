"""Unit tests of the demo's building blocks: the cut-down tokenizer, the cached-lower-layers question encoder, and
the resumable seq2seq loop used for the generator's pre-training and the closed-book baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from pyrag.demo.corpus import generate_corpus
from pyrag.demo.fast_encoder import CachedLowerEncoder
from pyrag.demo.generator import build_tokenizer, denoising_pairs, init_generator, train_seq2seq
from pyrag.models.encoders import Encoder, default_encoder_path
from pyrag.models.generator import load_generator


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(seed=1, n_people=20, n_places=10, n_orgs=6)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    texts = [f"{p['title']} / {p['text']}" for p in corpus.passages] + [q["question"] for q in corpus.train]
    return build_tokenizer(texts, default_encoder_path())


def test_cut_down_tokenizer_tokenises_corpus_text_exactly_like_minilm(corpus, tokenizer):
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(default_encoder_path())
    assert len(tokenizer) < len(full) // 5
    for p in corpus.passages[:40]:
        text = f"{p['title']} / {p['text']}"
        assert tokenizer.tokenize(text) == full.tokenize(text)
    # any ASCII text still tokenises without [UNK] (single characters are always in the vocabulary)
    assert tokenizer.unk_token not in tokenizer.tokenize("Quixotic zebras jump over 12,345 lazy dogs!?")


def test_denoising_pairs_mask_one_span_and_are_deterministic(corpus):
    pairs = denoising_pairs(corpus.passages, seed=5)
    assert len(pairs) == 2 * len(corpus.passages)
    assert pairs == denoising_pairs(corpus.passages, seed=5)
    for src, tgt in pairs:
        assert src.count("[MASK]") == 1 and "[MASK]" not in tgt
        assert len(src.split(" ")) < len(tgt.split(" ")) + 1


def _tiny_bert_encoder(tokenizer) -> Encoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return Encoder(BertModel(cfg).eval(), tokenizer, pooling="mean", normalize=False, max_length=64)


def test_cached_lower_encoder_gives_the_plain_encoders_vectors_and_trains_only_the_top(tokenizer, corpus):
    plain = _tiny_bert_encoder(tokenizer)
    for m in plain.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    qs = [q["question"] for q in corpus.train[:7]]
    t = plain.tokenize(qs)
    ref = plain(t["input_ids"], t["attention_mask"]).detach()

    enc = CachedLowerEncoder.convert(copy.deepcopy(plain), 1)
    out = enc(t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(enc._cache) == len(set(qs))
    # a second batch with other padding reuses the cache and still matches
    t2 = enc.tokenize(qs[2:5])
    torch.testing.assert_close(enc(t2["input_ids"], t2["attention_mask"]), ref[2:5], atol=1e-5, rtol=1e-5)
    assert len(enc._cache) == len(set(qs))

    out.pow(2).sum().backward()
    top = enc.model.encoder.layer[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())
    lower = [*enc.model.embeddings.parameters(), *enc.model.encoder.layer[0].parameters()]
    assert all(not p.requires_grad and p.grad is None for p in lower)

    frozen = CachedLowerEncoder.convert(copy.deepcopy(plain), 0)
    torch.testing.assert_close(frozen(t["input_ids"], t["attention_mask"]), ref, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_cached_lower_encoder_rejects_bad_layer_counts(tokenizer):
    with pytest.raises(ValueError, match="train_layers"):
        CachedLowerEncoder.convert(_tiny_bert_encoder(tokenizer), 4)


def test_cached_lower_encoder_saves_as_a_plain_encoder(tokenizer, corpus, tmp_path):
    enc = CachedLowerEncoder.convert(_tiny_bert_encoder(tokenizer), 1)
    t = enc.tokenize([corpus.train[0]["question"]])
    v = enc(t["input_ids"], t["attention_mask"]).detach()
    enc.save_pretrained(tmp_path / "enc")
    back = Encoder.from_pretrained(tmp_path / "enc")
    assert type(back) is Encoder
    torch.testing.assert_close(back(t["input_ids"], t["attention_mask"]).detach(), v, atol=1e-5, rtol=1e-5)


def _tiny_generator(tokenizer):
    model = init_generator(tokenizer, d_model=32, layers=1, ffn=64, heads=2, max_positions=64, seed=0)
    return load_generator(model, tokenizer)


def test_train_seq2seq_resumes_exactly_after_a_stop(tokenizer, corpus, tmp_path):
    pairs = [(q["question"], q["answers"][0]) for q in corpus.train]
    kw = {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "seed": 3, "checkpoint_every": 2,
          "show_progress": False}
    a = _tiny_generator(tokenizer)
    train_seq2seq(a, pairs, out_dir=tmp_path / "a", **kw)
    b = _tiny_generator(tokenizer)
    assert train_seq2seq(b, pairs, out_dir=tmp_path / "b", stop_at=3, **kw)["step"] == 3
    b2 = _tiny_generator(tokenizer)  # a fresh process: weights come from the checkpoint
    assert train_seq2seq(b2, pairs, out_dir=tmp_path / "b", **kw)["step"] == 6
    for (n, p), q in zip(a.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_train_seq2seq_refuses_a_checkpoint_of_other_settings(tokenizer, corpus, tmp_path):
    pairs = [(q["question"], q["answers"][0]) for q in corpus.train]
    kw = {"batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "seed": 3, "show_progress": False}
    train_seq2seq(_tiny_generator(tokenizer), pairs, out_dir=tmp_path, steps=2, **kw)
    with pytest.raises(ValueError, match="other settings"):
        train_seq2seq(_tiny_generator(tokenizer), pairs, out_dir=tmp_path, steps=3, **kw)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_seq2seq(_tiny_generator(tokenizer), pairs, out_dir=tmp_path / "x", steps=2,
                      **{**kw, "warmup_steps": 5})
