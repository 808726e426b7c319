#!/usr/bin/env bash
# One prepared run for a lent GPU machine (device tool): build there (its torch, no registry access), run the CUDA
# tests, then the CUDA benchmarks; logs and JSON come back packed in $OUT/results.tgz. Every step has its own timeout so
# one slow step cannot eat the others' time; later steps still run when an earlier one fails.
# Usage (repository root on the GPU machine): bash benchmarks/gpu_session.sh [PAYLOAD_DIR]
#   PAYLOAD_DIR (optional) holds dev-v1.1.json and qtok/ (a BERT tokenizer) for the RAG step benchmark, since the
#   GPU machine has neither ../shared nor the MiniLM package.
#   Step timeouts (tests 150 s, search 90, losses 60, RAG step 2 x 100, profile 120) plus the build (~45-65 s) add up
#   to more than one device call's 600 s: pick steps with SKIP_LOSSES=1, PROFILE=1, TEST_FILES=..., PAYLOAD or not.
set -uo pipefail
# The device tool returns only a few files from $OUT: every log and JSON goes to a work directory outside it,
# packed into $OUT/results.tgz when the script exits (steps.txt, the timeline, also comes back as it is).
FINAL=${OUT:-/tmp/pyrag_gpu_out}
mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/pyrag_gpu_work.XXXX)
PAYLOAD=${1:-}
mkdir -p "$OUT"
pack() { tar czf "$FINAL/results.tgz.tmp" -C "$OUT" . 2>/dev/null && mv "$FINAL/results.tgz.tmp" "$FINAL/results.tgz"; }
trap pack EXIT
REPO=$(pwd)
T0=$(date +%s)
# The timeline goes straight to $FINAL and the archive is refreshed after every step, so a run killed at the
# device's time limit still returns what it finished.
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$FINAL/steps.txt"; pack; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
stamp build
# The machine has scikit-build-core and pybind11 preinstalled and no registry: build without isolation, for the
# lent card's architecture only (halves the nvcc time), and without the CUDA simulator (it serves GPU-less CI).
ARCH=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
PYPATH=
if ! python -m pip install --no-build-isolation --no-deps \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" \
    --config-settings=cmake.define.PYRAG_DISABLE_CUDA_SIM=ON . > "$OUT/build.log" 2>&1; then
  { which -a python python3 pip; python -m pip --version; python -c "import scikit_build_core.build as b; print(b)"; } \
    > "$OUT/build_diag.txt" 2>&1
  # Fallback: the same CMake project built in place (no packaging step), imported from the checkout.
  cmake -S . -B build/gpu -G Ninja -DPYRAG_INPLACE=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DPYRAG_DISABLE_CUDA_SIM=ON \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(which python)" > "$OUT/build2.log" 2>&1 \
    && cmake --build build/gpu >> "$OUT/build2.log" 2>&1 || { tail -40 "$OUT/build2.log"; exit 1; }
  PYPATH=$REPO
fi
export PYTHONPATH=$PYPATH
stamp built
# Run from outside the checkout so `import pyrag` finds the installed package (with _C_cuda), not the sources.
cd /tmp
python -c "import pyrag, torch; print('has_cuda_kernels', pyrag.has_cuda_kernels(), torch.__version__)" | tee "$OUT/import.txt"
# hnswlib and bm25s are absent there: only test files whose imports do not need them.
TEST_FILES=${TEST_FILES:-"tests/test_rag_loss.py tests/test_rag_loss_edge.py tests/test_rag_loss_ops.py tests/test_topk_ip.py tests/test_compat_hf.py tests/test_lean_activations.py tests/test_index_flat_sketch.py"}
# shellcheck disable=SC2046
timeout 150 python -m pytest -q -k "cuda or CUDA" $(for f in $TEST_FILES; do echo "$REPO/$f"; done) \
  > "$OUT/tests.txt" 2>&1
tail -25 "$OUT/tests.txt"
stamp tests
timeout 90 python "$REPO/benchmarks/bench_search.py" --no-cpu --repeat 5 --out "$OUT/search_cuda.json" \
  > "$OUT/bench_search.txt" 2>&1; tail -20 "$OUT/bench_search.txt"
stamp search
if [ -z "${SKIP_LOSSES:-}" ]; then
  timeout 60 python "$REPO/benchmarks/bench_losses.py" --device cuda --out "$OUT/losses_cuda.json" \
    > "$OUT/bench_losses.txt" 2>&1; tail -12 "$OUT/bench_losses.txt"
  stamp losses
fi
if [ -n "$PAYLOAD" ]; then
  P=$(cd "$REPO" && cd "$PAYLOAD" && pwd) || { echo "payload directory $PAYLOAD not found" >&2; exit 1; }
  # The issue's setting (both systems get the same 200-token contexts), then SQuAD lengths (each its own pipeline).
  for EQ in 200 0; do
    timeout "${RAG_STEP_TIMEOUT:-100}" python "$REPO/benchmarks/bench_rag_step.py" --squad "$P/dev-v1.1.json" \
      --question-tokenizer "$P/qtok" --device cuda --shape large --n-docs 10 --target-length 40 --bf16 \
      --equal-length $EQ --what "${RAG_STEP_WHAT:-train,token-greedy,token-beam4,sequence-thorough,sequence-fast}" \
      --warmup 1 --repeat 3 --out "$OUT/rag_step_cuda_eq$EQ.json" > "$OUT/bench_rag_step_eq$EQ.txt" 2>&1
    tail -12 "$OUT/bench_rag_step_eq$EQ.txt"
    stamp "rag_step equal-length=$EQ"
  done
fi
if [ -n "${PROFILE:-}" ]; then
  timeout 120 python "$REPO/benchmarks/profile_cuda_search.py" --out "$OUT/profile_cuda_search.json" \
    > "$OUT/profile.txt" 2>&1; tail -40 "$OUT/profile.txt"
  stamp profile
fi
