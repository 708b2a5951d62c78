#!/usr/bin/env bash
# One call of the pretrained-model GPU session (docs/BENCHMARKS.md, docs/ACCURACY.md): receive one
# model piece (scripts/gpu_models.sh), install the checkout, run this call's step; results to $OUT.
#   bash scripts/gpu_models_run.sh PIECE STEP [PYTEST_K]
# STEP: kernels (GPU tests of the kernels, schedules and CUDA graphs; timings at the models' head dims
# at 32K and of both schedules) | smollm2 (end-to-end
# prefill, profiled) | smollm2-graphs (the same compiled with mode="reduce-overhead") | rope (SmolLM2
# 32K under YaRN vs dynamic NTK) | gemma (end-to-end prefill + 32K eval with passkeys) | host (host time
# of one op call, scripts/gpu_profile_host.py) | suite (host time, against .gpu/base; launch sweeps; GPU tests) |
# varlen (chunked prefill and packed batch, benchmarks/bench_varlen.py) | generate (decode under CUDA
# graphs through generate: tests/gpu/test_decode_graphs.py, benchmarks/bench_generate.py) | prefill (GPU
# kernel tests; issue 16's op timing 32K-256K; probe sweep against .gpu/base) | op (the op timing
# alone, flat and Hkv 4 / 32 too; chunked and packed prefill with a third argument) | eval32 (SmolLM2 32K eval, per layer) | gemma-default (Gemma 3
# end to end, default config) | tiles (the forward by tile, TMA; scope x estimator; chunked and
# packed prefill) | gpu-tests (GPU suite; serving stack) | serve (load test, SmolLM2)
# | packages (tests/gpu/test_packages.py, -k PYTEST_K) | export
# (benchmarks/bench_export.py at PYTEST_K lengths) | none (only receive).
# The call's `carry`: .gpu/whl, .gpu/models.sha256 and .gpu/pieces/PIECE.
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/root/site
bash scripts/gpu_models.sh receive ".gpu/pieces/$1" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
# The default config (budget_scope "head", tau 0.99 since 2026-12-06), and tau 0.995: top-1 0.990
# against 0.983 in fp32 at 8K (docs/ACCURACY.md), its GPU time not yet measured.
SPARSE=('{}' '{"tau": 0.995}')
YARN='{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}'
op_run() {  # NAME TIMEOUT_S ARGS...: one bench_prefill.py run, its table's tail echoed
    (cd benchmarks && timeout "$2" python3 bench_prefill.py "${@:3}" --out "$OUT/$1") 2>&1 \
        | tee "$OUT/$1.txt" | tail -12
}
case "$2" in
kernels)
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    # -P: the repository root off sys.path (its source folders would shadow the installed package)
    TRITON_INTERPRET=0 timeout 240 python3 -P -m pytest -q -ra -m gpu \
        tests/gpu/test_kernels.py tests/gpu/test_schedule.py tests/gpu/test_graphs.py 2>&1 | tee "$OUT/kernels.txt"
    timeout 200 python3 benchmarks/bench_head_dims.py --seq-lens 32768 --out "$OUT" 2>&1 | tee -a "$OUT/kernels.txt"
    timeout 150 python3 benchmarks/bench_schedule.py --seq-lens 32768 131072 --out "$OUT/schedule" 2>&1 \
        | tee "$OUT/schedule.txt" ;;
smollm2 | smollm2-graphs | gemma)
    model=$([ "$2" = gemma ] && echo gemma3-270m || echo smollm2-135m)
    # Plain Inductor (349.8 ms at 32K, 2026-12-07) only with INDUCTOR=1 (device time); lengths: $3.
    extra=(--variants eager dense sparse ${INDUCTOR:+inductor} --profile --config "${SPARSE[@]}")
    [ "$2" = smollm2-graphs ] && extra=(--variants eager dense sparse --graphs)  # each graph compile ~85 s
    (cd benchmarks && timeout 420 python3 bench_models.py --models "$model" --seq-lens ${3:-16384 32768} \
        "${extra[@]}" --time-budget-s 330 --out "$OUT/$2") 2>&1 | tee "$OUT/$2.txt"
    if [ "$2" = gemma ]; then
        timeout 170 omnicompile eval --model gemma3-270m --lengths 32768 --depths 10 --device cuda \
            --dtype bfloat16 --config '{"min_seq_len": 4096}' --out "$OUT/eval_gemma3_32k.json" 2>&1 \
            | tee -a "$OUT/$2.txt"
    fi ;;
rope)
    for rope in "$YARN" '{"rope_type": "dynamic", "factor": 4.0}'; do
        name=$(echo "$rope" | cut -d'"' -f4)
        timeout 110 omnicompile eval --model smollm2-135m --lengths 32768 --depths 0 --device cuda \
            --dtype bfloat16 --max-position-embeddings 32768 --rope-scaling "$rope" \
            --config '{"min_seq_len": 4096}' --out "$OUT/eval_smollm2_32k_$name.json" 2>&1 | tee -a "$OUT/rope.txt"
    done ;;
host) timeout 60 python3 scripts/gpu_profile_host.py --seq-lens 8192 32768 --calls 10 2>&1 | tee "$OUT/host_profile.txt" ;;
suite)
    # The op's host time, also of the commit in .gpu/base (`git archive BASE omnicompile kernels passes
    # pyproject.toml README.md`) where present; then the GPU suite (exported packages aside).
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    timeout 60 python3 scripts/gpu_profile_host.py --seq-lens 8192 32768 --calls 10 2>&1 | tee "$OUT/host_profile.txt"
    if [ -d .gpu/base ]; then
        python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/base .gpu/base &&
            PYTHONPATH=/root/base:$PYTHONPATH timeout 60 python3 scripts/gpu_profile_host.py \
                --seq-lens 8192 32768 --calls 10 2>&1 | tee "$OUT/host_profile_base.txt"
    fi
    # Launch sweeps (forward, estimator, row probe) at SmolLM2's shapes at 32K and H 32 / D 128 at 128K.
    for shape in "32768 --heads 9 --kv-heads 3 --head-dim 64" "131072 --heads 32 --kv-heads 8 --head-dim 128"; do
        (cd benchmarks && timeout 90 python3 bench_prefill.py --seq-lens $shape --presets structured \
            --sweep --time-budget-s 0 --out "$OUT/sweep_${shape%% *}") 2>&1 | grep -v "^ *$" | tail -20
    done | tee "$OUT/sweep.txt"
    TRITON_INTERPRET=0 timeout 280 python3 -P -m pytest -q -ra -m gpu tests/gpu \
        --ignore=tests/gpu/test_packages.py --ignore=tests/gpu/test_cpp_runner.py 2>&1 | tee "$OUT/gpu_suite.txt" ;;
generate)
    # With PYTEST_K given, it is the prompt lengths instead (the GPU test then not run).
    [ -z "${3:-}" ] && TRITON_INTERPRET=0 timeout 200 python3 -P -m pytest -q -ra -m gpu \
        tests/gpu/test_decode_graphs.py 2>&1 | tee "$OUT/decode_graphs.txt"
    (cd benchmarks && timeout 330 python3 bench_generate.py --seq-lens ${3:-8192 32768} --out "$OUT/generate") 2>&1 \
        | tee "$OUT/generate.txt" ;;
varlen) timeout 200 python3 benchmarks/bench_varlen.py --seq-lens 32768 --chunks 4096 8192 \
        --presets mixed structured --out "$OUT/varlen" 2>&1 | tee "$OUT/varlen.txt" ;;
prefill)
    # The kernels' GPU tests (the probe, the forward, the op at D 256), then issue 16's op timing on
    # the presets whose heads differ in breadth, 32K-256K, at tau 0.99 and 0.95; the probe's launch
    # sweep of this tree and of .gpu/base (the commit before) at 128K.
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    TRITON_INTERPRET=0 timeout 150 python3 -P -m pytest -q -ra -m gpu tests/gpu/test_kernels.py \
        tests/gpu/test_graphs.py tests/gpu/test_softcap.py 2>&1 | tee "$OUT/gpu_tests.txt"
    for tau in 0.99 0.95; do
        (cd benchmarks && timeout 150 python3 bench_prefill.py --seq-lens 32768 131072 262144 \
            --presets mixed mixed_flat --scopes head --tau $tau --flex-seq-lens --time-budget-s 120 \
            --out "$OUT/prefill_tau$tau") 2>&1 | tee "$OUT/prefill_tau$tau.txt" | tail -12
    done
    sweep=(--seq-lens 131072 --heads 32 --kv-heads 8 --head-dim 128 --presets structured --sweep --time-budget-s 0)
    (cd benchmarks && timeout 90 python3 bench_prefill.py "${sweep[@]}" --out "$OUT/sweep") 2>&1 \
        | grep -i probe | tee "$OUT/sweep_probe.txt"
    if [ -d .gpu/base ]; then
        python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/base .gpu/base &&
            (cd benchmarks && PYTHONPATH=/root/base:$PYTHONPATH timeout 90 python3 bench_prefill.py \
                "${sweep[@]}" --out "$OUT/sweep_base") 2>&1 | grep -i probe | tee "$OUT/sweep_probe_base.txt"
    fi ;;
op)
    # Issue 16's op timing alone (no GPU tests), most wanted first: the presets whose heads differ in
    # breadth 32K-256K at tau 0.95; Hkv 4 / 32 at 128K; SmolLM2's shape at 32K; scope x estimator at 32K
    # (the estimators with a Triton kernel: composite, pooled);
    # flat attention (random); the launch sweep at 128K (selection warps too), then `structured` there
    # (the kernel at a few % density); with a third argument,
    # chunked and packed prefill (benchmarks/bench_varlen.py).
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    breadth=(--presets mixed mixed_flat --scopes head --flex-seq-lens)
    op_run prefill_tau0.95 140 --seq-lens 32768 131072 262144 "${breadth[@]}" --tau 0.95 --time-budget-s 110
    op_run prefill_hkv 90 --seq-lens 131072 --kv-heads 4 32 --presets mixed --scopes head --tau 0.95 \
        --flex-seq-lens --time-budget-s 60
    op_run smollm2_shape 40 --seq-lens 32768 --heads 9 --kv-heads 3 --head-dim 64 --presets mixed \
        structured --scopes head --tau 0.99 --flex-seq-lens --time-budget-s 20
    op_run scopes 60 --seq-lens 32768 --presets mixed --scopes heads kv_group head \
        --estimators composite pooled --tau 0.95 --flex-seq-lens --time-budget-s 40
    op_run prefill_random 45 --seq-lens 32768 131072 --presets random --scopes head --tau 0.99 \
        --flex-seq-lens --recall-heads 0 --time-budget-s 30
    op_run sweep 90 --seq-lens 131072 --presets structured --scopes head --sweep --time-budget-s 45
    if [ -n "${3:-}" ]; then
        timeout 75 python3 benchmarks/bench_varlen.py --seq-lens 32768 --chunks 4096 8192 \
            --presets mixed structured --out "$OUT/varlen" 2>&1 | tee "$OUT/varlen.txt" | tail -14
    fi ;;
tiles)
    # The forward by tile (TMA loads, 128-token blocks; benchmarks/bench_fwd_tiles.py), issue 16's scope
    # x estimator table at 32K, chunked and packed prefill after the host-time cut.
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    (cd benchmarks && timeout 240 python3 bench_fwd_tiles.py --out "$OUT/tiles") 2>&1 | tee "$OUT/tiles.txt" | tail -45
    op_run scopes 60 --seq-lens 32768 --presets mixed --scopes heads kv_group head \
        --estimators composite pooled --tau 0.95 --flex-seq-lens --time-budget-s 40
    # min_seq_len 4096 as in the first varlen run (under the default 32768 only the last chunk's
    # prefix part would run sparse).
    timeout 75 python3 benchmarks/bench_varlen.py --seq-lens 32768 --chunks 4096 8192 \
        --presets mixed structured --config '{"min_seq_len": 4096}' --out "$OUT/varlen" 2>&1 \
        | tee "$OUT/varlen.txt" | tail -14 ;;
gpu-tests)
    # The GPU suite (exported packages aside: tests/gpu/test_packages.py, test_cpp_runner.py), and
    # which of transformers' serving packages this image has.
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    python3 - <<'PY' 2>&1 | tee "$OUT/serving_stack.txt"
import importlib, importlib.metadata as md
for name in ("transformers", "fastapi", "uvicorn", "openai", "starlette", "pydantic"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
try:
    importlib.import_module("transformers.cli.serve")
    print("transformers.cli.serve imports")
except Exception as error:  # what keeps the server from starting here
    print("transformers.cli.serve:", repr(error))
PY
    TRITON_INTERPRET=0 timeout 300 python3 -P -m pytest -q -ra -m gpu tests/gpu \
        --ignore=tests/gpu/test_packages.py --ignore=tests/gpu/test_cpp_runner.py 2>&1 | tee "$OUT/gpu_suite.txt" ;;
serve)
    # The load test (docs/SERVING.md) on SmolLM2 (8192 positions): 8 passkey prompts of 8000 tokens,
    # 8 in flight, dense (sdpa) then omnisparse with sparse sites from 4096 keys.
    timeout 280 python3 -P benchmarks/serve_load.py --model smollm2-135m --lengths 8000 --requests 8 \
        --concurrency 8 --max-tokens 16 --device cuda --dtype bfloat16 --config '{"min_seq_len": 4096}' \
        --time-limit 260 --out "$OUT/serve" 2>&1 | tee "$OUT/serve.txt" | tail -30 ;;
eval32)
    # SmolLM2 at 32K (YaRN x4, bf16): perplexity, top-1, KL and per-layer density / exact recall of the
    # default config at tau 0.99 and 0.995 (which layers cost what), with a plot.
    timeout 300 omnicompile eval --model smollm2-135m --lengths 32768 --scopes head \
        --taus 0.99 0.995 --depths 0 --device cuda --dtype bfloat16 --max-position-embeddings 32768 \
        --rope-scaling "$YARN" --config '{"min_seq_len": 4096}' --out "$OUT/eval_smollm2_32k_head.json" \
        --plot "$OUT/eval_smollm2_32k_head.png" 2>&1 | tee "$OUT/eval32.txt" ;;
gemma-default)
    # Gemma 3 end to end with the default config (its global layers' head dim 256 > max_head_dim).
    (cd benchmarks && timeout 300 python3 bench_models.py --models gemma3-270m --seq-lens 16384 32768 \
        --variants eager dense sparse --config '{}' --time-budget-s 280 --out "$OUT/gemma-default") 2>&1 \
        | tee "$OUT/gemma-default.txt" ;;
packages)
    # The exported-package GPU tests, -k ${3:-all} (each package loads in a fresh process).
    TRITON_INTERPRET=0 timeout 560 python3 -P -m pytest -q -ra -m gpu tests/gpu/test_packages.py \
        ${3:+-k "$3"} 2>&1 | tee "$OUT/packages.txt" ;;
export)
    # Issue 18: load time, first call and steady state of the dense and sparse packages against
    # torch.compile with the backend, each in a fresh process (benchmarks/bench_export.py).
    timeout 570 python3 benchmarks/bench_export.py --seq-lens ${3:-32768 65536} --out "$OUT/export" 2>&1 \
        | tee "$OUT/export.txt" | tail -20 ;;
none) ;;
*) echo "unknown step $2" >&2; exit 2 ;;
esac
ls -la "$OUT"
