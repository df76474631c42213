#!/usr/bin/env bash
# The one prepared GPU check: everything that needs CUDA, in one run of at most ~8 minutes on one
# GPU, ending in one table (plus each step's own table). Run from anywhere:
#
#     benchmarks/gpu_check.sh                   # on the CUDA machine
#     benchmarks/gpu_check.sh --download-wheels # beforehand, where pip works: fills .whl/ (~43 MB)
#
# Steps, each with its own time limit, so one hang cannot eat the rest:
#   1. environment: GPU name, driver, torch and CUDA versions
#   2. pytest -m gpu (the Triton kernel bit for bit against the reference, on CUDA)
#   3. benchmarks/dequant_gpu.py --sweep: Triton vs bitsandbytes CUDA dequantize vs HBM bandwidth
#   4. benchmarks/real_model.py --device cuda: a QLoRA step, nibbletune vs transformers+bitsandbytes
#      +PEFT, SmolLM2-135M (its shapes with random weights when the package is not installed),
#      step time and torch.cuda.max_memory_allocated both sides
#   5. training on CUDA through the CLI: one process, and 1-rank NCCL under ddp and under fsdp
#
# Packages the machine may lack (bitsandbytes, gguf, pydantic) are installed from .whl/ when it
# holds wheels. Logs go to $OUT (the device tool's folder) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"

if [ "${1:-}" = "--download-wheels" ]; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.0 gguf pydantic pydantic-core annotated-types typing-inspection
    exit $?
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

ROWS=()
# check NAME SECONDS COMMAND...: run COMMAND under a time limit into $LOGS/NAME.log; record a row.
check() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS status
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    case $? in
        0) status=ok ;;
        124) status="TIMED OUT" ;;
        *) status="FAILED" ;;
    esac
    tail -n 25 "$LOGS/$name.log"
    ROWS+=("| $name | $status | $((SECONDS - started)) s | $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-100) |")
}

check environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'"

check pytest_gpu 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests

check dequant_sweep 120 "$PYTHON" benchmarks/dequant_gpu.py --sweep

models=smollm2
"$PYTHON" -c "from nibbletune.recipes.packaged_models import smollm2_gguf; raise SystemExit(smollm2_gguf() is None)" \
    2> /dev/null || models=smollm2-random
check qlora_step 260 "$PYTHON" benchmarks/real_model.py --device cuda --models "$models" --batch 8 --seq 512 \
    --steps 5 --columns floor,hf,nibbletune,nibbletune-plain,nibbletune-compiled

WORK=$(mktemp -d)
"$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path

import yaml

from nibbletune.recipes.tiny import llama_config, random_llama, save_model_dir, train_tokenizer

work = Path(sys.argv[1])
texts = [f"step {i} of the cuda smoke run is followed by step {i + 1}" for i in range(256)]
tokenizer = train_tokenizer(texts, vocab_size=512)
save_model_dir(random_llama(llama_config(len(tokenizer), hidden_size=256, num_layers=4), seed=0), tokenizer, work / "toy")
(work / "train.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
for strategy in ("none", "ddp", "fsdp"):
    config = {"model": str(work / "toy"), "data": {"path": str(work / "train.jsonl")},
              "output_dir": str(work / f"out-{strategy}"),
              "train": {"max_steps": 6, "micro_batch_size": 4, "seq_len": 64, "distributed": strategy}}
    (work / f"{strategy}.yaml").write_text(yaml.safe_dump(config))
EOF
check train_cuda 90 "$PYTHON" -m nibbletune train "$WORK/none.yaml" --no-progress
for strategy in ddp fsdp; do
    check "train_nccl_$strategy" 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 \
        -m nibbletune train "$WORK/$strategy.yaml" --no-progress
done

echo
echo "gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
echo "| step | status | time | last line |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
