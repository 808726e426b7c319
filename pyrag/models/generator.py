"""The generator side of RAG: HF's "title / text // question" inputs (truncating the passage, never the question),
answer tokenisation, and one interface over HF seq2seq (BART, T5) and decoder-only models that the losses and the
decoders use: teacher-forced logits, and start / step / reorder for cached step-by-step decoding."""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CausalGenerator",
    "InputFormat",
    "Seq2SeqGenerator",
    "format_context",
    "load_generator",
    "tokenize_contexts",
]


@dataclass
class InputFormat:
    """How a passage and a question become one generator input (HF's RagConfig fields of the same names).

    title_sep, doc_sep, prefix: as HF's RagRetriever.postprocess_docs uses them. max_combined_length: the most
    tokens one input may have (HF: 300); unlike HF, the passage text is cut to fit, never the question, and rows
    are padded to the longest row of the batch, not to max_combined_length. The question goes in as given (HF
    first round-trips it through the question encoder's tokenizer, which lower-cases it for uncased BERT).
    answer_prompt: decoder-only generators only, the text between the question and the answer."""

    title_sep: str = " / "
    doc_sep: str = " // "
    prefix: str | None = None
    max_combined_length: int = 300
    answer_prompt: str = " answer:"

    def to_dict(self) -> dict:
        return asdict(self)


def format_context(title: str, text: str, question: str, fmt: InputFormat, suffix: str = "") -> str:
    """prefix + title + title_sep + text + doc_sep + question, with HF's quirks: surrounding double quotes are
    stripped from the title and every double space becomes one (RagRetriever.postprocess_docs)."""
    title = title.removeprefix('"').removesuffix('"')
    return ((fmt.prefix or "") + title + fmt.title_sep + text + fmt.doc_sep + question + suffix).replace("  ", " ")


def _split_tail(full: str, question: str, fmt: InputFormat, suffix: str) -> tuple[str, str]:
    """(head, tail) of a formatted input: tail = doc_sep + question (+ suffix), the part that must survive."""
    tail = (fmt.doc_sep + question + suffix).replace("  ", " ")
    if full.endswith(tail):
        return full[: len(full) - len(tail)], tail
    # The double-space rule merged a space across the boundary (text ending in a space): drop it from the head.
    return full[: len(full) - len(tail) + 1].rstrip(), tail


def tokenize_contexts(tokenizer, questions: list[str], titles: list[list[str]], texts: list[list[str]],
                      fmt: InputFormat, *, max_length: int | None = None, suffix: str = "",
                      add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of the B*K generator inputs, row b*K + k for passage k of question b (HF's order).

    A row that fits in max_length (default fmt.max_combined_length) is tokenised exactly as HF tokenises it.
    A longer row keeps its question: the passage text is cut (at a token boundary, found through the fast
    tokenizer's offsets) until the row fits; HF would instead cut the end of the row, i.e. the question."""
    max_length = fmt.max_combined_length if max_length is None else max_length
    strings, tails, owner = [], [], []
    for b, q in enumerate(questions):
        for t, x in zip(titles[b], texts[b]):
            strings.append(format_context(t, x, q, fmt, suffix))
            tails.append(q)
            owner.append(b)
    ids = tokenizer(strings, add_special_tokens=add_special_tokens)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long:
        # All long rows at once (one batched call for the heads, one for the cut rows: on a GPU this CPU work is
        # on the critical path of every step); rows a cut does not settle go through the row-by-row loop.
        todo = _truncate_batch(tokenizer, strings, tails, ids, long, fmt, suffix, max_length, add_special_tokens)
        for i in sorted(todo):  # in row order, so an error names the first bad row as the row loop would
            ids[i] = _truncate_passage(tokenizer, strings[i], tails[i], fmt, suffix, max_length, add_special_tokens,
                                       owner[i])
    return ids


def _with_offsets(tokenizer, text):
    """tokenizer(text) (a str or a list) without special tokens and with character offsets, or None where the
    tokenizer cannot give offsets (a slow, Python tokenizer)."""
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizer: callers cut through decode
        return None


def _truncate_batch(tokenizer, strings, tails, ids, long, fmt, suffix, max_length, add_special_tokens) -> list[int]:
    """Cuts the passage of each long row by the number of tokens it is over, in two batched tokenizer calls
    (needs a fast tokenizer's offsets). Writes the rows that fit into ids; returns the rows left to do."""
    split = [_split_tail(strings[i], tails[i], fmt, suffix) for i in long]
    enc = _with_offsets(tokenizer, [h for h, _ in split])
    if enc is None:
        return long
    todo, cuts, rows = [], [], []
    for j, i in enumerate(long):
        keep = len(enc["input_ids"][j]) - (len(ids[i]) - max_length)
        if keep <= 0:
            todo.append(i)
            continue
        head, tail = split[j]
        cuts.append(head[: enc["offset_mapping"][j][keep - 1][1]] + tail)
        rows.append(i)
    if cuts:
        for i, row in zip(rows, tokenizer(cuts, add_special_tokens=add_special_tokens)["input_ids"]):
            if len(row) <= max_length:
                ids[i] = row
            else:  # merges across the cut changed the count: the careful loop
                todo.append(i)
    return todo


def _truncate_passage(tokenizer, full, question, fmt, suffix, max_length, add_special_tokens, qi) -> list[int]:
    head, tail = _split_tail(full, question, fmt, suffix)
    enc = _with_offsets(tokenizer, head)
    if enc is not None:
        ends = [e for _, e in enc["offset_mapping"]]
    else:  # slow tokenizer: cut through decode instead
        enc = tokenizer(head, add_special_tokens=False)
        ends = None
    head_ids = enc["input_ids"]
    keep = len(head_ids)
    ids = tokenizer(head + tail, add_special_tokens=add_special_tokens)["input_ids"]
    while len(ids) > max_length:
        keep -= len(ids) - max_length
        if keep <= 0:
            ids = tokenizer(tail.lstrip(), add_special_tokens=add_special_tokens)["input_ids"]
            if len(ids) > max_length:
                raise ValueError(f"questions[{qi}] alone needs {len(ids)} tokens, more than the generator input's "
                                 f"limit of {max_length} (max_combined_length={fmt.max_combined_length}, capped by "
                                 f"the model's positions): {question[:80]!r}")
            return ids
        cut = head[: ends[keep - 1]] if ends is not None else tokenizer.decode(head_ids[:keep])
        ids = tokenizer(cut + tail, add_special_tokens=add_special_tokens)["input_ids"]
    return ids


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] ids and bool mask, padded to the longest row (not to a fixed length)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            sl = slice(L - len(r), L) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = True
    return ids, mask


def _check_texts(name: str, values) -> list[str]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}")
    if not values:
        raise ValueError(f"{name} is empty: give at least one")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}: {v!r}")
        if not v.strip():
            raise ValueError(f"{name}[{i}] is empty: {v!r}")
    return list(values)


def _cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache argument `cache`, 4.x `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _bucket_rows(lengths: list[int], overhead: int, max_buckets: int = 8) -> list[list[int]]:
    """Split rows into groups of similar length, minimising sum(group rows * group max length) + overhead per group
    (dynamic programming over the rows sorted by length). Padding every row to the batch's longest would waste
    the encoder's work on pad tokens; this keeps that waste small while a group stays one batched call."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ls = [lengths[i] for i in order]
    n = len(ls)
    # best[j][g] = min cost of the first j sorted rows in g groups
    inf = float("inf")
    best = [[inf] * (max_buckets + 1) for _ in range(n + 1)]
    back = [[0] * (max_buckets + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for g in range(1, max_buckets + 1):
            for i in range(j):  # group = sorted rows i..j-1, longest is ls[i]
                c = best[i][g - 1] + (j - i) * ls[i] + overhead
                if c < best[j][g]:
                    best[j][g], back[j][g] = c, i
    g = min(range(1, max_buckets + 1), key=lambda g: best[n][g])
    groups, j = [], n
    while j > 0:
        i = back[j][g]
        groups.append(order[i:j])
        j, g = i, g - 1
    return groups[::-1]


@dataclass
class _Seq2SeqState:
    base_hidden: torch.Tensor  # [M, L, d] encoder output of the M distinct inputs
    base_mask: torch.Tensor  # [M, L]
    hidden: torch.Tensor  # [N, L, d] expanded to the decoding rows
    mask: torch.Tensor  # [N, L]
    cache: object = None
    first_logits: torch.Tensor | None = None  # [N, V] after the decoder start token, consumed by step(None)
    shared: bool = False  # the cache's cross-attention part has one row per input, not per decoding row


class Seq2SeqGenerator(nn.Module):
    """An HF encoder-decoder (AutoModelForSeq2SeqLM: BART, T5, ...) with its tokenizer, as a RAG generator.

    Teacher forcing: `forward(input_ids [N, L], attention_mask, decoder_input_ids [N, T]) -> logits [N, T, V]`.
    Decoding: `start` encodes the N' distinct inputs once and expands them to the decoding rows; `step` feeds one
    token per row through the KV cache; `reorder` permutes the rows (beam search)."""

    kind = "seq2seq"

    def __init__(self, model: nn.Module, tokenizer, fmt: InputFormat | None = None, *,
                 max_answer_length: int | None = None, bucket_overhead: int | None = None):
        """bucket_overhead: the cost of one extra encoder call, in tokens, when grouping rows by length (None:
        64 on CPU, no grouping on GPU)."""
        super().__init__()
        if tokenizer is None:
            raise ValueError("the generator has no tokenizer: pass tokenizer=..., or a directory that holds one")
        if not getattr(model.config, "is_encoder_decoder", False):
            raise TypeError(f"{type(model).__name__} is not an encoder-decoder; use CausalGenerator for it")
        self.model = model
        self.tokenizer = tokenizer
        cfg, gcfg = model.config, getattr(model, "generation_config", None)
        self.fmt = fmt or InputFormat(prefix=getattr(cfg, "prefix", None))
        self.pad_token_id = _first_int(getattr(cfg, "pad_token_id", None), tokenizer.pad_token_id)
        self.eos_token_id = _first_int(getattr(gcfg, "eos_token_id", None), getattr(cfg, "eos_token_id", None),
                                       tokenizer.eos_token_id)
        # the model's own BOS only (T5 has none), as HF's get_nll reads it for exclude_bos_score
        self.bos_token_id = _first_int(getattr(cfg, "bos_token_id", None))
        self.decoder_start_token_id = _first_int(getattr(gcfg, "decoder_start_token_id", None),
                                                 getattr(cfg, "decoder_start_token_id", None), self.pad_token_id)
        if self.pad_token_id is None or self.eos_token_id is None or self.decoder_start_token_id is None:
            raise ValueError(f"the generator needs pad, eos and decoder-start token ids: {self.pad_token_id=} "
                             f"{self.eos_token_id=} {self.decoder_start_token_id=}")
        # learned absolute positions (BART, Pegasus) bound the encoder input and the decoded length; T5's relative
        # positions bound neither (None)
        self.position_limit = _first_int(getattr(cfg, "max_position_embeddings", None))
        limit = self.position_limit
        if limit is None:
            tl = getattr(tokenizer, "model_max_length", None)
            limit = tl if isinstance(tl, int) and tl < 100_000 else 512
        self.max_answer_length = int(max_answer_length or limit)
        self.bucket_overhead = bucket_overhead
        self._cache_kw = _cache_kwarg(model)
        self._split: bool | None = None  # whether decoder_hidden + _head reproduce the model's logits
        self._shared_cross: list | None = None  # see _cross_sharing
        self._shared_for = 0  # id() of the model _shared_cross was probed on (it holds that model's modules)
        self._swap_depth, self._swap_saved = 0, []  # threads inside _cross_sharing; the configs it replaced

    # ---- inputs ----
    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build_inputs(self, questions: list[str], titles: list[list[str]], texts: list[list[str]]):
        """(input_ids [B*K, L], attention_mask [B*K, L] bool) of "title / text // question", row b*K + k,
        padded to the longest row of this batch."""
        rows = tokenize_contexts(self.tokenizer, questions, titles, texts, self.fmt, max_length=self.input_limit)
        ids, mask = _pad(rows, self.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @property
    def input_limit(self) -> int:
        """Most tokens of one generator input: max_combined_length, capped by the encoder's positions."""
        return min(self.fmt.max_combined_length, self.position_limit or self.fmt.max_combined_length)

    def check_lengths(self, input_ids: torch.Tensor, max_new_tokens: int | None = None) -> None:
        """Inputs given from outside (HF's precomputed contexts) must fit the encoder's positions, and the decoder's
        must hold the start token + max_new_tokens: clear errors instead of an index error inside the model."""
        lim = self.position_limit
        if lim is None:
            return
        if input_ids.shape[1] > lim:
            raise ValueError(f"context_input_ids has {input_ids.shape[1]} tokens per row, more than the generator's "
                             f"{lim} positions")
        p0 = self.decoder_prompt(1).shape[1]
        if max_new_tokens is not None and p0 + max_new_tokens > lim:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the generator's {lim} decoder positions "
                             f"(at most {lim - p0})")

    def encode_answers(self, answers: list[str]):
        """(decoder_input_ids [B, T], target [B, T]) with target = the tokenised answer (BART: <s> a </s>,
        T5: a </s>) padded with -100, and decoder_input_ids = decoder start + target[:-1] (HF's shift right)."""
        answers = _check_texts("answers", answers)
        rows = self._answer_rows(answers)
        for i, r in enumerate(rows):
            if len(r) > self.max_answer_length:
                raise ValueError(f"answers[{i}] is {len(r)} tokens long, more than the generator's limit "
                                 f"max_answer_length={self.max_answer_length}: {answers[i][:80]!r}")
        T = max(len(r) for r in rows)
        target = torch.full((len(rows), T), -100, dtype=torch.long)
        dec = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            target[i, : len(r)] = torch.tensor(r)
            dec[i, 0] = self.decoder_start_token_id
            dec[i, 1: len(r)] = torch.tensor(r[:-1])
        return dec.to(self.device), target.to(self.device)

    def _answer_rows(self, answers: list[str]) -> list[list[int]]:
        return self.tokenizer(answers, add_special_tokens=True)["input_ids"]

    def answer_lengths(self, answers: list[str]) -> list[int]:
        """Target tokens of each answer (what max_answer_length bounds), without the limit check: lets a trainer
        find every over-long record before it starts."""
        return [len(r) for r in self._answer_rows(_check_texts("answers", answers))]

    def decoder_prompt(self, n: int) -> torch.Tensor:
        """[n, 1] decoder start tokens: the first column of every generated sequence (as HF returns it)."""
        return torch.full((n, 1), self.decoder_start_token_id, dtype=torch.long, device=self.device)

    # ---- teacher forcing ----
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output [N, L, d]. Rows are run in groups of similar length (each group cut to its own longest
        row), so pad tokens cost little; positions past a row's end hold zeros (the decoder masks them)."""
        encoder = self.model.get_encoder()
        lengths = attention_mask.sum(1).tolist()
        overhead = self.bucket_overhead
        if overhead is None:  # small groups cost little on CPU; on GPU one big call beats several small ones
            overhead = 64 if input_ids.device.type == "cpu" else None
        one = overhead is None or len(lengths) < 2 or max(lengths) == min(lengths)
        groups = [list(range(len(lengths)))] if one else _bucket_rows(lengths, overhead)
        if len(groups) == 1:
            return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        L = input_ids.shape[1]
        parts, index = [], []
        for g in groups:
            rows = torch.tensor(g, device=input_ids.device)
            Lg = max(lengths[i] for i in g)
            h = encoder(input_ids=input_ids[rows, :Lg], attention_mask=attention_mask[rows, :Lg]).last_hidden_state
            parts.append(nn.functional.pad(h, (0, 0, 0, L - Lg)))
            index.extend(g)
        inverse = torch.empty(len(index), dtype=torch.long)
        inverse[torch.tensor(index)] = torch.arange(len(index))
        return torch.cat(parts).index_select(0, inverse.to(input_ids.device))

    def forward(self, input_ids, attention_mask, decoder_input_ids, encoder_hidden=None) -> torch.Tensor:
        """Logits [N, T, V] of decoder_input_ids [N, T] given the inputs [N, L] (or their encoder output)."""
        from transformers.modeling_outputs import BaseModelOutput

        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                         attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False)
        return out.logits

    def decoder_hidden(self, input_ids, attention_mask, decoder_input_ids, encoder_hidden=None):
        """(hidden [N, T, d], head) with head(hidden) == forward(...) (the logits), or None when this model's output
        layer is not one pyrag knows how to split off (checked once against the full forward). Lets the loss
        apply the vocabulary projection a few questions at a time instead of holding all [N, T, V] logits."""
        if self._split is None:
            self._split = self._check_split()
        if not self._split:
            return None
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        out = self.model.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                                       encoder_attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, self._head

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        cfg = m.config
        # T5 rescales before its (tied) output projection: transformers 5 says so in scale_decoder_outputs, 4.x
        # whenever the embeddings are tied
        t5 = getattr(cfg, "model_type", "") in ("t5", "mt5", "umt5")
        if t5 and getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
            h = h * (cfg.d_model ** -0.5)
        z = m.get_output_embeddings()(h)
        bias = getattr(m, "final_logits_bias", None)  # BART-family models add a vocabulary bias
        return z + bias.to(z.device) if bias is not None else z

    @contextmanager
    def _probe(self):
        """For the one-time probes of _check_split / _check_shared_cross: the model in eval mode without
        gradients (its training flag restored after), yielding (model, device, hidden size)."""
        m = self.model
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                d = m.config.d_model if hasattr(m.config, "d_model") else m.get_input_embeddings().weight.shape[1]
                yield m, self.device, d
        finally:
            m.train(was)

    def _check_split(self) -> bool:
        from transformers.modeling_outputs import BaseModelOutput

        try:
            with self._probe() as (m, dev, d):
                ids = torch.tensor([[self.decoder_start_token_id, self.eos_token_id]], device=dev)
                # a private generator: the global RNG state is training state (dropout; exact resume)
                enc = torch.randn(1, 3, d, generator=torch.Generator().manual_seed(0)).to(dev)
                mask = torch.ones(1, 3, dtype=torch.bool, device=dev)
                full = m(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                         decoder_input_ids=ids, use_cache=False).logits
                h = m.get_decoder()(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                    use_cache=False).last_hidden_state
                return bool(torch.allclose(self._head(h), full, rtol=1e-4, atol=1e-4))
        except Exception:  # noqa: BLE001 - a model this probe cannot drive takes the full-logits path
            return False

    # ---- decoding ----
    def _prefill(self, hidden, mask, expand: torch.Tensor, share: bool = False):
        """Run the decoder start token over the M distinct inputs (computing each one's cross-attention keys and
        values once), then copy the cache and logits out to the rows expand [N] (HF computes the cross-attention
        keys/values of every decoding row itself: num_beams times the work). share: leave the cross-attention
        keys/values at M rows (expand must then be arange(M).repeat_interleave(N // M); see _cross_sharing)."""
        from transformers.modeling_outputs import BaseModelOutput

        start = self.decoder_prompt(hidden.shape[0])
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                         decoder_input_ids=start, use_cache=True)
        cache = _reorder_cache(_out_cache(out), expand, cross=not share)
        return cache, out.logits[:, -1].float().index_select(0, expand)

    def start(self, input_ids, attention_mask, expand: torch.Tensor) -> _Seq2SeqState:
        """Encode the M distinct inputs once and feed the decoder start token; decoding row r reads input
        expand[r]. The first step(state, None) returns the logits after the start token."""
        h = self.encode(input_ids, attention_mask)
        M, N = h.shape[0], expand.shape[0]
        # rows in runs of N // M per input (RAG-Sequence's beams): they can read one copy of their input's
        # cross-attention keys/values instead of N // M copies
        share = (N > M and N % M == 0 and self._can_share_cross()
                 and torch.equal(expand, torch.arange(M, device=expand.device).repeat_interleave(N // M)))
        cache, logits = self._prefill(h, attention_mask, expand, share)
        return _Seq2SeqState(h, attention_mask, h.index_select(0, expand), attention_mask.index_select(0, expand),
                             cache, logits, share)

    def step(self, state: _Seq2SeqState, tokens: torch.Tensor | None) -> torch.Tensor:
        """Feed tokens [N] (one per decoding row) and return the next-token logits [N, V] in fp32; None: the
        logits after the decoder start token (already computed by start)."""
        from transformers.modeling_outputs import BaseModelOutput

        if tokens is None:
            logits, state.first_logits = state.first_logits, None
            return logits
        # the encoder output is passed along only so that the model takes its cross-attention branch: the keys and
        # values come from the cache
        with self._cross_sharing(state.shared):
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state.hidden),
                             attention_mask=state.mask, decoder_input_ids=tokens[:, None], use_cache=True,
                             **{self._cache_kw: state.cache})
        state.cache = _out_cache(out)
        return out.logits[:, -1].float()

    def reorder(self, state: _Seq2SeqState, index: torch.Tensor) -> None:
        """Row r continues from row index[r]. index must keep each row on the same input (beams of one group):
        then the cross-attention keys/values and the encoder output are already right and only the decoder's
        self-attention cache is permuted (HF permutes all of them)."""
        state.cache = _reorder_cache(state.cache, index, cross=False)

    @contextmanager
    def _cross_sharing(self, on: bool):
        """While on, the decoder's cross-attention layers run _shared_kv_sdpa, which lets the N query rows read the
        M = N / r rows of keys/values in the cache. Only those layers' config is swapped (a copy naming the shared
        function), so the masks are built as for sdpa and self-attention is untouched; restored on exit."""
        if not on:
            yield
            return
        mods = self._shared_cross
        # Several threads may decode with one generator: the first to enter installs the copies, the last to leave
        # restores the originals. Steps that do not share meanwhile are unaffected: _shared_kv_sdpa hands equal
        # row counts to transformers' sdpa function, which is what these layers ran before.
        with _SWAP_LOCK:
            if self._swap_depth == 0:
                self._swap_saved = [m.config for m, _ in mods]
                for m, cfg in mods:
                    m.config = cfg
            self._swap_depth += 1
        try:
            yield
        finally:
            with _SWAP_LOCK:
                self._swap_depth -= 1
                if self._swap_depth == 0:
                    for (m, _), cfg in zip(mods, self._swap_saved):
                        m.config = cfg
                    self._swap_saved = []

    def _can_share_cross(self) -> bool:
        """Whether this model's cross-attention can read shared keys/values with bit-identical results: on CPU,
        with sdpa attention, for decoders whose cross-attention layers (`encoder_attn`, the BART family) look up
        their attention function in transformers' AttentionInterface; checked once on a small case against the
        copied cache. On GPU the fused kernels may pick another algorithm for the grouped shape, so the copies stay.
        Reading one copy per input saves copying the keys/values num_beams times and, each step, reading them
        num_beams times: the cross-attention is memory-bound (BART-base, 160 rows x 300 tokens: 1.2 GB a step)."""
        if self.device.type != "cpu" or getattr(self.model.config, "_attn_implementation", None) != "sdpa":
            return False
        if self._shared_cross is None or self._shared_for != id(self.model):  # probed for this very model
            self._shared_cross = self._find_shared_cross()
            self._shared_for = id(self.model)
        return bool(self._shared_cross)

    def _find_shared_cross(self) -> list:
        """[(cross-attention module, config copy naming _shared_kv_sdpa)] if the probe passes, else []."""
        import copy

        try:
            from transformers import AttentionInterface
        except ImportError:  # transformers 4.x without the interface
            return []
        m = self.model
        mods = [mod for name, mod in m.get_decoder().named_modules()
                if name.endswith("encoder_attn") and isinstance(getattr(mod, "config", None), type(m.config))]
        if not mods:
            return []
        AttentionInterface.register(_SHARED_KV, _shared_kv_sdpa)
        pairs = []
        for mod in mods:
            cfg = copy.copy(mod.config)
            cfg._attn_implementation_internal = _SHARED_KV  # the attribute behind the property; no sub-config walk
            pairs.append((mod, cfg))
        self._shared_cross = pairs
        try:
            ok = self._check_shared_cross()
        except Exception:  # noqa: BLE001 - a model this probe cannot drive keeps the copied keys/values
            ok = False
        return pairs if ok else []

    def _check_shared_cross(self) -> bool:
        """Decode 2 inputs (one padded) x 3 rows for a few steps, with a row reorder, with the cross-attention
        keys/values shared and copied; True when every logit is bit-identical."""
        with self._probe() as (_, dev, d):
            g = torch.Generator().manual_seed(0)
            h = torch.randn(2, 7, d, generator=g).to(dev)
            mask = torch.ones(2, 7, dtype=torch.bool, device=dev)
            mask[1, 4:] = False
            expand = torch.arange(2, device=dev).repeat_interleave(3)
            index = torch.tensor([1, 1, 0, 5, 3, 3], device=dev)
            V = self.vocab_size
            runs = []
            for share in (False, True):
                cache, first = self._prefill(h, mask, expand, share)
                st = _Seq2SeqState(h, mask, h.index_select(0, expand), mask.index_select(0, expand), cache, first,
                                   share)
                logits = [self.step(st, None)]
                for t in range(3):
                    tokens = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(t)).to(dev)
                    logits.append(self.step(st, tokens))
                    self.reorder(st, index)
                runs.append(torch.stack(logits))
            return bool(torch.equal(runs[0], runs[1]))

    def candidate_logits(self, state: _Seq2SeqState, src: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [M, T, V] of candidates [M, T] (decoder inputs, starting with the decoder start)
        under the distinct inputs src [M] of `start`: the encoder is not run again, and the cross-attention
        keys/values are computed once per distinct input of this batch of candidates, then copied."""
        from transformers.modeling_outputs import BaseModelOutput

        uniq, local = torch.unique(src, return_inverse=True)
        cache, first = self._prefill(state.base_hidden.index_select(0, uniq), state.base_mask.index_select(0, uniq),
                                     local)
        if candidates.shape[1] == 1:
            return first[:, None]
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state.base_hidden.index_select(0, src)),
                         attention_mask=state.base_mask.index_select(0, src), decoder_input_ids=candidates[:, 1:],
                         use_cache=True, **{self._cache_kw: cache})
        return torch.cat([first[:, None].to(out.logits.dtype), out.logits], 1)

    def candidate_targets(self, candidates: torch.Tensor, lengths: torch.Tensor):
        """(target, mask) [M, T] of candidate_logits: candidates shifted left (HF's get_nll layout), the positions
        past each candidate's length masked. HF masks every pad id instead, so a hypothesis that generated the pad
        token as a real token (an untrained model may; T5's pad is also its decoder start) loses those tokens'
        log-probabilities and can outscore every other; here each generated token counts."""
        target = torch.cat([candidates[:, 1:], torch.full_like(candidates[:, :1], self.pad_token_id)], 1)
        ar = torch.arange(target.shape[1], device=target.device)
        return target, ar[None, :] < (lengths[:, None] - 1)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)


_SHARED_KV = "pyrag_shared_kv_sdpa"
_SWAP_LOCK = threading.Lock()  # guards Seq2SeqGenerator._cross_sharing's install / restore (module-level: picklable)


def _shared_kv_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention function for query rows [N, H, 1, d] over keys/values [M, H, S, d] with
    N = r * M, rows i*r .. i*r + r - 1 reading key row i (the beams of one input, decoding one token). The r rows
    become r query heads per key/value head of one batch row (sdpa's grouped-query attention), so every (row, head)
    does the same arithmetic on the same keys as with r copies of them (bit-identical on CPU: _check_shared_cross),
    without the copies. Equal row counts go to transformers' sdpa function unchanged. Returns ([N, 1, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    N, M = query.shape[0], key.shape[0]
    if N == M:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _, H, q, d = query.shape
    if (q != 1 or N % M or kwargs.get("position_bias") is not None or kwargs.get("output_attentions", False)
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        raise ValueError(f"shared keys/values need one query token per row and N = r*M rows: {query.shape=} "
                         f"{key.shape=}")
    r = N // M
    # query head j = head * r + row: grouped-query attention maps it to key/value head j // r = head
    qg = query.reshape(M, r, H, 1, d).transpose(1, 2).reshape(M, H * r, 1, d)
    mask = attention_mask
    if mask is not None and mask.shape[0] == N:
        mask = mask[::r]  # the r rows of an input share its mask
    out = torch.nn.functional.scaled_dot_product_attention(qg, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, enable_gqa=True)
    dv = out.shape[-1]
    return out.reshape(M, H, r, dv).transpose(1, 2).reshape(N, 1, H, dv), None


def _reorder_cache(cache, index: torch.Tensor, cross: bool):
    """The KV cache with its rows taken from index [N]; cross=False leaves an encoder-decoder cache's
    cross-attention part alone (valid when every row keeps its input)."""
    sa = getattr(cache, "self_attention_cache", None)
    if sa is not None:
        if cross:
            cache.reorder_cache(index)
        else:
            sa.reorder_cache(index)
        return cache
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    # legacy tuple cache (old transformers): per layer (self k, self v[, cross k, cross v])
    return tuple(tuple(t.index_select(0, index) if (cross or i < 2) else t for i, t in enumerate(layer))
                 for layer in cache)


def _first_int(*values):
    for v in values:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None


@dataclass
class _CausalState:
    cache: object
    mask: torch.Tensor  # [N, P + t] bool
    pos: torch.Tensor  # [N] next position id
    first_logits: torch.Tensor | None  # [N, V] from the prompt, consumed by the first step
    prompt_ids: torch.Tensor  # [M, P] left-padded prompts (for re-scoring)
    prompt_mask: torch.Tensor


class CausalGenerator(nn.Module):
    """A decoder-only HF model (AutoModelForCausalLM) as a RAG generator: the prompt is
    "title / text // question" + fmt.answer_prompt, the answer follows it, and the loss covers the answer tokens
    only. Prompts are left-padded so that the answer tokens of all K rows of a question sit in the same columns."""

    kind = "causal"

    def __init__(self, model: nn.Module, tokenizer, fmt: InputFormat | None = None, *,
                 max_answer_length: int | None = None):
        super().__init__()
        if tokenizer is None:
            raise ValueError("the generator has no tokenizer: pass tokenizer=..., or a directory that holds one")
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt or InputFormat()
        cfg = model.config
        self.eos_token_id = _first_int(tokenizer.eos_token_id, getattr(cfg, "eos_token_id", None))
        if self.eos_token_id is None:
            raise ValueError("a decoder-only generator needs an end-of-sequence token (tokenizer.eos_token_id)")
        self.pad_token_id = _first_int(tokenizer.pad_token_id, getattr(cfg, "pad_token_id", None), self.eos_token_id)
        self.bos_token_id = None  # nothing to force: the answer starts right after the prompt
        self.decoder_start_token_id = None
        self.position_limit = _first_int(getattr(cfg, "max_position_embeddings", None),
                                         getattr(cfg, "n_positions", None))
        limit = self.position_limit or 1024
        self.max_answer_length = int(max_answer_length or limit // 2)
        if self.max_answer_length >= limit:
            raise ValueError(f"max_answer_length={self.max_answer_length} leaves no room for a prompt in the "
                             f"generator's {limit} positions")
        self._cache_kw = _cache_kwarg(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def build_inputs(self, questions, titles, texts):
        """Left-padded prompts (input_ids [B*K, P], attention_mask [B*K, P] bool), row b*K + k."""
        rows = tokenize_contexts(self.tokenizer, questions, titles, texts, self.fmt, suffix=self.fmt.answer_prompt,
                                 max_length=self.input_limit)
        ids, mask = _pad(rows, self.pad_token_id, left=True)
        return ids.to(self.device), mask.to(self.device)

    @property
    def input_limit(self) -> int:
        """Most prompt tokens: max_combined_length, capped so a prompt and an answer of max_answer_length fit the
        model's positions."""
        cap = (self.position_limit - self.max_answer_length) if self.position_limit else self.fmt.max_combined_length
        return min(self.fmt.max_combined_length, cap)

    def check_lengths(self, input_ids: torch.Tensor, max_new_tokens: int | None = None) -> None:
        """The positions must hold the longest prompt of the batch (+ max_new_tokens when decoding)."""
        lim, n = self.position_limit, input_ids.shape[1]
        if lim is None:
            return
        if n + (max_new_tokens or 0) > lim:
            what = f"max_new_tokens={max_new_tokens} after a {n}-token prompt" if max_new_tokens else f"a {n}-token prompt"
            raise ValueError(f"{what} does not fit the generator's {lim} positions")

    def encode_answers(self, answers: list[str]):
        """(answer_ids [B, T] padded with pad, target [B, T] = answer tokens + eos, padded with -100)."""
        answers = _check_texts("answers", answers)
        rows = self._answer_rows(answers)
        for i, r in enumerate(rows):
            if len(r) > self.max_answer_length:
                raise ValueError(f"answers[{i}] is {len(r)} tokens long, more than the generator's limit "
                                 f"max_answer_length={self.max_answer_length}: {answers[i][:80]!r}")
        T = max(len(r) for r in rows)
        target = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            target[i, : len(r)] = torch.tensor(r)
        return target.masked_fill(target < 0, self.pad_token_id).to(self.device), target.to(self.device)

    def _answer_rows(self, answers: list[str]) -> list[list[int]]:
        rows = self.tokenizer([" " + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
        return [r + [self.eos_token_id] for r in rows]

    def answer_lengths(self, answers: list[str]) -> list[int]:
        """Target tokens of each answer (its tokens + eos), without the limit check (see Seq2SeqGenerator's)."""
        return [len(r) for r in self._answer_rows(_check_texts("answers", answers))]

    def decoder_prompt(self, n: int) -> torch.Tensor:
        return torch.zeros((n, 0), dtype=torch.long, device=self.device)

    def _run(self, ids, mask, positions, cache=None, keep: int | None = None, use_cache=False):
        kw = {self._cache_kw: cache} if cache is not None else {}
        if keep is not None and self._logits_to_keep:
            kw["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=use_cache, **kw)
        logits = out.logits if keep is None else out.logits[:, -keep:]
        return logits, (_out_cache(out) if use_cache else None)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, input_ids, attention_mask, decoder_input_ids, encoder_hidden=None) -> torch.Tensor:
        """Logits [N, T, V] for the T answer tokens: prompt [N, P] (left-padded) followed by decoder_input_ids
        [N, T] (the answer); only the T positions that predict answer tokens go through the LM head."""
        T = decoder_input_ids.shape[1]
        ans_mask = torch.ones_like(decoder_input_ids, dtype=torch.bool)
        ids = torch.cat([input_ids, decoder_input_ids], 1)
        mask = torch.cat([attention_mask, ans_mask], 1)
        logits, _ = self._run(ids[:, :-1], mask[:, :-1], self._positions(mask[:, :-1]), keep=T)
        return logits

    def start(self, input_ids, attention_mask, expand: torch.Tensor) -> _CausalState:
        logits, cache = self._run(input_ids, attention_mask, self._positions(attention_mask), keep=1, use_cache=True)
        if hasattr(cache, "reorder_cache"):
            cache.reorder_cache(expand)
        else:
            cache = tuple(tuple(t.index_select(0, expand) for t in layer) for layer in cache)
        mask = attention_mask.index_select(0, expand)
        pos = mask.long().sum(1)
        return _CausalState(cache, mask, pos, logits[:, -1].float().index_select(0, expand), input_ids, attention_mask)

    def step(self, state: _CausalState, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:  # first step: the prompt's last position already predicted it
            logits, state.first_logits = state.first_logits, None
            return logits
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], 1)
        logits, state.cache = self._run(tokens[:, None], state.mask, state.pos[:, None], cache=state.cache,
                                        use_cache=True)
        state.pos = state.pos + 1
        return logits[:, -1].float()

    def reorder(self, state: _CausalState, index: torch.Tensor) -> None:
        if hasattr(state.cache, "reorder_cache"):
            state.cache.reorder_cache(index)
        else:
            state.cache = tuple(tuple(t.index_select(0, index) for t in layer) for layer in state.cache)
        state.mask = state.mask.index_select(0, index)
        state.pos = state.pos.index_select(0, index)

    def candidate_logits(self, state: _CausalState, src, candidates) -> torch.Tensor:
        """Teacher-forced logits [M, T, V] of generated candidates [M, T] after the prompts src [M]."""
        return self.forward(state.prompt_ids.index_select(0, src), state.prompt_mask.index_select(0, src),
                            candidates)

    def candidate_targets(self, candidates: torch.Tensor, lengths: torch.Tensor):
        """(target, mask): causal logits are already aligned with the tokens they predict; the mask comes from the
        lengths (pad may equal eos here)."""
        ar = torch.arange(candidates.shape[1], device=candidates.device)
        return candidates, ar[None, :] < lengths[:, None]

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                    "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def load_generator(generator, tokenizer=None, fmt: InputFormat | None = None, kind: str | None = None, **kw):
    """A Seq2SeqGenerator / CausalGenerator from a local HF directory or a model object (+ tokenizer).

    kind: "seq2seq" | "causal" | None (None: from the model's config, is_encoder_decoder)."""
    if isinstance(generator, (Seq2SeqGenerator, CausalGenerator)):
        return generator
    if isinstance(generator, (str, Path)):
        path = Path(generator)
        if not path.is_dir():
            raise ValueError(f"generator directory not found: {str(path)!r}")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        cfg = AutoConfig.from_pretrained(path)
        kind = kind or ("seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal")
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        model = auto.from_pretrained(path)
        if tokenizer is None:
            # transformers 5 builds an empty tokenizer from config.json alone, so look for the files themselves
            if not any((path / f).is_file() for f in _TOKENIZER_FILES):
                raise ValueError(f"generator directory {str(path)!r} has no usable tokenizer (none of "
                                 f"{', '.join(_TOKENIZER_FILES)}); save one there or pass tokenizer=...")
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as e:  # any failure here means: no usable tokenizer in that directory
                raise ValueError(f"generator directory {str(path)!r} has no usable tokenizer ({type(e).__name__}: "
                                 f"{e}); save one there or pass tokenizer=...") from e
        generator = model
    elif not isinstance(generator, nn.Module):
        raise TypeError(f"generator must be a directory or an HF model, got {type(generator).__name__}")
    if tokenizer is None:
        raise ValueError(f"the generator {type(generator).__name__} was given without a tokenizer: pass tokenizer=...")
    kind = kind or ("seq2seq" if getattr(generator.config, "is_encoder_decoder", False) else "causal")
    if kind not in ("seq2seq", "causal"):
        raise ValueError(f"kind must be 'seq2seq' or 'causal', got {kind=!r}")
    cls = Seq2SeqGenerator if kind == "seq2seq" else CausalGenerator
    if cls is CausalGenerator:
        kw.pop("bucket_overhead", None)
    return cls(generator, tokenizer, fmt, **kw)
