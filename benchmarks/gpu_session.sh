#!/usr/bin/env bash
# One prepared run for a lent GPU machine (device tool): build the wheel there (its torch, no registry access),
# run the CUDA tests, then the CUDA benchmarks, writing JSON under $OUT (copied back) and benchmarks/results/.
# Usage (repository root on the GPU machine): bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/pyrag_gpu_out}
mkdir -p "$OUT"
REPO=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The machine has scikit-build-core and pybind11 preinstalled and no registry: build without isolation.
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
# Run from outside the checkout so `import pyrag` finds the installed wheel (with _C_cuda), not the sources.
cd /tmp
python -c "import pyrag; print('has_cuda_kernels', pyrag.has_cuda_kernels())" | tee "$OUT/import.txt"
# hnswlib is absent there: only the files whose imports it does not need.
timeout 240 python -m pytest -q -x -k "cuda or CUDA" "$REPO/tests/test_rag_loss.py" "$REPO/tests/test_topk_ip.py" \
  "$REPO/tests/test_compat_hf.py" 2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 120 python "$REPO/benchmarks/bench_losses.py" --device cuda --out "$OUT/losses_cuda.json" 2>&1 | tail -20 | tee "$OUT/bench_losses.txt"
timeout 150 python "$REPO/benchmarks/bench_search.py" --device cuda --out "$OUT/search_cuda.json" 2>&1 | tail -20 | tee "$OUT/bench_search.txt"
