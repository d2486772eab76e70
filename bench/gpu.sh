#!/usr/bin/env bash
# camkd's GPU checks and benchmarks in one run: bash bench/gpu.sh (from anywhere; nothing to edit).
#
# On a machine where nvidia-smi works: prints the GPU (nvidia-smi), makes the venv if .venv is missing, then
#   1. the CUDA test tier (pytest -m cuda),
#   2. camkd bench protocol --device cuda (the reference protocol's projected time),
#   3. camkd bench speed --device cuda in fp32, bf16, bf16 + channels-last,
# each under its own time limit, so one that fails or hangs does not take the others' time: the script goes on
# and says at the end which failed. The checks share a budget of CAMKD_GPU_BUDGET_S seconds (default 470: under
# 8 minutes on one H100), each step its share of it (30/24/22/12/12 %) plus what earlier steps left unused, so every
# step runs. The 8 minutes assume .venv exists (with a CUDA build of torch): making a missing one (pip with network
# access, about 2.5 min and 6 GB) comes before the budget and is reported apart.
# GPU settings: bench speed times 2,048 samples (32 steps of 64 per epoch, timed after a warm-up epoch) at one
# thread count, not the CPU default of 384 (6 steps: noise on a GPU); "fp32" on CUDA is labelled with its TF32 use.
# Results go to bench/results/gpu/: gpu.log (everything printed), nvidia-smi.txt, pytest-cuda.log,
# protocol.{json,md,png}, speed-fp32.*, speed-bf16.*, speed-bf16-cl.* (each run overwrites them).
# Exit code: 0 when every step passed, 1 when any failed or ran out of time, 2 without a usable GPU.
set -u

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bench/gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU and its driver; nothing was run" >&2
    exit 2
fi
here=${BASH_SOURCE[0]%/*}
[[ $here == "${BASH_SOURCE[0]}" ]] && here=.
cd "$here/.." || exit 2
if ! smi=$(nvidia-smi 2>&1); then
    echo "bench/gpu.sh: nvidia-smi failed (no usable GPU or driver): ${smi%%$'\n'*}" >&2
    exit 2
fi

setup=""
if [[ ! -x .venv/bin/python ]]; then
    echo "== setup: .venv is missing; making it (python3 -m venv .venv && pip install -e '.[test]')"
    t0=$SECONDS
    if ! { python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'; }; then
        echo "bench/gpu.sh: making the venv failed (see above); nothing was run" >&2
        exit 1
    fi
    setup="== setup: made .venv in $((SECONDS - t0))s (not counted in the checks' budget)"
fi
PY=.venv/bin/python
CAMKD=.venv/bin/camkd
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    built=$($PY -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)
    if [[ -z $built ]]; then
        echo "bench/gpu.sh: torch in .venv is a CPU-only build ($($PY -c 'import torch; print(torch.__version__)' 2>&1)); install a CUDA build of torch into .venv; nothing was run" >&2
    else
        echo "bench/gpu.sh: torch in .venv is built for CUDA $built but sees no GPU: check that the driver nvidia-smi shows supports CUDA $built and that CUDA_VISIBLE_DEVICES does not hide the GPUs; nothing was run" >&2
    fi
    exit 2
fi

OUT=bench/results/gpu
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
echo "bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname) in $(pwd)"
echo "$smi" | tee "$OUT/nvidia-smi.txt"
[[ -n $setup ]] && echo "$setup"
$PY -c 'import torch, camkd; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), camkd {camkd.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")'

BUDGET=${CAMKD_GPU_BUDGET_S:-470}
DEADLINE=$((SECONDS + BUDGET))
OK=() FAILED=()

# step NAME SHARE_PCT LATER_PCT CMD...: CMD under timeout, with what the budget leaves after keeping LATER_PCT
# percent of it for the steps still to come (so a step gets its SHARE_PCT plus what earlier steps did not use).
step() {
    local name=$1 share=$2 later=$3
    shift 3
    local limit=$((DEADLINE - SECONDS - BUDGET * later / 100))
    ((share + later > 100)) && { echo "bench/gpu.sh: shares add up to more than 100%"; exit 1; }
    if ((limit < 20)); then
        echo "== $name: NOT RUN (too little of the ${BUDGET}s budget left)"
        FAILED+=("$name (not run: out of time)")
        return
    fi
    echo
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$limit" "$@" || rc=$?
    if ((rc == 0)); then
        OK+=("$name ($((SECONDS - t0))s)")
    elif ((rc == 124 || rc == 137)); then
        FAILED+=("$name (stopped at its ${limit}s limit)")
    else
        FAILED+=("$name (exit code $rc after $((SECONDS - t0))s)")
    fi
    echo "== $name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit code $rc)") after $((SECONDS - t0))s"
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS (the tier's --deterministic runs)

step "CUDA tier (pytest -m cuda)" 30 70 \
    bash -c "set -o pipefail; $PY -m pytest -q -m cuda -n 4 -p no:cacheprovider -rfEs tests 2>&1 | tee $OUT/pytest-cuda.log"
step "bench protocol --device cuda" 24 46 $CAMKD bench protocol --device cuda --out "$OUT/protocol"
GPU_SPEED=(--samples 2048 --threads 4)  # enough steps after warm-up to time on a GPU (see the header)
echo "== bench speed on the GPU: ${GPU_SPEED[*]} (the CPU default is 384 samples, 6 steps per epoch)"
# torchrun rows only with 2 GPUs or more (W = 1 adds nothing on one GPU, and each torchrun start costs seconds)
RANKS=(--no-ranks); [[ $(nvidia-smi -L | wc -l) -ge 2 ]] && RANKS=(--ranks 2)
step "bench speed --device cuda (fp32)" 22 24 \
    $CAMKD bench speed --device cuda "${GPU_SPEED[@]}" "${RANKS[@]}" --out "$OUT/speed-fp32"
step "bench speed --device cuda --precision bf16" 12 12 \
    $CAMKD bench speed --device cuda "${GPU_SPEED[@]}" --precision bf16 --no-ranks --out "$OUT/speed-bf16"
step "bench speed --device cuda --precision bf16 --channels-last" 12 0 \
    $CAMKD bench speed --device cuda "${GPU_SPEED[@]}" --precision bf16 --channels-last --no-ranks --out "$OUT/speed-bf16-cl"

echo
echo "== bench/gpu.sh: $((SECONDS - DEADLINE + BUDGET))s for the checks (budget ${BUDGET}s); results in $OUT/"
for s in "${OK[@]}"; do echo "   ok      $s"; done
for s in "${FAILED[@]}"; do echo "   FAILED  $s"; done
((${#FAILED[@]} == 0))
