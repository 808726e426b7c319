"""Tiny random encoders for the retriever tests (test_encoders, test_kb, test_retriever_train): a WordPiece
vocabulary built locally from a word list, BERT / DPR models from small configs, saved as HF directories."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BASE_WORDS = ["the", "a", "an", "of", "is", "in", "on", "at", "to", "who", "what", "where", "when", "which", "how", "why", "did", "does", "was", "were", "capital", "city", "river", "country", "king", "queen", "born", "lives", "lived", "founded", "built", "year", "name", "color", "red", "green", "blue", "large", "small", "old", "new", "north", "south", "east", "west", "paris", "france", "london", "rome", "berlin", "tokyo", "water", "mountain", "lake", "island"]


def tiny_tokenizer(words=BASE_WORDS):
    """A lower-casing WordPiece BertTokenizer over SPECIAL + words + a few suffix pieces."""
    from transformers import BertTokenizer

    vocab = list(dict.fromkeys(SPECIAL + [w.lower() for w in words] + ["##s", "##ed", "##ing", "."]))
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def save_tiny_bert(path, words=BASE_WORDS, *, hidden=32, layers=2, heads=2, dropout=0.0, seed=0,
                   max_position=64) -> Path:
    """A randomly initialised BertModel + tokenizer saved as an HF directory."""
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer(words)
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_position,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = BertModel(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_encoder(path, words=BASE_WORDS, *, pooling="mean", normalize=False, max_length=64, **kw):
    """Encoder.from_pretrained over a freshly saved tiny BERT."""
    from pyrag.models.encoders import Encoder

    save_tiny_bert(path, words, **kw)
    return Encoder.from_pretrained(path, pooling=pooling, normalize=normalize, max_length=max_length)
