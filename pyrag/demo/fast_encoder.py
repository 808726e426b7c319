"""A question encoder for short CPU budgets: embeddings and lower transformer layers frozen, their output cached per
distinct question, so each training step runs (and back-propagates through) only the top layers. Exact: it
returns the same vectors as the plain Encoder with the same weights, and saves as a plain Encoder."""

from __future__ import annotations

import torch
from torch import nn

from ..models.encoders import Encoder


class _Given(nn.Module):
    """Stands in for a BERT embeddings module: returns the hidden states it was given, whatever it is called with."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class CachedLowerEncoder(Encoder):
    """Encoder whose embeddings and all but the top `train_layers` layers are frozen (requires_grad False).

    forward(input_ids [N, L], attention_mask [N, L]) -> [N, D] runs the frozen part once per distinct question
    (keyed by its token ids) without a graph, caches its hidden states [len, H] on the encoder's device, and runs
    the top layers + pooling on them with gradient. train_layers=0 freezes everything and caches the final
    vectors. Dropout is switched off in the whole encoder (the cache must hold what a fresh pass would give).
    Use `CachedLowerEncoder.convert(encoder, train_layers)`; `save_pretrained` writes a plain Encoder."""

    @classmethod
    def convert(cls, enc: Encoder, train_layers: int, cache: dict | None = None) -> CachedLowerEncoder:
        """Turn `enc` (in place) into a CachedLowerEncoder. cache: a dict to keep the frozen part's outputs in,
        shared by encoders whose frozen parts are equal (e.g. copies of one encoder fine-tuned at the top only),
        so each question runs through the frozen layers once in all of them."""
        backbone = enc._backbone
        layers = getattr(getattr(backbone, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(backbone, "embeddings"):
            raise TypeError(f"{type(backbone).__name__} is not a BERT-like encoder (embeddings + encoder.layer)")
        if not isinstance(train_layers, int) or not 0 <= train_layers <= len(layers):
            raise ValueError(f"train_layers must be an int in [0, {len(layers)}], got {train_layers!r}")
        enc.__class__ = cls
        enc._train_layers = train_layers
        enc._cache = {} if cache is None else cache
        for m in enc.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        frozen = [backbone.embeddings, *layers[: len(layers) - train_layers]]
        if train_layers == 0:
            frozen = [enc]
        for m in frozen:
            m.requires_grad_(False)
        return enc

    def prefill(self, texts: list[str], vectors: torch.Tensor) -> None:
        """train_layers=0 only: record known outputs [N, D] of texts (e.g. a KB's stored passage vectors) so they
        are looked up instead of computed."""
        if self._train_layers != 0:
            raise ValueError("prefill needs train_layers=0 (the cache then holds final vectors)")
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(f"vectors must be [len(texts), {self.dim}] = [{len(texts)}, {self.dim}], got "
                             f"{vectors.shape=}")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        dev = self.device
        for row, v in zip(ids, vectors):
            self._cache[tuple(row)] = v.to(dev, torch.float32)

    def _lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the frozen part's output [len, H] (len = the row's unpadded length); computed for rows not
        cached yet in one batched no-grad pass."""
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            with torch.no_grad():
                ids, mask = input_ids[todo], attention_mask[todo]
                if self._train_layers == 0:
                    vec = super().forward(ids, mask)
                    for j, i in enumerate(todo):
                        self._cache[keys[i]] = vec[j].float()
                else:
                    n_layers = len(self._backbone.encoder.layer)
                    out = self._backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    h = out.hidden_states[n_layers - self._train_layers]  # [0] = embeddings, [i] = after layer i
                    for j, i in enumerate(todo):
                        # fp32 whatever autocast computed it in: later calls may run without autocast
                        self._cache[keys[i]] = h[j, : lengths[i]].detach().float()
        return [self._cache[k] for k in keys]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must be [N, L] of equal shape, got "
                             f"{input_ids.shape=} {attention_mask.shape=}")
        parts = self._lower(input_ids, attention_mask)
        if self._train_layers == 0:
            return torch.stack(parts)
        N, L = input_ids.shape
        hidden = parts[0].new_zeros(N, L, parts[0].shape[-1])
        for i, p in enumerate(parts):
            hidden[i, : p.shape[0]] = p
        backbone = self._backbone
        emb, layers = backbone.embeddings, backbone.encoder.layer
        # Run the real forward (masks built by HF as usual) with the embeddings replaced by the cached hidden
        # states and only the top layers in the stack.
        backbone.embeddings = _Given(hidden)
        backbone.encoder.layer = nn.ModuleList(list(layers)[len(layers) - self._train_layers:])
        try:
            h = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            backbone.embeddings, backbone.encoder.layer = emb, layers
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        proj = self._proj
        if proj is not None:
            pooled = proj(pooled)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
