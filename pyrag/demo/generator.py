"""The demo's small generator: a WordPiece tokenizer cut down from MiniLM's to the corpus' pieces, a BART initialised
from a config, and a resumable seq2seq training loop for its denoising pre-training and the closed-book baseline."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch

from ..train.checkpoint import EpochOrder, rng_state, set_rng_state

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_tokenizer(texts: list[str], base_dir):
    """A BertTokenizer whose vocabulary is the MiniLM WordPiece pieces that `texts` use, plus every single ASCII
    character (as a word start and as "##" continuation) so any ASCII text still tokenises without [UNK].

    Greedy longest-match WordPiece over a subset that contains every piece of the full tokenisation gives the same
    pieces, so corpus text tokenises exactly as with MiniLM's 30,522-piece vocabulary; the output layer then
    has ~2k rows instead of 30k, which is most of a small generator's compute."""
    from transformers import AutoTokenizer, BertTokenizer

    full = AutoTokenizer.from_pretrained(base_dir)
    used = set()
    for t in texts:
        used.update(full.tokenize(t))
    vocab = sorted(full.get_vocab().items(), key=lambda kv: kv[1])
    keep = [w for w, _ in vocab
            if w in _SPECIALS or w in used or (len(w) == 1 and w.isascii())
            or (len(w) == 3 and w.startswith("##") and w[2].isascii())]
    return BertTokenizer(vocab={w: i for i, w in enumerate(keep)}, do_lower_case=True, model_max_length=512)


def init_generator(tokenizer, *, d_model: int, layers: int, ffn: int, heads: int, max_positions: int, seed: int,
                   init_std: float | None = None):
    """A BART with random weights (seeded) over `tokenizer`, BART's conventions mapped onto BERT's specials:
    targets are "[CLS] answer [SEP]" and decoding starts from [SEP] (as BART starts from </s>).

    init_std (default 1/sqrt(d_model)): BART's own 0.02 suits d_model 1024; at d_model ~200 it leaves attention
    logits so flat that learning to point at (copy) an input token takes thousands of steps instead of
    hundreds."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                     decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
                     init_std=init_std if init_std is not None else d_model ** -0.5,
                     # a few hundred steps from scratch: regularisation only slows the fit down
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                     eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.sep_token_id,
                     forced_bos_token_id=None, forced_eos_token_id=None)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.forced_bos_token_id = gc.forced_eos_token_id = None
    gc.no_repeat_ngram_size = 0
    gc.num_beams = 1
    return model


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def source_inputs(gen, sources: list[str]):
    """(input_ids [B, L], attention_mask [B, L] bool) of plain source texts (no passages), padded to the longest."""
    enc = gen.tokenizer(sources, padding=True, truncation=True, max_length=gen.fmt.max_combined_length,
                        return_tensors="pt", return_token_type_ids=False)
    return enc["input_ids"].to(gen.device), enc["attention_mask"].bool().to(gen.device)


def denoising_pairs(passages: list[dict], seed: int, copies: int = 2) -> list[tuple[str, str]]:
    """BART's text infilling on "title / text" strings: one span of 1-3 words replaced by a single [MASK]; the
    target is the uncorrupted string. `copies` corruptions per passage, fixed by `seed`."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(copies):
        for p in passages:
            words = f"{p['title']} / {p['text']}".split(" ")
            i, n = rng.randrange(len(words)), rng.randint(1, 3)
            pairs.append((" ".join(words[:i] + ["[MASK]"] + words[i + n:]), " ".join(words)))
    return pairs


def train_seq2seq(gen, pairs: list[tuple[str, str]], *, out_dir, steps: int, batch_size: int, lr: float,
                  warmup_steps: int, seed: int, decay: bool = True, checkpoint_every: int = 50,
                  stop_at: int | None = None, desc: str = "train", show_progress: bool = True) -> dict:
    """Train a pyrag Seq2SeqGenerator `gen` on (source, target) text pairs with token cross-entropy: the
    closed-book baseline (question -> answer) and the denoising pre-training. Optimisation as train_rag does it
    (AdamW without weight decay, linear warm-up then decay to 0, clipping at 1.0, the same seeded data order),
    so a closed-book model gets the same budget as the RAG models. decay=False keeps the learning rate constant
    after warm-up (pre-training: the models fine-tuned from it decay their own).

    out_dir/checkpoint.pt (model, optimiser, scheduler, RNG, data position; atomic) is written every
    checkpoint_every steps and at the end; an existing one is resumed exactly. stop_at: checkpoint and return
    after that step, as an interruption would. Returns {"step", "loss", "seconds"}."""
    from tqdm.auto import tqdm

    if not pairs:
        raise ValueError("pairs is empty")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be an int in [0, steps={steps}], got {warmup_steps!r}")
    end = steps if stop_at is None else min(steps, stop_at)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    model = gen.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps)) if decay else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "seed": seed,
              "decay": decay, "n": len(pairs)}
    step, pos, losses = 0, 0, []
    if ckpt.exists():
        ck = torch.load(ckpt, weights_only=False, map_location=gen.device)
        if ck["config"] != config:
            raise ValueError(f"{ckpt} was written with other settings ({ck['config']} vs {config}); delete it to "
                             f"start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        step, pos, losses = ck["step"], ck["pos"], ck["losses"]
    else:
        random.seed(seed)
        torch.manual_seed(seed)

    def save() -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "rng": rng_state(), "step": step, "pos": pos,
                            "losses": losses, "config": config}, ckpt)

    model.train()
    order = EpochOrder(len(pairs), seed)  # train_rag's data order
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not show_progress, dynamic_ncols=True)
    try:
        while step < end:
            batch = [pairs[order[pos + i]] for i in range(batch_size)]
            pos += batch_size
            ids, mask = source_inputs(gen, [src for src, _ in batch])
            dec_in, target = gen.encode_answers([tgt for _, tgt in batch])
            logits = gen(ids, mask, dec_in)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                                     ignore_index=-100)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {float(loss)} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses = (losses + [float(loss.detach())])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}")
            if step % checkpoint_every == 0 or step == end:
                save()
    finally:
        bar.close()
    model.eval()
    return {"step": step, "loss": sum(losses) / len(losses) if losses else float("nan"),
            "seconds": time.time() - t0}


@torch.no_grad()
def closed_book_answers(gen, questions: list[str], *, batch_size: int = 64, max_new_tokens: int = 16,
                        show_progress: bool = True) -> list[str]:
    """Greedy answers of the closed-book generator to the bare questions."""
    from tqdm.auto import tqdm

    out = []
    gen.model.eval()
    for s in tqdm(range(0, len(questions), batch_size), desc="answer closed-book", unit="batch",
                  disable=not show_progress, dynamic_ncols=True):
        ids, mask = source_inputs(gen, questions[s:s + batch_size])
        seq = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=1,
                                 do_sample=False, decoder_start_token_id=gen.decoder_start_token_id)
        out += [a.strip() for a in gen.tokenizer.batch_decode(seq, skip_special_tokens=True)]
    return out
