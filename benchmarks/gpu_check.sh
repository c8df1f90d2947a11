#!/usr/bin/env bash
# cellst GPU check (issue 13), for a machine with one NVIDIA GPU; at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [bench_gpu.py options...]
#
# 1. hovernet-fast training through Ray Train (train.use_gpu): bf16 autocast + channels_last
#    against fp32, images/s of each;
# 2. a GPU actor-pool prediction of 200 images: images/s, peak GPU memory;
# 3. whether the post-processing stage keeps the GPU busy (nvidia-smi utilisation).
#
# Sets up .venv with `make setup` if it is missing (needs PyPI; PYTHON=python3.x picks the
# interpreter). On a machine whose Python already holds a CUDA torch and cellst's dependencies
# (a CUDA image, an offline GPU node), CELLST_PYTHON=/path/to/python uses that interpreter
# instead, with cellst imported from platform/ (no .venv, no PyPI). Results: summary.json and summary.txt in --out (default: $OUT when set,
# else .bench_out/gpu_check). Exit codes: 0 done, 1 a stage failed, 3 no CUDA,
# 4 set-up failed, 124/130 time limit (what was measured is kept in summary.json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"

if [[ -n "${CELLST_PYTHON:-}" ]]; then
    PY="$CELLST_PYTHON"
    export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] CELLST_PYTHON=$PY: cellst from $PWD/platform, no .venv set-up"
elif [[ ! -x .venv/bin/cellst ]]; then
    echo "[gpu_check] .venv/bin/cellst missing: running make setup (installs from PyPI)"
    if ! make setup; then
        echo "[gpu_check] make setup failed (no PyPI access?): create .venv with cellst and a" \
             "CUDA build of torch, then run this script again" >&2
        exit 4
    fi
fi
PY="${PY:-.venv/bin/python}"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
else
    echo "[gpu_check] nvidia-smi not found"
fi

"$PY" -c 'import torch; print(f"[gpu_check] torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")' || true

OUT_DIR="${OUT:-.bench_out/gpu_check}"
export PYTHONUNBUFFERED=1
# SIGINT first, so the benchmark writes what it measured and stops Ray; SIGKILL 30 s later
exec timeout --signal=INT --kill-after=30 "$LIMIT_S" \
    "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" "$@"
