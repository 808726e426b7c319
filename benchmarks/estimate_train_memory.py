"""Peak memory of one RAG-Token training step (forward + backward, bf16 autocast) on the CPU, for the GPU benchmark's
shape (BART-large d=1024, B=8, K=10, 200-token contexts, 42-token targets): HF's RagTokenForGeneration against
pyrag's RagToken, same weights and inputs, through HF's precomputed-context path.

A 12+12-layer step does not fit a 2-core CPU's time budget, so this runs the real step with 1 and 2 encoder+decoder
layers, measures the peak bytes of live tensors with torch's MemTracker, and extrapolates linearly in the layer
count (every layer adds the same activations). What it models: tensors autograd saves, cast copies, the loss's
workspace, gradients. What it does not: the CUDA caching allocator's rounding and fragmentation, and CUDA-only
kernels' workspaces — so it predicts GPU figures, the GPU benchmark (bench_rag_step.py --device cuda) measures
them. On the lent H200 the same setting measured HF 16.4 GiB and pyrag 13.1 GiB extra (the code of
"pyrag-before").

  python benchmarks/estimate_train_memory.py            # ~5 min on 2 cores, writes results/train_memory_estimate.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

try:
    import pyrag  # noqa: F401
except ImportError:  # a source checkout built in place (not pip-installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Tok:  # the ids a Seq2SeqGenerator reads from its tokenizer; the precomputed path tokenizes nothing
    pad_token_id, bos_token_id, eos_token_id, is_fast = 1, 0, 2, True

    def __len__(self):
        return 50265


def peak_gib(system: str, layers: int, args) -> float:
    """Peak bytes (GiB) of everything but the parameters during one forward + backward."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        DPRConfig,
        DPRQuestionEncoder,
        RagConfig,
        RagTokenForGeneration,
    )

    import pyrag.models.rag as rag_mod
    from pyrag.models.generator import InputFormat, Seq2SeqGenerator

    torch.manual_seed(0)
    B, K, L, T = args.batch, args.n_docs, args.context_length, args.target_length
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=50265, d_model=1024, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)).train()
    ids = torch.randint(4, 50000, (B * K, L))
    mask = torch.ones(B * K, L, dtype=torch.long)
    labels = torch.randint(4, 50000, (B, T))
    labels[:, 0] = 2
    scores = torch.randn(B, K, requires_grad=True)  # stands for q . d (the question encoder is the same for both)
    if system == "hf":
        dpr = DPRQuestionEncoder(DPRConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                           intermediate_size=64, projection_dim=0))
        cfg = RagConfig.from_question_encoder_generator_configs(dpr.config, bart.config, n_docs=K)
        model = RagTokenForGeneration(config=cfg, question_encoder=dpr, generator=bart).train()

        def fwd():
            return model(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, labels=labels,
                         n_docs=K, reduce_loss=True).loss
    else:
        model = rag_mod.RagToken(torch.nn.Identity(), Seq2SeqGenerator(bart, _Tok(), InputFormat()), None,
                                 n_docs=K).train()
        if system == "pyrag-before":  # the code measured on the H200 (512 MiB head chunks, no LeanActivations)
            model.head_chunk_bytes = 512 << 20
            model.use_lean_activations = False

        def fwd():
            return model(context_input_ids=ids, context_attention_mask=mask.bool(), doc_scores=scores,
                         labels=labels, reduction="sum", return_posterior=False, inplace_backward=True).loss

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fwd()
        loss.backward()
    snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    params = sum(v for k, v in snap.items() if str(k).endswith(("PARAM", "BUFFER")))
    return (snap["Total"] - params) / 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-docs", type=int, default=10)
    ap.add_argument("--context-length", type=int, default=200)
    ap.add_argument("--target-length", type=int, default=42, help="decoder length (40 answer tokens + 2)")
    ap.add_argument("--layers", type=int, default=12, help="extrapolate to this many encoder (= decoder) layers")
    ap.add_argument("--weights-and-optimizer-gib", type=float, default=5.8,
                    help="added for the total (the issue's figure for BART-large + AdamW state)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for system in ("hf", "pyrag-before", "pyrag"):
        p1, p2 = peak_gib(system, 1, args), peak_gib(system, 2, args)
        per_layer = p2 - p1
        extra = p1 + (args.layers - 1) * per_layer
        rows.append({"system": system, "peak_extra_GiB_1_layer": p1, "peak_extra_GiB_2_layers": p2,
                     "per_layer_GiB": per_layer, f"peak_extra_GiB_{args.layers}_layers": extra,
                     "peak_total_GiB": extra + args.weights_and_optimizer_gib})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    hf = rows[0][f"peak_extra_GiB_{args.layers}_layers"]
    for r in rows[1:]:
        r["memory_ratio_hf_over_pyrag"] = hf / r[f"peak_extra_GiB_{args.layers}_layers"]
    path = write_results("train_memory_estimate", rows, {"config": vars(args), "note": __doc__.split("\n\n")[1]},
                         out=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
