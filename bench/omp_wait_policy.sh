#!/usr/bin/env bash
# OpenMP waiting across camkd's commands: one job alone vs two at once, with libgomp's default spin,
# OMP_WAIT_POLICY=PASSIVE, and camkd's default GOMP_SPINCOUNT=3000.
# usage: bench/omp_wait_policy.sh [WORKDIR]   (run on an idle machine; ~5 minutes on 2 cores)
# Prints images/s (train-teacher, distill: epoch-2 loop figure) or samples/s (cache-teachers), per job.
set -euo pipefail
W=${1:-$(mktemp -d)}
CAMKD=${CAMKD:-camkd}
mkdir -p "$W"; cd "$W"
export CUDA_VISIBLE_DEVICES=""
if [ ! -e t.pth ]; then
  OMP_NUM_THREADS=2 $CAMKD train-teacher -m resnet20 -d fashion-mnist --limit 2048 --epochs 1 --out teacher -q >/dev/null
  cp teacher/last.pth t.pth
  OMP_NUM_THREADS=2 $CAMKD cache-teachers -t t.pth -d fashion-mnist --limit 4096 -V 2 --no-eval --out s.zarr -q >/dev/null
fi
rate() {  # $1 = kind, $2 = run folder or log
  case $1 in
    cache) sed -n 's/.*(\([0-9]*\) samples\/s).*/\1/p' "$2" ;;
    *) python3 -c "import json,sys; print(round(json.loads(open(sys.argv[1]).read().splitlines()[-1])['images_per_s']))" "$2/metrics.jsonl" ;;
  esac
}
job() {  # $1 = kind, $2 = tag
  case $1 in
    train) $CAMKD train-teacher -m resnet20 -d fashion-mnist --limit 4096 --epochs 2 --out "r_$2" -q >/dev/null 2>&1 ;;
    cache) $CAMKD cache-teachers -t t.pth -d fashion-mnist --limit 2048 -V 1 --no-eval --out "c_$2.zarr" > "c_$2.log" 2>&1 ;;
    distill) $CAMKD distill -m resnet8 -c s.zarr --method camkd --epochs 2 --out "r_$2" -q >/dev/null 2>&1 ;;
  esac
}
out() { if [ "$1" = cache ]; then echo "c_$2.log"; else echo "r_$2"; fi; }
for kind in train cache distill; do
  for setting in "OMP_WAIT_POLICY=" "OMP_WAIT_POLICY=PASSIVE" "GOMP_SPINCOUNT=3000"; do
    name=$setting; export $setting
    rm -rf r_* c_*
    OMP_NUM_THREADS=2 job $kind a1
    alone=$(rate $kind "$(out $kind a1)")
    rm -rf r_* c_*
    OMP_NUM_THREADS=2 job $kind b1 & p1=$!
    OMP_NUM_THREADS=2 job $kind b2 & p2=$!
    wait $p1 $p2
    echo "$kind $name: alone $alone; two at once $(rate $kind "$(out $kind b1)") + $(rate $kind "$(out $kind b2)")"
    unset OMP_WAIT_POLICY GOMP_SPINCOUNT
  done
done
