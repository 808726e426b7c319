"""Plain-torch reference of every pyrag op: the ground truth for tests and benchmarks, and the fallback
wherever a compiled kernel is missing (e.g. a device pyrag has no kernel for). Written for clarity, not speed:
these functions build the full intermediates that the fused kernels avoid."""

from __future__ import annotations

import torch

# ---- RAG marginalisation losses (owned by pyrag/ops/rag_loss.py) ----

# ---- top-k inner-product search (owned by pyrag/ops/topk_ip.py) ----
