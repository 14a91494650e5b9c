#!/usr/bin/env bash
# One run on a CUDA machine, from the repository root: the CUDA correctness tests
# (tests/gpu) and the benchmarks on cuda/bf16; everything it writes goes to $OUT.
#
#   bash benchmarks/gpu.sh                      # on the GPU machine (python3 = its torch)
#   GPU_DRY_RUN=1 OUT=/tmp/gpuout bash benchmarks/gpu.sh   # here: same steps, cpu, tiny
#
# The GPU machine has torch and transformers but not pydantic or ruamel.yaml, and no
# network: the wheels travel in .whl/ (ignored by git; see the list below) and go to
# /tmp/site. .whl/tf/ holds transformers 5.24 (the version the CPU runs use); if it does
# not import there, the image's own transformers is used and the log says so.
# Every step has a timeout and the whole script ends within $GPU_DEADLINE_S seconds.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="ignore::FutureWarning"
DRY=${GPU_DRY_RUN:-}
OUT=${OUT:-/tmp/gpuout}
DEADLINE=${GPU_DEADLINE_S:-540}
STEPS=${GPU_STEPS:-tests,mixed,bench,train}  # a comma-separated subset, e.g. GPU_STEPS=mixed
PYTEST_K=${GPU_PYTEST_K:-}  # e.g. GPU_PYTEST_K=mixed: only those tests
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
SECONDS=0
cd "$(dirname "$0")/.."

if [[ -n $DRY ]]; then
    PY=${PYTHON:-.venv/bin/python}
    DEVICE=cpu
    SITE=/tmp/gpu-dry-site
    # check the install command against the 3.12 wheels, but run with the local venv
    PIP_TAGS=(--python-version 3.12 --implementation cp --only-binary=:all:
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
    BENCH_SIZE=(--repeat 2 --warmup 1 --hidden 64 --layers 2 --skip compile-meta-70b)
    MIXED_SIZE=(--device cpu --dtype bf16 --quick)
    TRAIN_SIZE=(--repeat 2 --warmup 1 --hidden 64 --layers 2 --train-batch 2 --train-seq 64)
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
    SITE=/tmp/site
    PIP_TAGS=()
    # Llama-1B-ish (hidden 2048, 16 layers: run.py's cuda default); the compile-meta rows
    # run on the CPU whatever the device: keep the cheap 7b one, skip the 70b one
    BENCH_SIZE=(--repeat 10 --warmup 2 --skip compile-meta-70b)
    MIXED_SIZE=(--device cuda --dtype bf16)
    # the training rows at a realistic size: 4 sequences of 1024 tokens on the 1B shape
    TRAIN_SIZE=(--repeat 10 --warmup 2 --train-batch 4 --train-seq 1024)
fi

left() { echo $((DEADLINE - SECONDS)); }
# step NAME MAX_SECONDS CMD...: runs CMD with min(MAX, time left - reserve) as its timeout
step() {
    local name=$1 max=$2
    shift 2
    local t
    t=$(($(left) - ${RESERVE:-0}))
    ((t > max)) && t=$max
    if ((t < 10)); then
        echo "=== $name: skipped, ${t}s left"
        return 0
    fi
    echo "=== $name (timeout ${t}s, at ${SECONDS}s)"
    timeout -k 10 "$t" "$@"
    local rc=$?
    echo "=== $name: exit $rc after ${SECONDS}s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    return 0
}

install() {  # install DIR WHEELS...: pip if the interpreter has it, else unzip (no .data)
    local dir=$1
    shift
    rm -rf "$dir" && mkdir -p "$dir"
    if $PY -m pip --version >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check ${PIP_TAGS[@]+"${PIP_TAGS[@]}"} --target "$dir" "$@"
    else
        echo "no pip: unzipping the wheels into $dir"
        for whl in "$@"; do $PY -m zipfile -e "$whl" "$dir" || return 1; done
    fi
}

echo "=== adaptc GPU run: $(date -u +%FT%TZ), dry run: ${DRY:-no}, python: $PY"
nvidia-smi -L 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
echo "gcc: $(command -v gcc || echo none)  cc: $(command -v cc || echo none)  cpus: $(nproc)"

install "$SITE" .whl/*.whl || echo "!!! installing .whl/*.whl failed"
install "$SITE-tf" .whl/tf/*.whl || echo "!!! installing .whl/tf/*.whl failed"
if [[ -n $DRY ]]; then
    ls "$SITE" "$SITE-tf" | head -40
    export PYTHONPATH=$PWD
else
    export PYTHONPATH=$SITE-tf:$SITE:$PWD
    if ! timeout 90 $PY -c "import transformers, peft, adaptc.compiler, adaptc.io" 2>&1 | tail -5; then
        echo "!!! transformers from .whl/tf does not import: using the image's transformers"
        export PYTHONPATH=$SITE:$PWD
    fi
fi
echo "PYTHONPATH=$PYTHONPATH"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache

timeout 90 $PY - <<'EOF' || echo "!!! the environment check failed"
import platform, sys
import torch, transformers, peft, pydantic, ruamel.yaml, safetensors, huggingface_hub
import adaptc, adaptc.compiler, adaptc.io
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    print("bf16 supported", torch.cuda.is_bf16_supported())
for m in (transformers, peft, pydantic, ruamel.yaml, safetensors, huggingface_hub, adaptc):
    print(m.__name__, getattr(m, "__version__", "?"), m.__file__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable", exc)
EOF

# (a) correctness on the device against peft: forward, gradients, merge, files, compile
export ADAPTC_TEST_DEVICE=$DEVICE
[[ ,$STEPS, == *,tests,* ]] && RESERVE=260 step "tests/gpu (pytest)" 120 \
    $PY -m pytest -v -s -rfEs -p no:cacheprovider -p no:logging tests/gpu ${PYTEST_K:+-k "$PYTEST_K"} \
    --junitxml="$OUT/junit-gpu.xml"

# (b) the mixed-batch benchmark
if [[ ,$STEPS, == *,mixed,* ]]; then
    RESERVE=150 step "benchmarks/mixed_batch.py" 100 \
        $PY benchmarks/mixed_batch.py "${MIXED_SIZE[@]}" --json "$OUT/mixed-$DEVICE.json"
fi

# (c) the benchmarks, torch-compile rows last (the files are rewritten after each row);
# with (d) to come, keep time for it
BENCH_RESERVE=5
[[ ,$STEPS, == *,train,* ]] && BENCH_RESERVE=110
[[ ,$STEPS, == *,bench,* ]] && RESERVE=$BENCH_RESERVE step "benchmarks/run.py" 260 \
    $PY benchmarks/run.py --device "$DEVICE" --dtype bf16 "${BENCH_SIZE[@]}" --keep-going \
    --results "$OUT/results-$DEVICE.json" --doc "$OUT/benchmarks-$DEVICE.md" \
    --chart "$OUT/benchmarks-$DEVICE.png"

# (d) the training rows (eager and torch.compile) on a realistic batch
[[ ,$STEPS, == *,train,* ]] && RESERVE=5 step "benchmarks/run.py (training, 4 x 1024)" 150 \
    $PY benchmarks/run.py --device "$DEVICE" --dtype bf16 "${TRAIN_SIZE[@]}" --keep-going \
    --only train-step-dropout torch-compile-train-step --results "$OUT/results-$DEVICE-train.json" \
    --doc "$OUT/benchmarks-$DEVICE-train.md" --chart "$OUT/benchmarks-$DEVICE-train.png"

echo "=== done in ${SECONDS}s; in $OUT:"
ls -la "$OUT"
sleep 1  # let tee write the last lines to gpu.log
