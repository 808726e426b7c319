"""Encoder / BiEncoder: pooling, normalisation, truncation, batched encoding order, save/load round trips,
fingerprints, and exact agreement with transformers' own DPRQuestionEncoder / DPRContextEncoder."""

from __future__ import annotations

import pytest
import torch
from retriever_helpers import save_tiny_bert, tiny_encoder, tiny_tokenizer

from pyrag.models.encoders import BiEncoder, Encoder, default_encoder_path, format_passage

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["who is the king", "the capital of france is paris", "red", "where was the queen of the north born",
         "the old city lies on a large river in the west of the country", "tokyo"]


def _hidden(enc: Encoder, texts):
    t = enc.tokenize(texts)
    with torch.no_grad():
        h = enc.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    return h, t["attention_mask"]


def test_mean_pooling_averages_unpadded_token_states(tmp_path):
    enc = tiny_encoder(tmp_path / "m", pooling="mean")
    h, m = _hidden(enc, TEXTS)
    want = torch.stack([h[i, : int(m[i].sum())].mean(0) for i in range(len(TEXTS))])
    got = enc.encode(TEXTS, show_progress=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cls_pooling_takes_first_token_state(tmp_path):
    enc = tiny_encoder(tmp_path / "m", pooling="cls")
    h, _ = _hidden(enc, TEXTS)
    torch.testing.assert_close(enc.encode(TEXTS, show_progress=False), h[:, 0], rtol=1e-5, atol=1e-5)


def test_normalize_gives_unit_vectors_in_the_same_direction(tmp_path):
    save_tiny_bert(tmp_path / "m")
    raw = Encoder.from_pretrained(tmp_path / "m", pooling="mean", normalize=False).encode(TEXTS, show_progress=False)
    unit = Encoder.from_pretrained(tmp_path / "m", pooling="mean", normalize=True).encode(TEXTS, show_progress=False)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_encode_is_batch_and_order_independent(tmp_path):
    """Length sorting and padding must not change any vector, and results come back in input order."""
    enc = tiny_encoder(tmp_path / "m")
    together = enc.encode(TEXTS, batch_size=4, show_progress=False)
    alone = torch.cat([enc.encode([t], show_progress=False) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    rev = enc.encode(TEXTS[::-1], batch_size=2, show_progress=False)
    torch.testing.assert_close(rev, together.flip(0), rtol=1e-5, atol=1e-5)


def test_encode_sorts_by_length_runs_in_inference_mode_and_reports_progress(tmp_path, monkeypatch):
    enc = tiny_encoder(tmp_path / "m", pooling="mean")
    calls = []
    forward = Encoder.forward

    def spy(self, input_ids, attention_mask):
        calls.append((input_ids.shape[1], attention_mask.sum(1).tolist(), torch.is_inference_mode_enabled()))
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(Encoder, "forward", spy)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    enc.encode(TEXTS, batch_size=2, progress=bar)
    assert bar.n == len(TEXTS) and len(calls) == 3
    widths = [w for w, _, _ in calls]
    assert widths == sorted(widths, reverse=True), widths  # longest texts first
    for w, lengths, inference in calls:
        assert inference and w == max(lengths)  # each batch padded to its own longest text, no further
    lengths = sorted((n for _, ls, _ in calls for n in ls), reverse=True)
    assert [n for _, ls, _ in calls for n in sorted(ls, reverse=True)] == lengths  # batches = consecutive lengths


def test_encode_matches_forward_and_leaves_training_mode_alone(tmp_path):
    enc = tiny_encoder(tmp_path / "m", dropout=0.3)
    enc.train()
    t = enc.tokenize(TEXTS)
    enc.eval()
    with torch.no_grad():
        want = enc(t["input_ids"], t["attention_mask"])
    enc.train()
    got = enc.encode(TEXTS, show_progress=False)  # must run without dropout
    assert enc.training
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The result is an ordinary tensor, usable in autograd graphs (not an inference-mode tensor).
    w = torch.ones(enc.dim, requires_grad=True)
    (got @ w).sum().backward()
    assert w.grad is not None


def test_max_length_truncates_long_texts(tmp_path):
    enc = tiny_encoder(tmp_path / "m", max_length=8)
    long = "the capital of france is paris and the river is large and old"
    ids = enc.tokenize([long])["input_ids"]
    assert ids.shape == (1, 8) and ids[0, -1] == enc.tokenizer.sep_token_id
    kept = enc.tokenizer.decode(ids[0, 1:-1])
    torch.testing.assert_close(enc.encode([long], show_progress=False), enc.encode([kept], show_progress=False))


def test_forward_is_differentiable(tmp_path):
    enc = tiny_encoder(tmp_path / "m")
    t = enc.tokenize(TEXTS[:3])
    enc(t["input_ids"], t["attention_mask"]).pow(2).sum().backward()
    assert all(p.grad is not None for p in enc.model.encoder.parameters())


def test_save_load_round_trip_keeps_vectors_config_and_fingerprint(tmp_path):
    enc = tiny_encoder(tmp_path / "m", pooling="cls", normalize=True, max_length=16)
    enc.save_pretrained(tmp_path / "saved")
    back = Encoder.from_pretrained(tmp_path / "saved")  # options come from pyrag_encoder.json
    assert back.pooling == "cls" and back.normalize and back.max_length == 16
    assert back.fingerprint() == enc.fingerprint()
    assert torch.equal(back.encode(TEXTS, show_progress=False), enc.encode(TEXTS, show_progress=False))
    enc.save_pretrained(tmp_path / "saved")  # replacing an existing directory works
    assert Encoder.from_pretrained(tmp_path / "saved").fingerprint() == enc.fingerprint()


def test_fingerprint_tracks_weights_and_pooling(tmp_path):
    save_tiny_bert(tmp_path / "m")
    a = Encoder.from_pretrained(tmp_path / "m", pooling="mean")
    assert a.is_unmodified()
    assert Encoder.from_pretrained(tmp_path / "m", pooling="mean").fingerprint() == a.fingerprint()
    assert Encoder.from_pretrained(tmp_path / "m", pooling="cls").fingerprint() != a.fingerprint()
    with torch.no_grad():
        a.model.embeddings.word_embeddings.weight[5, 0] += 1e-3
    assert not a.is_unmodified()


@pytest.mark.parametrize("projection_dim", [0, 8])
@pytest.mark.parametrize("kind", ["DPRQuestionEncoder", "DPRContextEncoder"])
def test_dpr_checkpoint_gives_identical_embeddings(tmp_path, kind, projection_dim):
    import transformers
    from transformers import DPRConfig

    tok = tiny_tokenizer()
    cfg = DPRConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, projection_dim=projection_dim)
    torch.manual_seed(1)
    ref = getattr(transformers, kind)(cfg).eval()
    ref.save_pretrained(tmp_path / "dpr")
    tok.save_pretrained(tmp_path / "dpr")

    enc = Encoder.from_pretrained(tmp_path / "dpr")
    assert enc.pooling == "cls" and not enc.normalize
    assert enc.dim == (projection_dim or 32)
    t = enc.tokenize(TEXTS)
    with torch.no_grad():
        want = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
    assert torch.equal(enc(t["input_ids"], t["attention_mask"]), want)
    torch.testing.assert_close(enc.encode(TEXTS, show_progress=False), want, rtol=1e-5, atol=1e-6)

    enc.save_pretrained(tmp_path / "again")  # saved back in the DPR layout, loadable by transformers itself
    again = getattr(transformers, kind).from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output, want)


def test_bi_encoder_shared_and_separate_round_trip(tmp_path):
    save_tiny_bert(tmp_path / "m")
    shared = BiEncoder.from_pretrained(tmp_path / "m")
    assert shared.shared and shared.dim == 32
    sep = BiEncoder.from_pretrained(tmp_path / "m", shared=False)
    assert not sep.shared
    with torch.no_grad():
        sep.passage_encoder.model.embeddings.word_embeddings.weight.mul_(2)
    sep.save_pretrained(tmp_path / "bi")
    back = BiEncoder.from_pretrained(tmp_path / "bi")
    assert not back.shared
    assert back.question_encoder.fingerprint() == sep.question_encoder.fingerprint()
    assert back.passage_encoder.fingerprint() == sep.passage_encoder.fingerprint()
    shared.save_pretrained(tmp_path / "bi_shared")
    assert BiEncoder.from_pretrained(tmp_path / "bi_shared").shared
    # Shared weights: one set of parameters serves both roles.
    assert len(list(shared.parameters())) == len(list(shared.question_encoder.parameters()))


def test_passage_format_is_title_sep_text(tmp_path):
    enc = tiny_encoder(tmp_path / "m")
    assert format_passage("Paris", "the capital") == "Paris [SEP] the capital"
    assert format_passage("", "the capital") == "the capital"
    ids = enc.tokenize(enc.passage_strings(["paris"], ["the city"]))["input_ids"][0].tolist()
    sep = enc.tokenizer.sep_token_id
    assert ids.count(sep) == 2  # the separator is the tokenizer's special token, not three word pieces


def test_bad_arguments_raise_clear_errors(tmp_path):
    save_tiny_bert(tmp_path / "m")
    with pytest.raises(ValueError, match="pooling"):
        Encoder.from_pretrained(tmp_path / "m", pooling="max")
    with pytest.raises(FileNotFoundError, match="not an encoder directory"):
        Encoder.from_pretrained(tmp_path / "missing")
    enc = Encoder.from_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match="list of str"):
        enc.encode("a single string", show_progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        enc(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    assert enc.encode([], show_progress=False).shape == (0, 32)


def test_default_encoder_is_the_packaged_minilm():
    path = default_encoder_path()
    assert (path / "config.json").is_file()
    enc = Encoder.from_pretrained()  # sentence-transformers layout: mean pooling, normalised, 256 tokens
    assert (enc.dim, enc.pooling, enc.normalize, enc.max_length) == (384, "mean", True, 256)
    v = enc.encode(["What is the capital of France?", "Paris is the capital of France.",
                    "Bananas are yellow."], show_progress=False)
    assert v[0] @ v[1] > v[0] @ v[2]  # a real pretrained model: the related sentence is closer
