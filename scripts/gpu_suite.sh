#!/usr/bin/env bash
# One bounded device call: the GPU test suite (tests/gpu: prefill kernels, estimator, fused selection,
# head dims, schedules, CUDA graphs, exported packages), then the prefill benchmark; add "demo" /
# "decode" / "aoti" (loader diagnostic) / "schedule" (timings) / "trained" as arguments to also run those.
# `python3 -P`: the repository root stays off sys.path, where the source folders would shadow the
# installed omnicompile (no omnicompile.kernels there) and transformers would find kernels/ as the hub
# package `kernels`.
# Logs and tables go to $OUT (default out/).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
TRITON_INTERPRET=0 timeout 420 python3 -P -m pytest -q -ra -m gpu tests/gpu 2>&1 \
    | tee "$OUT/gpu_tests.txt"
for extra in "$@"; do
    case "$extra" in
        demo) timeout 120 omnicompile demo --device cuda --seq-len 8192 --structured-len 32768 2>&1 | tee "$OUT/demo.txt" ;;
        decode) timeout 100 python3 benchmarks/bench_decode.py --seq-lens 8192 32768 --steps 16 --layers 4 --out /tmp/decode 2>&1 | tee "$OUT/decode.txt"
                cp /tmp/decode/*.csv "$OUT/" 2>/dev/null ;;
        aoti) timeout 400 python3 scripts/gpu_check_aoti_runtime.py 2>&1 | tee "$OUT/aoti_runtime.txt" ;;
        schedule) timeout 240 python3 benchmarks/bench_schedule.py --out /tmp/schedule 2>&1 | tee "$OUT/schedule.txt" ;;
        trained) (cd benchmarks && timeout 150 python3 bench_trained_prefill.py --out /tmp/trained) 2>&1 | tee "$OUT/trained_prefill.txt" ;;
    esac
done
timeout 150 python3 benchmarks/bench_prefill.py --seq-lens 8192 32768 131072 --presets structured random \
    --flex-seq-lens 32768 --time-budget-s 120 --out /tmp/prefill 2>&1 | tee "$OUT/prefill.txt"
cp /tmp/prefill/prefill.csv /tmp/prefill/prefill.png "$OUT/" 2>/dev/null
ls -la "$OUT"
