#!/usr/bin/env bash
# Run after run_cpu.sh: q-collapse-mlp at LR 0.04, where a seed of repro-cpu-mlp collapsed at
# multiplier 1 (the recipe's grid holds both LRs; run_cpu.sh ran LR 0.08). Same folder: the
# results merge.
set -u
DATA=${DATA:-data/cifar10-jpg}
OUT=${OUT:-/tmp/science}
export OMP_NUM_THREADS=1
/usr/bin/time -f "q-collapse-mlp lr 0.04: %e s wall" nice -n 10 \
    surgeon train --recipe q-collapse-mlp --lr 0.04 --data "$DATA" --out "$OUT" --workers 1 \
    --quiet > "$OUT.q-collapse-mlp-lr0.04.log" 2>&1
tail -1 "$OUT.q-collapse-mlp-lr0.04.log"
