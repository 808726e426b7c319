"""RagToken / RagSequence on a tiny knowledge base: generator input format and truncation, retrieval-scored forward,
posteriors, n_docs, save/load, decoder-only generator, and clear errors on bad input. Also holds the tiny
tokenizer / model builders the other RAG test files import."""

from __future__ import annotations

import pytest
import torch
from transformers import BartTokenizer, BertTokenizer

# ---- tiny builders shared by the RAG test files ----


def bart_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400) -> BartTokenizer:
    """A byte-level BPE BartTokenizer built locally (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last): the 256 byte
    symbols plus merges learnt from `corpus` (none without one)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    if corpus:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                show_progress=False)
        vocab = bpe.get_vocab()
        import json

        merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    else:
        vocab = {t: i for i, t in enumerate(specials)}
        for ch in sorted(ByteLevel.alphabet()):
            vocab.setdefault(ch, len(vocab))
        merges = []
    vocab = dict(vocab)
    vocab.setdefault("<mask>", len(vocab))
    return BartTokenizer(vocab=vocab, merges=merges)


def bert_tokenizer(words: list[str]) -> BertTokenizer:
    """A word-level BertTokenizer over the given (lower-case) words."""
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words) | set("?.,/"))
    return BertTokenizer(vocab={t: i for i, t in enumerate(toks)})


SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu", "ga", "he", "ji", "bo", "fe", "du"]
NAMES = [a + b + "x" for a in SYLLABLES for b in SYLLABLES]  # 256 made-up single-word names
CITIES = ["paris", "lima", "oslo", "kyoto", "cairo", "quito", "perth", "dakar", "hanoi", "tunis", "sofia", "porto",
          "dubai", "delhi", "seoul", "minsk"]
RELATIVES = ["brother", "sister"]
WORDS = ["where", "does", "live", "?", "resides", "in", ".", "the", "of", "lives", ":", "/"]


def synthetic_task(n: int = 64, seed: int = 0):
    """(passages, qa) of a task where the retriever must learn from the generator which passage helps.

    Entity i has three passages titled with its name: the gold one, "NAME resides in CITY .", and two about
    relatives, "where the brother of NAME lives : CITY2 ." (other cities). The question "where does NAME live ?"
    shares more words with the relatives' passages, so a bag-of-words retriever ranks both above the gold
    passage (gold recall@1 = 0, recall@3 = 1), and only the gold passage holds the answer: the generator's loss is
    the only thing that can teach the question encoder to rank the gold passage first."""
    g = torch.Generator().manual_seed(seed)
    passages, qa = [], []
    for i in range(n):
        name = NAMES[(i * 37) % len(NAMES)]
        cities = [CITIES[int(j)] for j in torch.randperm(len(CITIES), generator=g)[:3]]
        passages.append({"id": f"p{i}", "title": name, "text": f"{name} resides in {cities[0]} ."})
        for r, c in zip(RELATIVES, cities[1:]):
            passages.append({"id": f"p{i}-{r}", "title": name, "text": f"where the {r} of {name} lives : {c} ."})
        qa.append({"question": f"where does {name} live ?", "answers": [cities[0]], "gold_ids": [f"p{i}"]})
    return passages, qa


def tiny_encoder(path, seed: int = 0):
    """A bag-of-words encoder as a pyrag Encoder, saved to `path` and loaded back: a BERT with no layers whose word
    embeddings are orthonormal and zero-mean (so LayerNorm keeps them orthogonal), position and segment
    embeddings zero, mean pooling, L2-normalised: q . d is the cosine of the two texts' word counts."""
    from transformers import BertConfig, BertModel

    from pyrag.models.encoders import Encoder

    torch.manual_seed(seed)
    tok = bert_tokenizer(NAMES + CITIES + RELATIVES + WORDS)
    V = len(tok)
    D = V + 8
    model = BertModel(BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=0, num_attention_heads=1,
                                 intermediate_size=8, max_position_embeddings=64, hidden_dropout_prob=0.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D, V, generator=g)
    x -= x.mean(0, keepdim=True)  # zero-mean columns: orthogonal to the all-ones direction LayerNorm removes
    q, _ = torch.linalg.qr(x)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(q.T)
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    Encoder(model.eval(), tok, pooling="mean", normalize=True).save_pretrained(path)
    return Encoder.from_pretrained(path)


def tiny_bart(tok, d: int = 32, layers: int = 1, seed: int = 0, **kw):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = {"vocab_size": len(tok), "d_model": d, "encoder_layers": layers, "decoder_layers": layers,
               "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 2 * d, "decoder_ffn_dim": 2 * d,
               "max_position_embeddings": 128, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
               "decoder_start_token_id": 2, "forced_bos_token_id": 0, "forced_eos_token_id": 2, "dropout": 0.0,
               "attention_dropout": 0.0}
    cfg.update(kw)
    return BartForConditionalGeneration(BartConfig(**cfg))


def tiny_setup(tmp_path, n: int = 64, mode: str = "token", n_docs: int = 3, seed: int = 0, d_gen: int = 64,
               gen_layers: int = 1, gen_std: float = 0.1, gen_dropout: float = 0.0, **kw):
    """(model, passages, qa, kb): a knowledge base over synthetic_task(n) with the bag-of-words encoder, and a RAG
    model over it whose question encoder is a trainable copy of that encoder and whose generator is a tiny random
    BART saved (with a BPE tokenizer learnt from the corpus) to a directory, as users pass it."""
    from pyrag.kb import build_kb
    from pyrag.models.rag import RagSequence, RagToken

    passages, qa = synthetic_task(n, seed)
    enc = tiny_encoder(tmp_path / "encoder", seed=seed)
    kb = build_kb(passages, tmp_path / "kb", encoder=enc, show_progress=False)
    corpus = [f"{p['title']} / {p['text']}" for p in passages] + [q["question"] for q in qa]
    tok = bart_tokenizer(corpus + CITIES, vocab_size=500)
    tiny_bart(tok, d=d_gen, layers=gen_layers, seed=seed, init_std=gen_std, dropout=gen_dropout).save_pretrained(
        tmp_path / "generator")
    tok.save_pretrained(tmp_path / "generator")
    cls = RagToken if mode == "token" else RagSequence
    model = cls.from_parts(None, tmp_path / "generator", kb, n_docs=n_docs, **kw)
    return model, passages, qa, kb


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A RagToken over 16 entities (48 passages), K=3."""
    return tiny_setup(tmp_path_factory.mktemp("small"), n=16, n_docs=3)


# ---- generator inputs ----

def test_generator_inputs_match_hf_postprocess_docs_and_keep_the_question():
    from types import SimpleNamespace

    from transformers import RagConfig
    from transformers.models.rag.retrieval_rag import RagRetriever

    from pyrag.models.generator import InputFormat, Seq2SeqGenerator, tokenize_contexts

    tok = bart_tokenizer(["the capital of france is paris", "who wrote hamlet"] * 3)
    questions = ["what is  the capital of france?", "who wrote hamlet"]
    titles = [['"Paris"', "France"], ["Hamlet", '"Shakespeare" play']]
    texts = [["Paris is the capital  of France .", "France is a country"], ["Hamlet is a play", "a long text " * 12]]
    docs = [{"title": t, "text": x} for t, x in zip(titles, texts)]
    for prefix in (None, "answer: "):
        fmt = InputFormat(prefix=prefix, max_combined_length=300)
        hf_self = SimpleNamespace(config=RagConfig(max_combined_length=300), generator_tokenizer=tok)
        ref, _ = RagRetriever.postprocess_docs(hf_self, docs, questions, prefix, 2, return_tensors="pt")
        got = tokenize_contexts(tok, questions, titles, texts, fmt)
        assert got == [[t for t in r if t != tok.pad_token_id] for r in ref.tolist()]
    # rows too long for max_combined_length: HF cuts the question away, pyrag cuts the passage
    L = 28
    full = tokenize_contexts(tok, questions, titles, texts, InputFormat(max_combined_length=10_000))
    hf_self = SimpleNamespace(config=RagConfig(max_combined_length=L), generator_tokenizer=tok)
    ref, _ = RagRetriever.postprocess_docs(hf_self, docs, questions, None, 2, return_tensors="pt")
    got = tokenize_contexts(tok, questions, titles, texts, InputFormat(max_combined_length=L))
    assert any(len(r) <= L for r in full) and any(len(r) > L for r in full), [len(r) for r in full]
    for i, q in enumerate([questions[0], questions[0], questions[1], questions[1]]):
        hf_row = [t for t in ref[i].tolist() if t != tok.pad_token_id]
        if len(full[i]) <= L:  # fits: untouched, as HF
            assert got[i] == full[i] == hf_row
            continue
        text = tok.decode(got[i], skip_special_tokens=True)
        assert len(got[i]) <= L and text.endswith(" // " + " ".join(q.split()))
        assert q.split()[-1] not in tok.decode(hf_row, skip_special_tokens=True).split("//")[-1]
        assert got[i][:8] == hf_row[:8]  # the same passage start
    # padded to the batch's longest row, not to max_combined_length
    from test_rag_model import tiny_bart

    # (and cut to the model's 128 positions, which max_combined_length=300 exceeds)
    gen = Seq2SeqGenerator(tiny_bart(tok), tok, InputFormat(max_combined_length=300))
    assert gen.input_limit == 128 and max(len(r) for r in full) > 128
    rows = tokenize_contexts(tok, questions, titles, texts, gen.fmt, max_length=128)
    ids, mask = gen.build_inputs(questions, titles, texts)
    assert ids.shape[1] == max(len(r) for r in rows) <= 128
    assert mask.sum(1).tolist() == [len(r) for r in rows]
    with pytest.raises(ValueError, match=r"questions\[1\] alone needs \d+ tokens, more than the generator input's "
                                         r"limit of 28 \(max_combined_length=28"):
        tokenize_contexts(tok, ["why", "why " * 40], [["t"], ["t"]], [["x"], ["x"]], InputFormat(max_combined_length=L))


# ---- forward ----

def _target(model, answers):
    _, target = model.generator.encode_answers(answers)
    return target


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_forward_scores_passages_by_q_dot_d_and_matches_reference_loss(small, mode):
    from pyrag.models.rag import RagSequence, RagToken
    from pyrag.reference import rag_sequence_loss_reference, rag_token_loss_reference

    base, _, qa, kb = small
    model = (RagToken if mode == "token" else RagSequence)(base.question_encoder, base.generator, kb, n_docs=3)
    qs, ans = [r["question"] for r in qa[:5]], [r["answers"][0] for r in qa[:5]]
    out = model(qs, ans, reduction="none")
    B, K = 5, 3
    assert out.rows.shape == (B, K) and out.doc_scores.shape == (B, K) and len(out.ids) == B
    assert out.ids == kb.ids(out.rows) and out.titles == kb.passages(out.rows)[0]
    toks = model.question_encoder.tokenize(qs)
    q = model.question_encoder(toks["input_ids"], toks["attention_mask"])
    torch.testing.assert_close(out.doc_scores, torch.einsum("bd,bkd->bk", q, kb.vectors(out.rows)))
    target = _target(model, ans)
    ref_fn = rag_token_loss_reference if mode == "token" else rag_sequence_loss_reference
    for eps in (0.0, 0.2):
        o = model(qs, ans, reduction="none", epsilon=eps)
        ref = ref_fn(o.logits, o.doc_scores, target, epsilon=eps, reduction="none")
        torch.testing.assert_close(o.per_question_loss, ref, rtol=1e-5, atol=1e-5)
    # exclude_bos_score drops the <s> target from the likelihood
    o = model(qs, ans, reduction="none", exclude_bos_score=True)
    t2 = target.clone()
    t2[:, 0] = -100
    torch.testing.assert_close(o.per_question_loss, ref_fn(o.logits, o.doc_scores, t2, reduction="none"),
                               rtol=1e-5, atol=1e-5)
    # posterior p(z|x,y) ∝ p(z|x) p(y|x,z)
    lp = torch.log_softmax(out.logits.float(), -1)
    tok_lp = lp.view(B, K, *lp.shape[1:]).gather(-1, target.clamp(min=0)[:, None, :, None].expand(B, K, -1, 1))
    ll = torch.where(target[:, None, :] >= 0, tok_lp.squeeze(-1), 0.0).sum(-1)
    post = torch.softmax(torch.log_softmax(out.doc_scores, 1) + ll, 1)
    torch.testing.assert_close(out.doc_posterior, post, rtol=1e-4, atol=1e-5)
    # the loss trains the question encoder through the scores, and the generator
    model.zero_grad(set_to_none=True)
    model(qs, ans).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.question_encoder.named_parameters() if "word_embeddings" in n)
    assert model.generator.model.get_output_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_n_docs_at_generation_may_differ_from_training(small):
    model, _, qa, _kb = small
    qs = [r["question"] for r in qa[:3]]
    for k in (1, 2, 5):
        g = model.generate(qs, n_docs=k, num_beams=2, max_new_tokens=4)
        assert g.rows.shape == (3, k) and g.doc_prior.shape == (3, k) and len(g.answers) == 3
        assert torch.allclose(g.doc_prior.sum(1), torch.ones(3))
        assert model(qs, ["x"] * 3, n_docs=k).doc_posterior.shape == (3, k)
    assert model.n_docs == 3
    # RAG-Sequence too, in both decodings: K passages retrieved and marginalised at generation
    from pyrag.models.rag import RagSequence

    seq = RagSequence(model.question_encoder, model.generator, model.kb, n_docs=3)
    for k in (1, 4):
        for decoding in ("fast", "thorough"):
            g = seq.generate(qs, n_docs=k, num_beams=2, max_new_tokens=4, decoding=decoding)
            assert g.rows.shape == (3, k) and len(g.answers) == 3, decoding
            assert torch.allclose(g.doc_prior.sum(1), torch.ones(3))
            assert bool((g.scores <= 0).all()), g.scores  # marginal log-likelihoods over the k passages


def test_save_and_load_roundtrip_references_the_kb(small, tmp_path):
    import json

    from pyrag.models.rag import RagModel, RagToken

    model, _, qa, kb = small
    qs, ans = [r["question"] for r in qa[:4]], [r["answers"][0] for r in qa[:4]]
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"pyrag_rag.json", "question_encoder", "generator"}
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "m" / "generator").iterdir())
    assert json.loads((tmp_path / "m" / "pyrag_rag.json").read_text())["kb_path"] == str(kb.path.resolve())
    loaded = RagModel.from_pretrained(tmp_path / "m")
    assert type(loaded) is RagToken and loaded.n_docs == 3 and loaded.kb.path == kb.path
    torch.testing.assert_close(loaded(qs, ans).loss, model(qs, ans).loss)
    assert torch.equal(loaded.generate(qs, max_new_tokens=5).sequences, model.generate(qs, max_new_tokens=5).sequences)
    model.save_pretrained(tmp_path / "m")  # overwriting an existing save works (atomic replace)
    # ... but never a directory holding other things: a project folder, a knowledge base (saving replaces the
    # whole directory, so it would be deleted)
    proj = tmp_path / "project"
    (proj / "data").mkdir(parents=True)
    (proj / "notes.txt").write_text("important")
    for target in (proj, kb.path):
        with pytest.raises(FileExistsError, match="refusing to replace.*no pyrag_rag.json"):
            model.save_pretrained(target)
    assert (proj / "notes.txt").read_text() == "important" and (proj / "data").is_dir()
    assert RagModel.from_pretrained(tmp_path / "m").n_docs == 3  # (kb untouched: still opens)
    with pytest.raises(FileExistsError, match="not a directory"):
        model.save_pretrained(proj / "notes.txt")
    model.save_pretrained(tmp_path / "empty_dir_is_fine")
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    assert (tmp_path / "empty" / "pyrag_rag.json").is_file()
    cfg = json.loads((tmp_path / "m" / "pyrag_rag.json").read_text())
    cfg["kb_path"] = str(tmp_path / "gone")
    cfg["kb_path_relative"] = "../gone"
    (tmp_path / "m" / "pyrag_rag.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="knowledge base this model was saved with is gone"):
        RagModel.from_pretrained(tmp_path / "m")
    assert RagModel.from_pretrained(tmp_path / "m", kb=kb.path).kb.path == kb.path


def test_a_model_and_its_kb_moved_together_still_load(tmp_path):
    import shutil

    from pyrag.models.rag import RagModel

    model, _, qa, _kb = tiny_setup(tmp_path / "project", n=16, n_docs=2)
    model.save_pretrained(tmp_path / "project" / "model")
    shutil.move(tmp_path / "project", tmp_path / "moved")  # the recorded absolute KB path is gone now
    loaded = RagModel.from_pretrained(tmp_path / "moved" / "model")
    assert loaded.kb.path.resolve() == (tmp_path / "moved" / "kb").resolve()
    qs = [r["question"] for r in qa[:2]]
    assert loaded.generate(qs, num_beams=1, max_new_tokens=4).ids == model.generate(qs, num_beams=1,
                                                                                     max_new_tokens=4).ids


# ---- decoder-only generator ----

def test_decoder_only_generator_marginalises_answer_tokens_only(small):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from pyrag.models.rag import RagSequence, RagToken

    base, passages, qa, kb = small
    bt = bart_tokenizer([p["title"] + " / " + p["text"] for p in passages] + [q["question"] for q in qa])
    vocab = {k: v for k, v in bt.get_vocab().items() if k not in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    vocab = {k: i for i, k in enumerate(["<|endoftext|>"] + sorted(vocab, key=vocab.get))}
    tok = GPT2Tokenizer(vocab=vocab, merges=[])  # byte-level symbols only
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                    bos_token_id=0, eos_token_id=0)).eval()
    qs, ans = [r["question"] for r in qa[:3]], [r["answers"][0] for r in qa[:3]]
    for cls in (RagSequence, RagToken):
        model = cls.from_parts(base.question_encoder, lm, kb, n_docs=2, tokenizer=tok).eval()  # no dropout
        assert model.generator.kind == "causal"
        out = model(qs, ans, reduction="none")
        # reference: each prompt + answer run alone (no padding), log p of the answer tokens and </s> only
        ll = torch.zeros(3, 2, 8)
        for b in range(3):
            for k in range(2):
                prompt = tok(f"{out.titles[b][k]} / {out.texts[b][k]} // {qs[b]} answer:")["input_ids"]
                answer = tok(" " + ans[b])["input_ids"] + [tok.eos_token_id]
                ids = torch.tensor([prompt + answer])
                lp = torch.log_softmax(lm(ids).logits[0, len(prompt) - 1:-1].float(), -1)
                ll[b, k, : len(answer)] = lp.gather(1, torch.tensor(answer)[:, None]).squeeze(1)
        prior = torch.log_softmax(out.doc_scores, 1)
        if cls is RagSequence:
            ref = -torch.logsumexp(prior + ll.sum(-1), 1)
        else:
            ref = -(torch.logsumexp(prior[:, :, None] + ll, 1) * (ll != 0).any(1)).sum(-1)
        torch.testing.assert_close(out.per_question_loss.detach(), ref.detach(), rtol=1e-4, atol=1e-4)
        g = model.generate(qs, num_beams=2, max_new_tokens=3)
        assert g.sequences.shape[0] == 3 and g.sequences.shape[1] <= 3 and len(g.answers) == 3
        # with one passage the marginal is the LM's own distribution: the tokens of HF's generate on each prompt
        lengths = []
        for beams in (1, 3):
            g = model.generate(qs, num_beams=beams, max_new_tokens=6, n_docs=1, length_penalty=1.0,
                               early_stopping=False)
            for b in range(3):
                prompt = torch.tensor([tok(f"{g.titles[b][0]} / {g.texts[b][0]} // {qs[b]} answer:")["input_ids"]])
                ref = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, num_beams=beams,
                                  do_sample=False, eos_token_id=0, pad_token_id=0, length_penalty=1.0,
                                  early_stopping=False)[0, prompt.shape[1]:].tolist()
                mine = g.sequences[b].tolist()
                assert _until_eos(mine) == _until_eos(ref), (cls.__name__, beams, b, mine, ref)
                lengths.append(len(_until_eos(ref)))
        assert max(lengths) >= 3, lengths  # real answers were compared, not an immediate end of text


def test_inputs_and_decoding_fit_the_generators_positions(small):
    """Generators with few learned positions (BART 18, GPT-2 36): inputs are cut to fit them, keeping the question,
    instead of an index error inside the model; a max_new_tokens they cannot hold is a clear error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pyrag.models.rag import RagToken

    base, _, qa, kb = small
    tok = base.generator.tokenizer
    qs, ans = [r["question"] for r in qa[:3]], [r["answers"][0] for r in qa[:3]]
    r = base.retrieve(qs)
    assert base.generator.build_inputs(qs, r.titles, r.texts)[0].shape[1] > 18  # these inputs need cutting
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=36, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=2, pad_token_id=1))
    for gen, limit, decode_limit in ((tiny_bart(tok, max_position_embeddings=18), 18, 17), (gpt, 18, None)):
        model = RagToken.from_parts(base.question_encoder, gen, kb, n_docs=3, tokenizer=tok).eval()
        assert model.generator.input_limit == limit
        ids, mask = model.generator.build_inputs(qs, r.titles, r.texts)
        assert ids.shape[1] <= limit
        q_ids = tok(" // " + qs[0], add_special_tokens=False)["input_ids"]
        row = ids[0][mask[0]].tolist()
        assert any(row[i:i + len(q_ids)] == q_ids for i in range(len(row))), "the question was cut"
        assert torch.isfinite(model(qs, ans).loss)
        longest = decode_limit if decode_limit is not None else 36 - ids.shape[1]
        assert len(model.generate(qs, num_beams=2, max_new_tokens=longest).answers) == 3
        with pytest.raises(ValueError, match=f"max_new_tokens={longest + 1}.* does not fit the generator's"):
            model.generate(qs, max_new_tokens=longest + 1)


def _until_eos(ids: list[int], eos: int = 0) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# ---- bad input ----

def test_bad_input_gives_clear_errors(small, tmp_path):
    from pyrag.models.rag import RagSequence, RagToken

    model, _, _qa, kb = small
    with pytest.raises(ValueError, match=r"questions\[1\] is empty"):
        model(["where ?", "  "], ["a", "b"])
    with pytest.raises(ValueError, match=r"questions\[0\] is empty"):
        model.generate([""])
    with pytest.raises(ValueError, match=r"answers\[0\] is empty"):
        model(["where ?"], [""])
    with pytest.raises(ValueError, match="differ in length"):
        model(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="n_docs=49 is larger than the knowledge base"):
        model(["where ?"], ["x"], n_docs=49)
    with pytest.raises(ValueError, match="n_docs=99 is larger"):
        model.generate(["where ?"], n_docs=99)
    short = RagToken.from_parts(model.question_encoder, model.generator.model, kb,
                                tokenizer=model.generator.tokenizer, max_answer_length=4)
    with pytest.raises(ValueError, match=r"answers\[0\] is \d+ tokens long, more than the generator's limit"):
        short(["where ?"], ["paris lima oslo kyoto cairo"])
    # a question encoder whose vectors do not fit the KB
    other = tiny_encoder(tmp_path / "enc")
    other.model.embeddings.word_embeddings = torch.nn.Embedding(other.model.config.vocab_size, 7)
    other.model.config.hidden_size = 7
    with pytest.raises(ValueError, match="KB/encoder mismatch"):
        RagToken(other, model.generator, kb)
    # same dimension, but not the pooling / normalisation the KB was built for
    for key, value in (("normalize", False), ("pooling", "cls")):
        wrong = tiny_encoder(tmp_path / f"enc_{key}")
        setattr(wrong, key, value)
        with pytest.raises(ValueError, match=f"KB/encoder mismatch.*{key}"):
            RagToken(wrong, model.generator, kb)
    # generators without a tokenizer
    model.generator.model.save_pretrained(tmp_path / "gen_no_tok")
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        RagToken.from_parts(model.question_encoder, tmp_path / "gen_no_tok", kb)
    with pytest.raises(ValueError, match="without a tokenizer"):
        RagToken.from_parts(model.question_encoder, model.generator.model, kb)
    with pytest.raises(ValueError, match="generator directory not found"):
        RagToken.from_parts(model.question_encoder, tmp_path / "nowhere", kb)
    # precomputed path with inconsistent shapes, unknown generation settings, wrong decoding
    with pytest.raises(ValueError, match=r"must be \[B\*K, L\]"):
        model(context_input_ids=torch.ones(5, 4, dtype=torch.long), context_attention_mask=torch.ones(5, 4),
              doc_scores=torch.zeros(2, 3), labels=torch.ones(2, 3, dtype=torch.long))
    ids, mask = torch.ones(6, 4, dtype=torch.long), torch.ones(6, 4)
    nan, inf = float("nan"), float("inf")
    for seq_model in (model, RagSequence(model.question_encoder, model.generator, kb, n_docs=3)):
        for scores, err, match in (
            (torch.tensor([[0.0, nan, 1.0], [0.0, 0.0, 0.0]]), ValueError, r"doc_scores\[0, 1\] = nan"),
            (torch.tensor([[0.0, 1.0, 1.0], [inf, 0.0, 0.0]]), ValueError, r"doc_scores\[1, 0\] = inf"),
            (torch.full((2, 3), -inf), ValueError, "no finite passage score for question 0"),
            (torch.zeros(6), ValueError, r"doc_scores must be a float tensor \[B, K\]"),
        ):
            with pytest.raises(err, match=match):
                seq_model.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores)
        with pytest.raises(ValueError, match=r"context_attention_mask must be \[B\*K, L\]"):
            seq_model.generate(context_input_ids=ids, context_attention_mask=mask[:, :3], doc_scores=torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"doc_scores\[0, 1\] = nan"):
            seq_model(context_input_ids=ids, context_attention_mask=mask, labels=torch.ones(2, 3, dtype=torch.long),
                      doc_scores=torch.tensor([[0.0, nan, 1.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="num_beams must be a positive int"):
        model.generate(["where ?"], num_beams=True)
    with pytest.raises(TypeError, match="unknown settings"):
        model.generate(["where ?"], temperature=0.5)
    with pytest.raises(ValueError, match="RagToken decodes with greedy / beam search only"):
        model.generate(["where ?"], decoding="fast")
    with pytest.raises(ValueError, match="n_docs must be a positive int"):
        model(["where ?"], ["x"], n_docs=0)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_chunked_vocabulary_projection_equals_full_logits(small, mode):
    """Past head_chunk_bytes the loss projects a few questions at a time (recomputed in backward): same loss,
    posterior and gradients as with the whole [B*K, T, V] logits."""
    from pyrag.models.rag import RagSequence, RagToken

    base, _, qa, kb = small
    model = (RagToken if mode == "token" else RagSequence)(base.question_encoder, base.generator, kb, n_docs=3)
    model.eval()
    qs, ans = [r["question"] for r in qa[:5]], [r["answers"][0] for r in qa[:5]]
    results = []
    model.generator._split = None  # the split's one-time self-check runs again below
    for chunk_bytes in (1 << 40, 1):  # whole logits; one question per chunk
        model.head_chunk_bytes = chunk_bytes
        model.zero_grad(set_to_none=True)
        rng = torch.get_rng_state()
        out = model(qs, ans, epsilon=0.1, reduction="sum")
        # in eval mode nothing draws from the global RNG, the self-check included (training state: exact resume)
        assert torch.equal(torch.get_rng_state(), rng)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, g_full), (chunked, g_chunked) = results
    assert full.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.doc_posterior, full.doc_posterior, rtol=1e-5, atol=1e-6)
    assert g_full.keys() == g_chunked.keys()
    for n in g_full:
        torch.testing.assert_close(g_chunked[n], g_full[n], rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_t5_generator_trains_decodes_and_splits_its_output_layer(small):
    """T5 (no BOS, relative positions, a rescaled tied output layer) as the generator: the loss matches the
    reference, the chunked vocabulary projection matches the full logits, and decoding works."""
    from transformers import T5Config, T5ForConditionalGeneration

    from pyrag.models.rag import RagSequence
    from pyrag.reference import rag_sequence_loss_reference

    base, _, qa, kb = small
    tok = base.generator.tokenizer
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                             d_kv=16, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                             dropout_rate=0.0))
    model = RagSequence.from_parts(base.question_encoder, t5, kb, n_docs=3, tokenizer=tok).eval()
    assert model.generator.bos_token_id is None and model.generator.decoder_start_token_id == 1
    qs, ans = [r["question"] for r in qa[:4]], [r["answers"][0] for r in qa[:4]]
    out = model(qs, ans, reduction="none", exclude_bos_score=True)  # no BOS: nothing to exclude
    _, target = model.generator.encode_answers(ans)
    torch.testing.assert_close(out.per_question_loss,
                               rag_sequence_loss_reference(out.logits, out.doc_scores, target, reduction="none"),
                               rtol=1e-5, atol=1e-5)
    model.head_chunk_bytes = 1
    chunked = model(qs, ans, reduction="none")
    assert chunked.logits is None
    torch.testing.assert_close(chunked.per_question_loss, out.per_question_loss, rtol=1e-5, atol=1e-5)
    g = model.generate(qs, num_beams=2, max_new_tokens=4)
    assert (g.sequences[:, 0] == 1).all() and g.sequences.shape[1] <= 5
    # with one passage, RAG-Sequence decoding is T5's own beam search on that passage's input
    lengths = []
    for beams in (1, 3):
        g = model.generate(qs, num_beams=beams, max_new_tokens=5, n_docs=1, length_penalty=1.0, early_stopping=False)
        for b in range(4):
            ids, mask = model.generator.build_inputs([qs[b]], [[g.titles[b][0]]], [[g.texts[b][0]]])
            ref = t5.generate(ids, attention_mask=mask.long(), num_beams=beams, max_new_tokens=5, do_sample=False,
                              decoder_start_token_id=1, eos_token_id=2, pad_token_id=1, length_penalty=1.0,
                              early_stopping=False)[0].tolist()
            mine = g.sequences[b].tolist()
            assert _until_eos(mine, 2) == _until_eos(ref, 2), (beams, b, mine, ref)
            lengths.append(len(_until_eos(ref, 2)))
    assert max(lengths) >= 3, lengths
