#!/usr/bin/env bash
# One bounded device call (about 4-6 minutes: two exports, two AOTInductor CUDA compiles, a CMake
# build, two runner processes that each load a CUDA package): the C++ runner on CUDA packages,
# tests/gpu/test_cpp_runner.py (docs/EXPORT.md, "Running a package without Python").
# `python3 -P`: the repository root stays off sys.path (tests/gpu/__init__.py says why).
# Logs go to $OUT (default out/).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    cmake --version | head -1; c++ --version | head -1; command -v nvcc && nvcc --version | tail -1
} 2>&1 | tee "$OUT/cpp_runner_env.txt"
TRITON_INTERPRET=0 timeout 540 python3 -P -m pytest -q -ra -m gpu tests/gpu/test_cpp_runner.py 2>&1 \
    | tee "$OUT/cpp_runner.txt"
